"""Study plumbing: modes, summaries and the claims verdicts on synthetic tables."""
import pandas as pd
import pytest

from obslib import study
from obslib.study.claims import claim_rows
from obslib.study.experiments import summarize


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


def _comparisons(tmp_path, rows):
    from obslib.study.compare import COLUMNS

    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df:
            df[c] = float("nan")
    df[COLUMNS].to_csv(tmp_path / "comparisons.csv", index=False)


def _row(context, b, metric, diff, lo, hi, verdict, chapter="01 unstructured", a="obs-diff"):
    return dict(chapter=chapter, context=context, a=a, b=b, metric=metric, n_prompts=64, n_seeds=3, diff=diff, lo=lo,
                hi=hi, verdict=verdict)


@pytest.mark.parametrize("wanda_verdict, expect", [("ahead", "reproduced"), ("behind", "not reproduced"),
                                                   ("no difference detected", "partly reproduced")])
def test_ordering_claim_verdict_is_built_from_paired_verdicts(tmp_path, wanda_verdict, expect):
    lo = {"ahead": 0.03, "behind": -0.11, "no difference detected": -0.02}[wanda_verdict]
    hi = {"ahead": 0.11, "behind": -0.03, "no difference detected": 0.05}[wanda_verdict]
    rows = []
    for ctx in ("At 50%", "At 60%"):
        rows += [_row(ctx, "wanda", "prompt_fidelity", (lo + hi) / 2, lo, hi, wanda_verdict),
                 _row(ctx, "magnitude", "psnr", 5.0, 4.0, 6.0, "ahead"), _row(ctx, "dsnot", "psnr", 2.0, 1.0, 3.0, "ahead")]
    _comparisons(tmp_path, rows)
    got = [r for r in claim_rows(str(tmp_path)) if "OBS-Diff ahead of Wanda" in r["claim"]]
    assert len(got) == 2 and all(r["verdict"].startswith(expect) for r in got)
    # the sentence quotes the number and its interval
    assert f"obs-diff − wanda, prompt fidelity: {'+' if lo + hi > 0 else '−'}" in got[0]["ours"]
    assert "obs-diff − magnitude, PSNR: +5.00 dB [+4.00, +6.00], ahead" in got[0]["ours"]


def test_claims_say_no_difference_detected_for_null_results(tmp_path):
    rows = [_row("At 60%", w, "psnr", 0.01, -0.2, 0.2, "no difference detected", chapter="04 weighting", a=w)
            for w in ("log-decrease", "linear-decrease")]
    rows = [dict(r, b="uniform") for r in rows]
    _comparisons(tmp_path, rows)
    (row,) = [r for r in claim_rows(str(tmp_path)) if r["claim"].startswith("At 60% unstructured: log-decrease")]
    assert row["verdict"] == "no difference detected" and "mixed" not in row["verdict"]
    assert "log-decrease − uniform, PSNR: +0.01 dB [−0.20, +0.20]" in row["ours"]


def test_methods_table_never_pools_rows_whose_settings_differ(tmp_path):
    from obslib.study.experiments import methods_table

    base = dict(pattern="structured", sparsity=0.2, weighting="log-decrease", packages=4, num_calib=16, eval_steps=None,
                eval_guidance=None, eval_sampler="euler", prune_s=1.0, psnr=20.0, fid=1.0, attribute_accuracy=0.5,
                n_prompts=64, extra_iterations=3, extra_lr=2e-4)
    rows = []
    for seed in (0, 1):
        rows.append(dict(base, method="gradient-flow", seed=seed, prompt_fidelity=0.5, key=f"m/64/d/pp2|gf{seed}",
                         extra_gradient_criterion=None))
        rows.append(dict(base, method="gradient-flow", seed=seed, prompt_fidelity=0.3, key=f"m/64/d/pp2|low{seed}",
                         extra_gradient_criterion="lower"))
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    t = methods_table(str(tmp_path / "runs.csv"), 16)
    (r,) = t.itertuples()
    assert r.method == "gradient-flow" and r.prompt_fidelity_mean == pytest.approx(0.5)  # the ablation is not pooled in


def test_dense_row_has_no_psnr_and_no_sparsity():
    from obslib.study.experiments import cell

    row = pd.Series({"psnr_mean": float("nan"), "psnr_std": float("nan")})
    assert cell(row, "psnr") == "— (reference)"


@pytest.mark.parametrize("first_minus_second, expect", [((+3.0, +2.0, +4.0, "ahead"), "not reproduced"),
                                                        ((-3.0, -4.0, -2.0, "behind"), "reproduced"),
                                                        ((0.1, -1.0, 1.2, "no difference detected"),
                                                         "no difference detected")])
def test_premise_claim_reads_the_halves_the_right_way_round(tmp_path, first_minus_second, expect):
    """'Pruned only in the first half' with the higher PSNR means early errors hurt *less*: the premise (early errors
    hurt more) is then not reproduced, and the quoted number is second half − first half."""
    d, lo, hi, v = first_minus_second
    rows = [_row("Halves, 50% unstructured", "steps 11-20", "psnr", d, lo, hi, v, chapter="08 timesteps",
                 a="steps 1-10")]
    _comparisons(tmp_path, rows)
    (row,) = [r for r in claim_rows(str(tmp_path)) if r["claim"].startswith("Premise")]
    assert row["verdict"].startswith(expect)
    sign = "−" if d > 0 else "+"
    assert f"steps 11-20 − steps 1-10, PSNR: {sign}{abs(d):.2f} dB" in row["ours"]


def test_partly_verdicts_name_the_setting_and_metric_not_the_baseline_twice(tmp_path):
    rows = [_row("At 50%", "wanda", "psnr", 2.0, 1.0, 3.0, "ahead"),
            _row("At 50%", "wanda", "prompt_fidelity", 0.01, -0.02, 0.04, "no difference detected")]
    _comparisons(tmp_path, rows)
    (row,) = [r for r in claim_rows(str(tmp_path)) if "OBS-Diff ahead of Wanda" in r["claim"]]
    assert row["verdict"] == ("partly reproduced: ahead on wanda on PSNR at 50%; "
                              "not told apart on wanda on prompt fidelity at 50%")
    assert row["basis"].startswith("3 seeds, prompts resampled within seeds")


def test_family_with_two_level_p_is_corrected_by_holm(tmp_path):
    """Two comparisons each with p = 0.04: unadjusted both ahead, after Holm (0.08) neither."""
    rows = [dict(_row("At 50%", b, "psnr", 1.0, 0.1, 2.0, "ahead"), p=0.04, seeds="0 1 2 3 4", n_seeds=5)
            for b in ("wanda", "dsnot")]
    _comparisons(tmp_path, rows)
    (row,) = [r for r in claim_rows(str(tmp_path)) if "OBS-Diff ahead of Wanda" in r["claim"]]
    assert row["verdict"] == "no difference detected"
    assert "Holm p = 0.08; unadjusted: ahead" in row["ours"] and row["basis"].startswith("5 seeds, seeds and prompts")


def test_a_chapter_row_whose_mcnemar_p_disagrees_with_its_interval_is_marked_borderline(tmp_path):
    rows = [dict(_row("At 50%", "wanda", "prompt_fidelity", 0.05, 0.005, 0.1, "ahead"), mcnemar_p=0.064),
            dict(_row("At 50%", "dsnot", "prompt_fidelity", 0.2, 0.1, 0.3, "ahead"), mcnemar_p=0.001)]
    _comparisons(tmp_path, rows)
    (row,) = [r for r in claim_rows(str(tmp_path)) if "OBS-Diff ahead of Wanda" in r["claim"]]
    assert row["ours"].count("borderline") == 1 and "borderline: McNemar p = 0.064 disagrees" in row["ours"]


def test_another_model_gets_its_own_results_figures_and_run_cache(monkeypatch, tmp_path):
    import os

    from obslib.study.runner import main, model_name, settings

    monkeypatch.delenv("OBSLIB_MODEL_DIR", raising=False)
    monkeypatch.setenv("OBSLIB_MODE", "quick")
    sd3 = settings("quick")
    assert sd3["results"].endswith(os.path.join(".tmp", "quick", "results")) and model_name(sd3["model_dir"]) == ""
    flux = settings("quick", str(tmp_path / "shapes-flux"))
    assert flux["results"] == os.path.join(os.path.dirname(sd3["results"]), "results", "shapes-flux")
    assert flux["figures"].endswith(os.path.join("figures", "shapes-flux")) and flux["model_name"] == "shapes-flux"
    assert flux["runs_csv"] == os.path.join(flux["results"], "runs.csv") != sd3["runs_csv"]
    assert main(["00_walkthrough.ipynb", "--mode", "quick", "--model-dir", str(tmp_path / "missing")]) == 2
