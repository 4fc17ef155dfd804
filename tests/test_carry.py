"""Chapter 10's side-by-side verdicts (obslib.study.carry): which comparisons a claim keeps, and how two models'
verdicts on the same comparisons are set beside each other."""
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
