"""Study plumbing: modes, summaries and the claims verdicts on synthetic tables."""
import pandas as pd
import pytest

from obslib import study
from obslib.claims import claim_rows
from obslib.experiments import summarize


def test_quick_mode_never_writes_to_results(monkeypatch):
    monkeypatch.setenv("OBSLIB_MODE", "quick")
    s = study.settings("full")
    assert s["mode"] == "quick" and ".tmp" in s["results"] and ".tmp" in s["figures"]
    monkeypatch.setenv("OBSLIB_MODE", "fast")
    with pytest.raises(ValueError, match="mode 'fast' is unknown"):
        study.settings("full")


def test_summarize_mean_and_std_over_seeds():
    df = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                       "prompt_fidelity": [0.5, 0.6, 0.7, 0.1, 0.1, 0.1]})
    s = summarize(df, ["method"], ("prompt_fidelity",)).set_index("method")
    assert s.loc["a", "prompt_fidelity_mean"] == pytest.approx(0.6)
    assert s.loc["a", "prompt_fidelity_std"] == pytest.approx(0.1)
    assert s.loc["b", "prompt_fidelity_std"] == 0 and s.loc["a", "seeds"] == 3


def _unstructured(obs, wanda):
    rows = []
    for sp in (0.5, 0.6):
        for m, v in (("obs-diff", obs), ("wanda", wanda), ("dsnot", 0.3), ("magnitude", 0.1)):
            rows.append(dict(method=m, sparsity=sp, psnr_mean=40 * v, psnr_std=0.1, prune_s_mean=10.0,
                             prompt_fidelity_mean=v, prompt_fidelity_std=0.01))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("obs, wanda, verdict", [(0.8, 0.4, "reproduced"), (0.2, 0.4, "not reproduced")])
def test_ordering_claim_verdict(tmp_path, obs, wanda, verdict):
    _unstructured(obs, wanda).to_csv(tmp_path / "01_unstructured.csv", index=False)
    rows = [r for r in claim_rows(str(tmp_path)) if r["claim"].startswith("Method ordering")]
    assert len(rows) == 2 and all(r["verdict"].startswith(verdict) for r in rows)


@pytest.mark.parametrize("l1_fidelity, verdict", [(0.1, "reproduced"), (0.9, "mixed")])
def test_structured_claim_weighs_prompt_fidelity_beside_psnr(tmp_path, l1_fidelity, verdict):
    rows = [dict(method="dense", sparsity=0.5, psnr_mean=float("inf"), psnr_std=0.0, prompt_fidelity_mean=0.9,
                 prompt_fidelity_std=0.0)]
    for sp in (0.1, 0.2):
        rows += [dict(method="obs-diff", sparsity=sp, psnr_mean=25.0, psnr_std=0.1, prompt_fidelity_mean=0.5,
                      prompt_fidelity_std=0.01),
                 dict(method="l1-norm", sparsity=sp, psnr_mean=20.0, psnr_std=0.1, prompt_fidelity_mean=l1_fidelity,
                      prompt_fidelity_std=0.01)]
    pd.DataFrame(rows).to_csv(tmp_path / "03_structured.csv", index=False)
    (row,) = [r for r in claim_rows(str(tmp_path)) if r["claim"].startswith("Structured")]
    assert row["verdict"].startswith(verdict) and "0.500 vs L1 20.00" in row["ours"]
    if verdict == "mixed":
        assert "10%, 20%" in row["verdict"]
