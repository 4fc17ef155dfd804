"""Chapter 10's side-by-side verdicts (obslib.study.carry): which comparisons a claim keeps, and how two models'
verdicts on the same comparisons are set beside each other."""
import os

import pandas as pd
import pytest

from obslib.study import carry, verdicts as vd


def test_restrict_keeps_the_named_pairs_of_the_named_families_in_order():
    fams = vd.families(16, (0.1, 0.2, 0.3), keys=["baselines 60%", "structured allocation", "weighting 50%"])
    kept = carry.restrict(fams, {"structured allocation": ["At 20% of the parameters"], "baselines 60%": ["wanda"],
                                 "weighting 50%": None})
    assert [f.key for f in kept] == ["structured allocation", "baselines 60%", "weighting 50%"]
    assert [(p.context, p.b) for p in kept[0].pairs] == [("At 20% of the parameters", "OBS-Diff · uniform")]
    assert [(p.a, p.b) for p in kept[1].pairs] == [("obs-diff", "wanda")]
    assert len(kept[2].pairs) == 1 and len(fams[0].pairs) == 3  # the originals are left as they were
    with pytest.raises(ValueError, match="no comparison"):
        carry.restrict(fams, {"baselines 60%": ["at 99%"]})
    with pytest.raises(ValueError, match="unknown families"):
        carry.restrict(fams, {"nonsense": None})


def _judged(verdicts, claim="c", source="ours"):
    return pd.DataFrame([{"family": "f", "claim": claim, "source": source, "paper": "", "expect": "a ahead",
                          "context": ctx, "a": "x", "b": "y", "metric": "psnr", "diff": d, "lo": d - 1, "hi": d + 1,
                          "p": 0.01, "verdict": v, "p_holm": 0.02, "verdict_holm": v, "n_seeds": 5,
                          "heldout_diff": d, "heldout_lo": d - 1, "heldout_hi": d + 1, "heldout_p": 0.01,
                          "heldout_p_holm": 0.02, "heldout_verdict": v, "heldout_verdict_holm": v, "heldout_n_seeds": 3,
                          "replicates": "yes"} for ctx, v, d in verdicts])


def test_carry_table_sets_two_models_verdicts_side_by_side():
    from obslib.study.compare import AHEAD, NONE

    a = _judged([("at 20%", AHEAD, 2.0), ("at 30%", AHEAD, 3.0)])
    b = _judged([("at 20%", AHEAD, 1.0), ("at 30%", NONE, 0.1)])
    t = carry.carry_table({"SD3": a, "Flux": b}).iloc[0]
    assert t["SD3: verdict"] == "supported" and t["Flux: verdict"] == "partly supported"
    assert t["claim agrees"] == "no" and t["comparisons agreeing"] == "1 of 2"
    assert carry.carry_table({"SD3": a, "Flux": a}).iloc[0]["claim agrees"] == "yes"
    d = carry.disagreements({"SD3": a, "Flux": b})
    assert d.context.tolist() == ["at 30%"] and d["diff (Flux)"].tolist() == [0.1]


def test_mask_agreement_counts_the_pruned_positions_two_settings_decide_differently(tiny_pipe_dir):
    from obslib.study.experiments import Setting, forget_pruned

    a = Setting(method="obs-diff", sparsity=0.5, num_calib=2, packages=1)
    same = carry.mask_agreement(tiny_pipe_dir, a, a)
    from obslib import load_pipeline
    from obslib.archs import block_units, iter_blocks, spec_for

    tr = load_pipeline(tiny_pipe_dir).transformer
    spec = spec_for(tr)
    targets = [n for b, blk in iter_blocks(tr, spec) for unit in block_units(b, blk, spec) for n in unit]
    w = sum(tr.get_submodule(n).weight.numel() for n in targets)
    assert same["positions decided otherwise"] == 0 and same["layers"] == len(targets)
    assert abs(same["positions pruned"] - w // 2) <= len(targets)  # half of every targeted layer
    half = carry.mask_agreement(tiny_pipe_dir, a, Setting(**{**a.__dict__, "sparsity": 0.25}))
    assert half["share"] >= 0.5 - 1e-3  # |A xor B| >= |A| - |B|: at least half of A's positions differ
    forget_pruned()


def test_claims_md_gains_a_column_for_the_second_model_once_chapter_10_has_run(tmp_path):
    from obslib.study.claims import second_model_column

    assert second_model_column(str(tmp_path)) == {}  # before chapter 10: no column at all
    pd.DataFrame([{"claim": "c", "source": "ours", "SD3: verdict": "supported", "SD3: replicate": "2 of 2",
                   "Flux: verdict": "not supported (no difference detected)", "Flux: replicate": "1 of 2",
                   "claim agrees": "no", "comparisons agreeing": "0 of 2"}]).to_csv(tmp_path / "10_carry_over.csv",
                                                                                       index=False)
    assert second_model_column(str(tmp_path)) == {"c": "not supported (no difference detected) (1 of 2 replicate; "
                                                        "0 of 2 comparisons as on the first model; same verdict: no)"}


def test_the_second_model_is_found_from_the_repository_root(monkeypatch):
    import os

    from obslib.paths import repo_root
    from obslib.study import settings

    monkeypatch.delenv("OBSLIB_MODE", raising=False)  # make test sets quick mode for the notebooks
    full = settings("full")
    assert full["carry_model"] == os.path.join(str(repo_root()), "models", "shapes-flux")  # notebooks run elsewhere
    assert settings("quick")["carry_model"] is None  # quick mode: a tiny random Flux, built by the chapter


def test_the_study_skips_chapter_10_while_the_second_model_is_not_there(monkeypatch, tmp_path, capsys):
    from obslib.study import runner

    monkeypatch.delenv("OBSLIB_MODE", raising=False)
    monkeypatch.setitem(runner._FULL, "carry_model", "models/not-trained-yet")
    t = runner.run_study((runner.CARRY_NOTEBOOK,), "full", out_dir=str(tmp_path / "nb"))
    assert t[runner.CARRY_NOTEBOOK] == 0.0 and os.listdir(tmp_path / "nb") == []  # not run, nothing written
    assert "skipped: its second model 'models/not-trained-yet' is not there" in capsys.readouterr().out
