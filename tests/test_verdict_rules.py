"""The verdicts' rules (issue: verdicts that survive a rerun): the two-level interval, its p, Holm's correction, the
numerical regime in the run cache's key, and the claims built from them — pinned on hand-made outcomes."""
import os
import types
import zlib

import numpy as np
import pandas as pd
import pytest

from obslib.study import compare as cmp
from obslib.study import experiments as ex
from obslib.study import verdicts as vd


def _seed_effects(seed_means, n_prompts=64, noise=0.05, rng=0):
    """(seeds, prompts) differences whose seed-level means are ``seed_means`` plus small prompt noise."""
    r = np.random.default_rng(rng)
    return np.asarray(seed_means, float)[:, None] + r.normal(0, noise, (len(seed_means), n_prompts))


def test_seeds_that_disagree_widen_the_interval():
    agree = _seed_effects([0.3, 0.3, 0.3, 0.3, 0.3])
    disagree = _seed_effects([0.9, -0.3, 0.6, 0.0, 0.3])  # same mean, seeds far apart
    z = np.zeros_like(agree)
    w_agree = np.subtract(*reversed(cmp.paired_bootstrap(agree, z)[1:]))
    two = cmp.bootstrap_test(disagree, z)
    one = cmp.bootstrap_test(disagree, z, over_seeds=False)
    assert two["hi"] - two["lo"] > 10 * (one["hi"] - one["lo"])  # prompts alone see almost no spread
    assert two["hi"] - two["lo"] > 10 * w_agree
    assert one["lo"] > 0 and two["lo"] < 0 < two["hi"]  # only the two-level interval doubts it
    assert two["p"] >= 0.05 and one["p"] < 0.05


def test_a_known_seed_level_effect_is_covered():
    """Many simulated studies of 8 seeds: the true effect 0.2 plus a seed-level effect (sd 0.3) plus prompt noise.
    The two-level interval covers 0.2 in most of them; the prompts-only interval, blind to the seed variance, rarely."""
    rng = np.random.default_rng(7)
    cover2 = cover1 = 0
    n = 150
    for i in range(n):
        d = 0.2 + rng.normal(0, 0.3, (8, 1)) + rng.normal(0, 0.2, (8, 32))
        z = np.zeros_like(d)
        t2 = cmp.bootstrap_test(d, z, n_boot=1000, seed=i)
        t1 = cmp.bootstrap_test(d, z, n_boot=1000, seed=i, over_seeds=False)
        cover2 += t2["lo"] <= 0.2 <= t2["hi"]
        cover1 += t1["lo"] <= 0.2 <= t1["hi"]
    assert cover2 / n >= 0.85  # 8 clusters: a percentile bootstrap is a little narrow, not much
    assert cover1 / n <= 0.45


def test_constant_shift_is_exact_with_seeds_resampled():
    x = np.random.default_rng(2).normal(20, 3, (5, 64))
    t = cmp.bootstrap_test(x + 0.25, x)
    assert (t["diff"], t["lo"], t["hi"]) == pytest.approx((0.25, 0.25, 0.25)) and t["p"] == 0.0
    same = cmp.bootstrap_test(x, x)
    assert (same["diff"], same["lo"], same["hi"], same["p"]) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("shift", [0.0, 0.02, 0.04, 0.06, 0.1, -0.05])
def test_p_and_interval_never_disagree(shift):
    rng = np.random.default_rng(int(abs(shift) * 1000))
    for trial in range(20):
        a = rng.normal(shift, 0.3, (5, 16)) + rng.normal(0, 0.05, (5, 1))
        t = cmp.bootstrap_test(a, np.zeros_like(a), seed=trial)
        excludes = t["lo"] > 0 or t["hi"] < 0
        assert excludes == (t["p"] < 0.05), t
        assert (cmp.verdict(t["lo"], t["hi"]) != cmp.NONE) == (t["p"] < 0.05)


def test_bootstrap_refuses_a_level_that_has_no_order_statistic():
    with pytest.raises(ValueError, match="whole number"):
        cmp.bootstrap_test(np.ones((2, 3)), np.zeros((2, 3)) + np.eye(2, 3), n_boot=30)


def test_holm_known_values_and_adjusted_verdicts():
    assert cmp.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert cmp.holm([0.5]) == pytest.approx([0.5]) and len(cmp.holm([])) == 0
    assert cmp.holm([0.3, 0.4]) == pytest.approx([0.6, 0.6])  # monotone, capped
    assert cmp.adjusted_verdict(0.1, 0.01) == "ahead" and cmp.adjusted_verdict(-0.1, 0.01) == "behind"
    assert cmp.adjusted_verdict(0.1, 0.06) == "no difference detected"
    assert cmp.adjusted_verdict(0.1, 0.01, higher=False) == "behind"


def test_compare_prints_the_p_that_decides_and_mcnemar_beside_it():
    rng = np.random.default_rng(0)
    a = rng.random((3, 64)) < 0.9
    b = a & (rng.random((3, 64)) < 0.6)
    rows = lambda name, x: pd.DataFrame([{"m": name, "seed": s, "pp_fidelity": cmp.encode(x[s])} for s in range(3)])
    (r,) = cmp.compare_in(pd.concat([rows("a", a), rows("b", b)]), "m", "a", "b", metrics=("prompt_fidelity",))
    assert r["verdict"] == "ahead" and r["p"] < 0.05 and r["mcnemar_p"] < 1e-6 and r["seeds"] == "0 1 2"
    assert "p = " in cmp.sentence(r) and "McNemar" not in cmp.sentence(r)


# ---- the numerical regime in the run cache's key


def test_regime_names_threads_and_kernels(monkeypatch):
    import torch

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = ex.regime()
        torch.set_num_threads(2)
        r2 = ex.regime()
    finally:
        torch.set_num_threads(n)
    assert r1 != r2 and "-t1-" in r1 and "-t2-" in r2 and "mkl-avx2" in r1 and "dnnl-avx2" in r1
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS")
    assert "mkl-auto-" in ex.regime()


def test_rows_of_another_regime_are_recomputed_never_reused_and_kept_in_the_file(tmp_path, monkeypatch):
    ev = types.SimpleNamespace(model_dir=str(tmp_path), num_prompts=2, prompts=["a", "b"])
    s = ex.Setting(method="magnitude", sparsity=0.5)
    tag = ex.cache_tag(ev)
    assert tag.endswith("/" + ex.regime())
    other = tag.rsplit("/", 1)[0] + "/torch0-t9-aten-x-mkl-x-dnnl-x"
    legacy = tag.rsplit("/", 1)[0]  # rows written before the regime was recorded
    csv = tmp_path / "runs.csv"
    pd.DataFrame([{"method": "magnitude", "seed": 0, "psnr": 1.0, "key": f"{other}|{s.key(0)}"},
                  {"method": "magnitude", "seed": 0, "psnr": 2.0, "key": f"{legacy}|{s.key(0)}"}]).to_csv(csv, index=False)
    calls = []
    monkeypatch.setattr(ex, "run_setting", lambda ev_, s_, sd, progress=False: calls.append(sd) or
                        {"method": s_.method, "seed": sd, "psnr": 3.0})
    df = ex.run_grid([s], [0], str(csv), evaluator=ev, progress=False)
    assert calls == [0] and list(df.psnr) == [3.0]  # recomputed under this regime
    kept = pd.read_csv(csv)
    assert sorted(kept.psnr) == [1.0, 2.0, 3.0]  # the other rows stay, as a record
    ex.run_grid([s], [0], str(csv), evaluator=ev, progress=False)
    assert calls == [0]  # now cached


def test_sparsegpt_and_obs_diff_uniform_give_bit_identical_rows():
    """SparseGPT is OBS-Diff's solver with uniform weights: under one regime their study rows are identical in every
    measured value (weights, masks, images, metrics), not only close."""
    ev = ex.Evaluator(num_prompts=4)
    rows = {}
    for name, s in (("sparsegpt", ex.Setting(method="sparsegpt", num_calib=2, calib_steps=2, packages=2)),
                    ("uniform", ex.Setting(method="obs-diff", weighting="uniform", num_calib=2, calib_steps=2, packages=2))):
        rows[name] = ex.run_setting(ev, s, seed=0)
    skip = {"method", "weighting", "prune_s", "calibration_s", "solve_s", "generate_s"}
    a, b = rows["sparsegpt"], rows["uniform"]
    assert set(a) == set(b)
    diff = {k: (a[k], b[k]) for k in a if k not in skip and not (a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]))}
    assert not diff
    assert a["pp_psnr"] and a["mean_rel_error"] > 0


# ---- families, replication and claims


def _verdict_rows(effects, seeds):
    """runs.csv-like rows for every setting of the families: obs-diff's outcomes shifted by ``effects[b]``."""
    fams = vd.families(16)
    rng = np.random.default_rng(0)
    base = {sd: rng.normal(30, 2, 32) for sd in seeds}
    rows = []
    for s in vd.settings_of(fams):
        for sd in seeds:
            shift = 0.0 if s.method in ("obs-diff", "dense") else effects.get(s.method, 0.0)
            x = base[sd] - shift + np.random.default_rng(zlib.crc32(s.key(sd).encode())).normal(0, 0.01, 32)
            fid = (x > 30).astype(float)
            rows.append({"seed": sd, "key": "tag|" + s.key(sd), "pp_psnr": cmp.encode(x, 3), "pp_fidelity": cmp.encode(fid)})
    return fams, pd.DataFrame(rows)


def test_families_are_judged_after_holm_and_replicated_on_held_out_seeds(tmp_path):
    from obslib.study.claims import write_claims

    seeds = list(vd.STUDY_SEEDS) + list(vd.HELDOUT_SEEDS)
    fams, df = _verdict_rows({"wanda": 3.0, "dsnot": 3.0, "magnitude": 5.0, "l1-norm": 4.0, "sparsegpt": 0.0}, seeds)
    j = vd.judge(df, fams)
    assert set(j.n_seeds) == {5} and set(j.heldout_n_seeds) == {3}
    psnr = j[j.metric == "psnr"]
    base = psnr[psnr.b.isin(vd.BASELINES + ("l1-norm",))]
    assert (base.verdict_holm == "ahead").all() and (base.replicates == "yes").all()
    w = psnr[psnr.b == "uniform"]
    assert (w.verdict_holm == cmp.NONE).all()
    t = vd.claim_table(j).set_index("claim")
    assert t.loc[fams[0].claim, "verdict (study seeds, Holm)"] in ("reproduced", "partly reproduced")
    assert t.loc[fams[-1].claim, "verdict (study seeds, Holm)"] == "not supported (no difference detected)"
    j.to_csv(tmp_path / "verdicts.csv", index=False)
    text = write_claims(str(tmp_path), out=str(tmp_path / "claims.md"))
    assert "Holm p = " in text and "held-out" in text and "5 seeds, seeds and prompts resampled" in text
    line = [x for x in text.splitlines() if x.startswith(f"| {fams[-1].claim}")][0]
    assert "not supported (no difference detected)" in line and "2 of 2" not in line or "4 of 4" in line


def test_a_flipped_held_out_effect_does_not_replicate():
    study = {"diff": 0.05, "verdict_holm": "ahead"}
    assert vd.replicates(study, {"diff": -0.03, "verdict": cmp.NONE, "verdict_holm": cmp.NONE}) == "no"
    assert vd.replicates(study, {"diff": 0.02, "verdict": cmp.NONE, "verdict_holm": cmp.NONE}) == "weaker"
    assert vd.replicates(study, {"diff": 0.04, "verdict": "ahead", "verdict_holm": cmp.NONE}) == "yes"
    none = {"diff": 0.01, "verdict_holm": cmp.NONE}
    assert vd.replicates(none, {"diff": -0.2, "verdict": "behind", "verdict_holm": "behind"}) == "no"


def test_family_words_for_the_paper_and_for_our_hypotheses():
    assert vd.family_verdict(["ahead", "ahead"], "paper") == "reproduced"
    assert vd.family_verdict(["ahead", cmp.NONE], "paper") == "partly reproduced"
    assert vd.family_verdict(["behind", cmp.NONE], "ours") == "not supported"
    # detected both ways (the premise's PSNR readings): neither word alone
    assert vd.family_verdict(["ahead", "behind"], "ours") == "mixed: supported on some comparisons, not supported on others"
    assert vd.family_verdict([cmp.NONE], "ours") == "not supported (no difference detected)"
    # a claim of no difference (the paper's "more packages, same quality") holds while nothing is told apart
    assert vd.family_verdict([cmp.NONE, cmp.NONE], "paper", expect=cmp.NONE).startswith("reproduced as far as")
    assert vd.family_verdict([cmp.NONE, "behind"], "paper", expect=cmp.NONE) == "not reproduced: a difference is detected"
    assert vd.family_verdict(["ahead"], "ours", expect=cmp.NONE) == "not supported: a difference is detected"


def test_pixel_mse_is_the_pooled_reading_of_the_same_per_image_psnr():
    # two images: one barely changed (60 dB), one changed a lot (20 dB), against two changed a little (30 dB each):
    # the mean of dB prefers the first setting, the pooled MSE the second
    a = pd.DataFrame({"seed": [0], "pp_psnr": [cmp.encode([60.0, 20.0], 3)]})
    b = pd.DataFrame({"seed": [0], "pp_psnr": [cmp.encode([30.0, 30.0], 3)]})
    xa, _ = cmp.outcomes(a, "pixel_mse")
    xb, _ = cmp.outcomes(b, "pixel_mse")
    np.testing.assert_allclose(xa, [[1e-3, 10.0]], rtol=1e-9)  # ×10⁻³: 1e-6 and 1e-2
    assert cmp.outcomes(a, "psnr")[0].mean() > cmp.outcomes(b, "psnr")[0].mean()
    assert xa.mean() > xb.mean() and cmp.PAIRED["pixel_mse"][1] is False  # lower MSE is better: b is ahead
    from obslib.study.timesteps import pooled_psnr

    assert -10 * np.log10(xa.mean() / 1e3) == pytest.approx(pooled_psnr([60.0, 20.0]))


def test_the_premise_family_pairs_window_rows_of_one_prune():
    from obslib.study.timesteps import EQUAL_PROBE, window_tail

    fam = vd.premise_family(16, 0.2)
    assert fam.key == "premise" and fam.metrics == vd.PREMISE_METRICS and fam.source == "paper"
    assert [p.context for p in fam.pairs] == ["Halves, 50% unstructured", "Halves, 20% structured",
                                              "Halves, equal-size noise"]
    for p in fam.pairs:
        assert p.setting_a == p.setting_b and (p.a, p.b) == ("steps 11-20", "steps 1-10")
    assert fam.pairs[0].tail_a == window_tail((11, 20)) == "|window=11-20"
    assert fam.pairs[2].tail_b == window_tail((1, 10), EQUAL_PROBE) == f"|window=1-10|probe={EQUAL_PROBE}"
    assert vd.settings_of([fam]) == [ex.Setting(method="dense", num_calib=16)]  # no study rows of their own
    # rows: the study row and both windows of one setting; only the window rows are picked, each by its tail
    s = fam.pairs[0].setting_a
    rows = []
    for sd in (0, 1):
        for tail, v in (("", 10.0), ("|window=1-10", 20.0), ("|window=11-20", 40.0),
                        (f"|window=11-20|probe={EQUAL_PROBE}", 30.0), (f"|window=1-10|probe={EQUAL_PROBE}", 35.0)):
            rows.append({"seed": sd, "key": f"tag|{s.key(sd)}{tail}", "pp_psnr": cmp.encode([v + sd] * 4, 3),
                         "pp_fidelity": cmp.encode([1, 1, 0, 1]), "pp_ssim": cmp.encode([0.9] * 4, 3)})
    df = pd.DataFrame(rows)
    got = vd._score(df, vd.Family("premise", "c", "paper", "", [fam.pairs[0], fam.pairs[2]],
                                  metrics=("psnr", "pixel_mse")), (0, 1))
    by = {(r["context"], r["metric"]): r for r in got}
    assert by["Halves, 50% unstructured", "psnr"]["diff"] == pytest.approx(20.0)
    assert by["Halves, equal-size noise", "psnr"]["diff"] == pytest.approx(-5.0)
    mse = by["Halves, 50% unstructured", "pixel_mse"]
    assert mse["diff"] < 0 and mse["verdict"] == "ahead"  # less pixel damage when pruned only late


def test_window_rows_come_from_chapter_08s_caches_beside_the_run_cache(tmp_path, monkeypatch):
    """``run`` asks chapter 08's injection and equal-size probe for exactly the halves the premise family pairs, on
    the seeds asked, in the CSVs beside runs.csv; no study row is asked for the window pairs."""
    from obslib.study import timesteps as ts

    asked = []

    def fake(kind):
        def f(settings, seeds, windows, out_csv, **kw):
            asked.append((kind, [s.pattern for s in settings], list(seeds), windows, os.path.basename(out_csv)))
            return pd.DataFrame({"key": [f"{kind}|{s.key(0)}" for s in settings], "seed": 0})
        return f

    monkeypatch.setattr(ts, "run_injection", fake("inj"))
    monkeypatch.setattr(ts, "run_equal_probe", fake("probe"))
    monkeypatch.setattr(vd, "run_grid", lambda settings, seeds, csv, **kw: pd.DataFrame(
        {"key": [f"grid|{s.key(0)}" for s in settings], "seed": 0}))
    fam = vd.premise_family(16, 0.2)
    vd.run([fam], [0, 1], str(tmp_path / "runs.csv"), more_seeds={"premise": [5]})
    assert asked[:2] == [("inj", ["unstructured", "structured"], [0, 1], [(1, 10), (11, 20)], vd.INJECTION_CSV),
                         ("probe", ["unstructured"], [0, 1], [(1, 10), (11, 20)], vd.PROBE_CSV)]
    assert [a[2] for a in asked[2:]] == [[5], [5]]  # the family's further seeds, the same way


def test_noise_floor_reuses_its_own_lines_for_the_same_two_regimes(tmp_path, monkeypatch):
    import torch

    calls = {"prune": 0}

    class Ev:
        model_dir = "m"

        def __init__(self, **kw):
            pass

    def grid(settings, seeds, csv, **kw):
        return pd.DataFrame([{"seed": sd, "key": f"t{torch.get_num_threads()}|{settings[0].key(sd)}",
                              "prompt_fidelity": 0.5, "psnr": 30.0, "pp_psnr": cmp.encode([30.0, 31.0], 3),
                              "pp_fidelity": cmp.encode([1, 0])} for sd in seeds])

    def pruned(model_dir, s, sd):
        calls["prune"] += 1
        return types.SimpleNamespace(transformer=torch.nn.Linear(4, 4, bias=False)), {}

    monkeypatch.setattr(ex, "Evaluator", Ev)
    monkeypatch.setattr(vd, "run_grid", grid)
    monkeypatch.setattr(ex, "pruned_pipeline", pruned)
    s = ex.Setting(method="obs-diff", sparsity=0.5)
    floor = tmp_path / "09_noise_floor.csv"
    first, _ = vd.noise_floor(s, [0, 1], (1, 2), str(tmp_path / "runs.csv"), str(floor))
    assert calls["prune"] == 4 and list(first.seed) == [0, 1]
    first.assign(setting="50% unstructured").to_csv(floor, index=False)
    again, c = vd.noise_floor(s, [0, 1, 2], (1, 2), str(tmp_path / "runs.csv"), str(floor))
    assert calls["prune"] == 6  # only seed 2, under each regime
    assert list(again.seed) == [0, 1, 2] and len(c) == 2
    assert again.iloc[:2].mask_positions_flipped.tolist() == first.mask_positions_flipped.tolist()
