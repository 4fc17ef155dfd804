"""Paired comparisons (obslib.study.compare) pinned on hand-made outcomes."""
import numpy as np
import pandas as pd
import pytest

from obslib.study import compare as cmp


def _rows(name, outcomes, psnr):
    return pd.DataFrame([{"method": name, "seed": s, "pp_fidelity": cmp.encode(outcomes[s]),
                          "pp_psnr": cmp.encode(psnr[s], 3)} for s in range(len(outcomes))])


def test_known_difference_is_ahead_and_reversed_is_behind():
    rng = np.random.default_rng(0)
    a = rng.random((3, 64)) < 0.9
    b = a & (rng.random((3, 64)) < 0.6)  # b loses ~40% of a's hits, never gains one
    p = rng.normal(25, 2, (3, 64))
    df = pd.concat([_rows("a", a, p + 1.0), _rows("b", b, p)])
    r = {x["metric"]: x for x in cmp.compare_in(df, "method", "a", "b", metrics=("prompt_fidelity", "psnr"))}
    assert r["prompt_fidelity"]["verdict"] == "ahead" and r["prompt_fidelity"]["lo"] > 0
    assert r["prompt_fidelity"]["diff"] == pytest.approx(a.mean() - b.mean())
    assert r["prompt_fidelity"]["p"] < 0.05 and r["prompt_fidelity"]["mcnemar_p"] < 1e-6
    back = cmp.compare_in(df, "method", "b", "a", metrics=("prompt_fidelity",))[0]
    assert back["verdict"] == "behind" and back["hi"] < 0


def test_identical_outcomes_no_difference_detected():
    rng = np.random.default_rng(1)
    a = rng.random((2, 32)) < 0.5
    p = rng.normal(20, 3, (2, 32))
    df = pd.concat([_rows("a", a, p), _rows("b", a, p)])
    for r in cmp.compare_in(df, "method", "a", "b", metrics=("prompt_fidelity", "psnr")):
        assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
        assert r["verdict"] == "no difference detected"
    assert cmp.compare_in(df, "method", "a", "b")[0]["p"] == 1.0


def test_constant_shift_is_measured_exactly():
    x = np.random.default_rng(2).normal(20, 3, (3, 64))
    d, lo, hi = cmp.paired_bootstrap(x + 0.25, x)
    assert d == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_pairing_detects_what_independent_intervals_miss():
    # per-prompt outcomes vary a lot between prompts (sd 5 dB) but a is 0.5 dB above b on every prompt
    # but one: the unpaired 95% intervals overlap widely, the paired difference is clearly positive
    x = np.random.default_rng(3).normal(20, 5, (3, 64))
    y = x - 0.5
    y[0, 0] += 1.0
    d, lo, hi = cmp.paired_bootstrap(x, y)
    assert 0.4 < lo < d < hi < 0.6 and cmp.verdict(lo, hi) == "ahead"


def test_stratified_by_seed_shapes_and_errors():
    with pytest.raises(ValueError, match="equal"):
        cmp.paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        cmp.paired_bootstrap(np.full((1, 3), np.nan), np.zeros((1, 3)))


@pytest.mark.parametrize("n01, n10, p", [(10, 0, 2 / 1024), (5, 5, 1.0), (0, 0, 1.0), (1, 3, 0.625)])
def test_mcnemar_exact_values(n01, n10, p):
    a = np.array([1] * n01 + [0] * n10 + [1, 0])
    b = np.array([0] * n01 + [1] * n10 + [1, 0])
    assert cmp.mcnemar_exact(a, b) == pytest.approx(p)


def test_verdict_from_interval_alone_and_lower_is_better():
    assert cmp.verdict(0.01, 0.2) == "ahead" and cmp.verdict(-0.2, -0.01) == "behind"
    assert cmp.verdict(-0.01, 0.2) == "no difference detected"
    assert cmp.verdict(0.01, 0.2, higher=False) == "behind"


def test_sentence_and_summary_quote_the_numbers():
    r = dict(chapter="01", context="At 50%", a="obs-diff", b="wanda", metric="prompt_fidelity", n_prompts=64, n_seeds=3,
             mean_a=0.8, mean_b=0.73, diff=0.07, lo=0.03, hi=0.11, p=0.001, verdict="ahead")
    s = cmp.sentence(r)
    assert s.startswith("At 50%, obs-diff − wanda in prompt fidelity") and "+0.070 [95% +0.030, +0.110]" in s
    assert ", p = 0.001," in s and s.endswith("obs-diff ahead.")
    line = cmp.summary_line([r, dict(r, b="sparsegpt", diff=0.01, lo=-0.02, hi=0.04, verdict="no difference detected")],
                            "prompt_fidelity")
    assert line == ["At 50%, on prompt fidelity obs-diff is ahead of wanda (+0.070 [+0.030, +0.110]); shows no detected "
                    "difference from sparsegpt (+0.010 [−0.020, +0.040])."]


def test_write_comparisons_replaces_only_its_chapter(tmp_path):
    path = str(tmp_path / "c.csv")
    r = dict(chapter="01", context="", a="x", b="y", metric="psnr", n_prompts=4, n_seeds=1, mean_a=1, mean_b=0, diff=1,
             lo=1, hi=1, p=np.nan, verdict="ahead")
    cmp.write_comparisons([r], "01", path)
    cmp.write_comparisons([dict(r, chapter="02")], "02", path)
    cmp.write_comparisons([dict(r, diff=2.0)], "01", path)
    t = cmp.read_comparisons(path)
    assert sorted(t.chapter) == ["01", "02"] and t[t.chapter == "01"]["diff"].tolist() == [2.0]


def test_encode_decode_roundtrip():
    assert cmp.decode(cmp.encode([True, False, True])).tolist() == [1.0, 0.0, 1.0]
    assert cmp.decode(cmp.encode([1.23456, 7.0], 3)).tolist() == [1.235, 7.0]


def test_outcomes_survive_a_csv_roundtrip(tmp_path):
    # leading zeros must not be read back as a number (0110 -> 110)
    df = pd.DataFrame([{"method": "a", "seed": 0, "pp_fidelity": cmp.encode([0, 1, 1, 0])}])
    df.to_csv(tmp_path / "r.csv", index=False)
    back = pd.read_csv(tmp_path / "r.csv")
    x, seeds = cmp.outcomes(back, "prompt_fidelity")
    assert x.tolist() == [[0.0, 1.0, 1.0, 0.0]] and seeds == [0]


def test_against_chance_counts_and_binomial_tails():
    rows = [{"verdict": cmp.AHEAD}] * 2 + [{"verdict": cmp.BEHIND}] * 5 + [{"verdict": cmp.NONE}] * 25
    ch = cmp.against_chance(rows)
    assert (ch["n"], ch["ahead"], ch["behind"]) == (32, 2, 5)
    assert ch["expected_per_side"] == pytest.approx(0.8)
    # P(X >= 1) = 1 - 0.975^32 - 32 * 0.025 * 0.975^31 for two ahead
    assert ch["p_ahead"] == pytest.approx(1 - 0.975**32 - 32 * 0.025 * 0.975**31)
    assert ch["p_behind"] == pytest.approx(0.001119, abs=1e-6)
    none = cmp.against_chance([{"verdict": cmp.NONE}] * 10)
    assert (none["ahead"], none["p_ahead"], none["p_behind"]) == (0, 1.0, 1.0)
