"""Timestep-awareness: weighting strength, one-sided schemes, the step switch, per-step Hessians, the
sensitivity weighting's probe, and the CLI's handling of them."""
import json
import numpy as np
import pandas as pd
import pytest
import torch

import obslib
from obslib.errors import UsageError
from obslib.evaluate import generate
from obslib.hessian import LayerStats
from obslib.sensitivity import alphas_from_harm, measure
from obslib.shapes import prompts
from obslib.study.timesteps import hessian_spread, mask_shift, strength_label, strength_settings, weightings
from obslib.weighting import alpha_range, timestep_weights
from obslib.windows import StepSwitch, equal_windows, halves, window_steps


# ------------------------------------------------------------------ weighting strength and one-sided schemes
def test_alpha_range_has_the_ratio_and_mean_one():
    assert alpha_range(1.5) == pytest.approx((0.8, 1.2))  # the paper's defaults
    for r in (4, 16, 100, 1e6, 0.25):
        lo, hi = alpha_range(r)
        assert hi / lo == pytest.approx(r) and (lo + hi) / 2 == pytest.approx(1.0)
    a = timestep_weights("log-decrease", 20, *alpha_range(0.25))  # a ratio below 1 reverses the scheme
    assert a[0] < a[-1]
    for bad in (0, -1, 2e6, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="alpha ratio .* outside the allowed 1e-06 to 1e\\+06"):
            alpha_range(bad)


def test_half_schemes_weigh_one_half():
    lo, hi = alpha_range(1e6)
    f = timestep_weights("first-half", 5, lo, hi)
    s = timestep_weights("second-half", 5, lo, hi)
    assert f == pytest.approx([hi, hi, hi, lo, lo]) and s == pytest.approx([lo, lo, lo, hi, hi])
    assert timestep_weights("first-half", 4, 0.8, 1.2) == pytest.approx([1.2, 1.2, 0.8, 0.8])


def test_sensitivity_has_no_formula():
    with pytest.raises(UsageError, match="measured while pruning"):
        timestep_weights("sensitivity", 10)


def test_strength_grid_and_labels():
    grid = strength_settings(obslib.study.experiments.Setting(sparsity=0.6))
    assert len(grid) == 2 * 4 + 2
    rows = [{"weighting": s.weighting, **{f"extra_{k}": v for k, v in s.extra.items()}} for s in grid]
    labels = [strength_label(pd.Series(r)) for r in rows]
    assert labels[:4] == ["log-decrease ×1.5", "log-decrease ×4", "log-decrease ×16", "log-decrease ×100"]
    assert labels[-2:] == ["first-half only", "second-half only"]
    assert set(weightings(20)) == set(labels)


# ------------------------------------------------------------------ windows and the step switch
def test_windows_cover_the_trajectory():
    assert equal_windows(20, 5) == [(1, 4), (5, 8), (9, 12), (13, 16), (17, 20)]
    assert equal_windows(7, 3) == [(1, 3), (4, 5), (6, 7)]
    assert halves(20) == [(1, 10), (11, 20)] and halves(5) == [(1, 3), (4, 5)]
    assert window_steps((3, 5), 10) == {3, 4, 5} and window_steps([], 10) == frozenset()
    for bad, needle in (((0, 3), "outside the trajectory's steps 1..10"), ((4, 11), "outside"), ((5, 4), "outside"),
                        ([2, 12], "outside")):
        with pytest.raises(UsageError, match=needle):
            window_steps(bad, 10)
    with pytest.raises(UsageError, match="6 windows cannot split 5 steps"):
        equal_windows(5, 6)


def test_step_switch_full_window_is_the_pruned_model_and_empty_is_the_dense(tiny_pipe_dir):
    dense = obslib.load_pipeline(tiny_pipe_dir)
    pruned = obslib.load_pipeline(tiny_pipe_dir)
    obslib.prune(pruned, obslib.PruneConfig(method="magnitude", sparsity=0.7, progress=False, measure_error=False))
    ps, steps = prompts("heldout", 3), 3

    def images(pipe):
        return generate(pipe, ps, seed=5, steps=steps, progress=False)

    ref_dense, ref_pruned = images(dense), images(pruned)
    assert not np.array_equal(ref_dense, ref_pruned)
    with StepSwitch(dense.transformer, pruned.transformer, (1, steps), steps) as sw:
        full = images(dense)
    assert sw.calls == steps and np.array_equal(full, ref_pruned)
    with StepSwitch(dense.transformer, pruned.transformer, [], steps):
        empty = images(dense)
    assert np.array_equal(empty, ref_dense)
    with StepSwitch(dense.transformer, pruned.transformer, (1, 1), steps):
        first = images(dense)
    assert not np.array_equal(first, ref_dense) and not np.array_equal(first, ref_pruned)
    assert "forward" not in vars(dense.transformer)  # the switch is gone after the block
    assert np.array_equal(images(dense), ref_dense)


def test_step_switch_refuses_an_uneven_count_and_nesting():
    den, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="called 1 times, not a multiple of 2 steps"):
        with StepSwitch(den, other, (1, 1), 2):
            den(torch.zeros(1, 2))
    with StepSwitch(den, other, (2, 2), 2):
        with pytest.raises(RuntimeError, match="already replaced"):
            StepSwitch(den, other, (1, 1), 2).__enter__()
        x = torch.ones(1, 2)
        assert torch.equal(den(x), torch.nn.Linear.forward(den, x)) and torch.equal(den(x), other(x))


# ------------------------------------------------------------------ per-step Hessians
def test_weighted_H_from_per_step_sums_equals_weighted_accumulation():
    g = torch.Generator().manual_seed(0)
    alphas = [3.0, 1.0, 0.25]
    st = LayerStats(4, "cpu", per_step=True)
    xs = [torch.randn(n, 4, generator=g) * (t + 1) for t, n in enumerate((5, 7, 9))]
    for t, (x, a) in enumerate(zip(xs, alphas), 1):
        st.add(x, a, t)
    assert torch.allclose(st.weighted_H(alphas), st.H, rtol=1e-5)
    expected = 2 * sum(a * x.t() @ x for a, x in zip(alphas, xs)) / sum(a * x.shape[0] for a, x in zip(alphas, xs))
    assert torch.allclose(st.H, expected, rtol=1e-5)
    assert torch.allclose(st.step_H(2), 2 * xs[1].t() @ xs[1] / 7, rtol=1e-5)
    spread = hessian_spread({"l": st})
    assert list(spread.step) == [1, 2, 3] and (spread.rel_distance > 0).all()
    assert spread.energy.iloc[0] < 1 < spread.energy.iloc[2]  # the inputs grow with the step here


def test_identical_steps_give_no_spread_and_no_mask_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    st = LayerStats(16, "cpu", per_step=True)
    for t in (1, 2, 3):
        st.add(x, 1.0, t)
    assert np.allclose(hessian_spread({"l": st}).rel_distance, 0, atol=1e-6)
    den = torch.nn.Module()
    den.l = torch.nn.Linear(16, 8, bias=False)
    df = mask_shift(den, {"l": st}, {"log-decrease ×100": timestep_weights("log-decrease", 3, *alpha_range(100))})
    assert df.mask_differs.iloc[0] == 0 and df.h_distance.iloc[0] < 1e-6
    assert df.error_change_uniform_H.iloc[0] == pytest.approx(0, abs=1e-6)


def test_a_strong_weighting_moves_the_mask_when_steps_differ():
    g = torch.Generator().manual_seed(2)
    st = LayerStats(16, "cpu", per_step=True)
    scales = [torch.ones(16), torch.linspace(0.1, 3, 16)]  # the two steps weigh the inputs differently
    for t, s in enumerate(scales, 1):
        st.add(torch.randn(256, 16, generator=g) * s, 1.0, t)
    den = torch.nn.Module()
    den.l = torch.nn.Linear(16, 8, bias=False)
    torch.nn.init.normal_(den.l.weight, generator=g)
    w = {"first-half only": timestep_weights("first-half", 2, *alpha_range(1e6)),
         "log-decrease ×1.5": timestep_weights("log-decrease", 2, 0.8, 1.2)}
    df = mask_shift(den, {"l": st}, w).set_index("weighting")
    assert df.loc["first-half only", "mask_differs"] > df.loc["log-decrease ×1.5", "mask_differs"]
    assert df.loc["first-half only", "mask_differs"] > 0.05
    # on its own H a weighting's solution is never worse than uniform's; on the uniform H never better (OBS is
    # near-optimal for the H it is given)
    assert (df.error_change_own_H <= 1e-6).all() and (df.error_change_uniform_H >= -1e-6).all()


# ------------------------------------------------------------------ the sensitivity weighting
def test_alphas_from_harm():
    a = alphas_from_harm([0.0, 1.0, 3.0])
    assert np.mean(a) == pytest.approx(1.0) and a[2] / a[1] == pytest.approx(3.0) and a[0] == pytest.approx(3e-6 / (4 / 3 + 1e-6), rel=1e-3)
    assert alphas_from_harm([0.0, 0.0]) == [1.0, 1.0]
    assert alphas_from_harm([float("nan"), 1.0]) == [1.0, 1.0]


def test_sensitivity_prune_reports_its_probe_and_is_deterministic(tiny_pipe_dir):
    reps, weights = [], []
    for _ in range(2):
        pipe = obslib.load_pipeline(tiny_pipe_dir)
        rep = obslib.prune(pipe, obslib.PruneConfig(weighting="sensitivity", sparsity=0.5, prompts=prompts("train", 4),
                                                    batch_size=2, packages=2, sensitivity_prompts=2,
                                                    sensitivity_windows=2, progress=False))
        reps.append(rep)
        weights.append(torch.cat([p.flatten() for p in pipe.transformer.parameters()]))
    rep = reps[0]
    s = rep["sensitivity"]
    assert rep["weighting"] == "sensitivity" and len(rep["timestep_weights"]) == rep["steps"] == 3
    assert s["windows"] == [[1, 2], [3, 3]] and s["probe_runs"] == 3 and s["probe_prompts"] == 2
    assert all(h > 0 for h in s["harm_per_window"]) and rep["timestep_weights"] == s["alphas"]
    assert np.mean(s["alphas"]) == pytest.approx(1.0) and rep["timings"]["sensitivity_probe_s"] > 0
    assert reps[1]["timestep_weights"] == rep["timestep_weights"] and torch.equal(weights[0], weights[1])
    json.dumps(rep)


def test_probe_leaves_the_model_unchanged_and_measures_what_it_says(tiny_pipe):
    from obslib.sampling import CalibrationRunner

    den = tiny_pipe.transformer
    before = {k: v.clone() for k, v in den.state_dict().items()}
    cfg = obslib.PruneConfig(sparsity=0.5, sensitivity_windows=3).validate()
    runner = CalibrationRunner(tiny_pipe, prompts("train", 2), 3, 4.0, 0, 2, {"max_sequence_length": 8}, False)
    probe = measure(runner, den, 3, [0, 1, 2, 3], cfg)
    assert all(torch.equal(before[k], v) for k, v in den.state_dict().items())
    assert probe["windows"] == [[1, 1], [2, 2], [3, 3]] and probe["harm_per_step"] == probe["harm_per_window"]
    assert probe["alphas"] == pytest.approx(list(np.array(probe["harm_per_step"]) / np.mean(probe["harm_per_step"])))


# ------------------------------------------------------------------ command line (in process: no interpreter start-up)
def run_cli(capsys, *args):
    from obslib.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("ratio", ["0", "-2", "2e6", "nan"])
def test_bad_alpha_ratio_is_one_line_exit_2(tiny_pipe_dir, tmp_path, capsys, ratio):
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "prune", tiny_pipe_dir, "--alpha-ratio", ratio, "--num-prompts", "2", "--out", str(out))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "alpha ratio" in lines[0] and "1e-06 to 1e+06" in lines[0], err
    assert not out.exists()


def test_weighting_with_a_method_that_ignores_it_gets_one_note(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "m"
    rc, err = run_cli(capsys, "prune", tiny_pipe_dir, "--method", "magnitude", "--weighting", "sensitivity",
                      "--alpha-ratio", "4", "--sparsity", "0.5", "--num-prompts", "2", "--steps", "2", "--out", str(out))
    assert rc == 0, err
    notes = [x for x in err.splitlines() if x.startswith("obslib: note:")]
    assert notes == ["obslib: note: --weighting / --alpha-ratio is ignored by magnitude (it reads no calibration "
                     "statistics)"]
    rep = json.load(open(out / "pruning_report.json"))
    assert "sensitivity" not in rep
    rc, err = run_cli(capsys, "prune", tiny_pipe_dir, "--method", "sparsegpt", "--weighting", "cosine", "--sparsity",
                      "0.5", "--num-prompts", "2", "--steps", "2", "--packages", "1", "--out", str(tmp_path / "s"))
    assert rc == 0 and "--weighting is ignored by sparsegpt (it always weighs the steps uniform)" in err


def test_cli_alpha_ratio_reaches_the_report(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "r"
    rc, err = run_cli(capsys, "prune", tiny_pipe_dir, "--weighting", "first-half", "--alpha-ratio", "100", "--sparsity",
                      "0.5", "--num-prompts", "2", "--steps", "4", "--packages", "1", "--out", str(out), "--quiet")
    assert rc == 0, err
    rep = json.load(open(out / "pruning_report.json"))
    lo, hi = alpha_range(100)
    assert rep["timestep_weights"] == pytest.approx([hi, hi, lo, lo])


@pytest.mark.parametrize("value, needle", [("0-3", "outside the trajectory's steps 1..2"), ("2-5", "outside"),
                                           ("2-1", "outside"), ("a-b", "expected FIRST-LAST"), ("3", "expected FIRST-LAST")])
def test_evaluate_bad_window_is_one_line_exit_2(tiny_pipe_dir, tmp_path, capsys, value, needle):
    from obslib.cli import main

    out = tmp_path / "m.json"
    argv = ["evaluate", tiny_pipe_dir, "--reference", tiny_pipe_dir, "--num-prompts", "4", "--steps", "2",
            "--pruned-steps", value, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("obslib: error:") and needle in err[0] and not out.exists()


def test_evaluate_window_needs_a_reference(tiny_pipe_dir, tmp_path, capsys):
    from obslib.cli import main

    assert main(["evaluate", tiny_pipe_dir, "--num-prompts", "4", "--steps", "2", "--pruned-steps", "1-1",
                 "--out", str(tmp_path / "m.json")]) == 2
    assert "give --reference DENSE_DIR" in capsys.readouterr().err


def test_evaluate_full_window_scores_the_pruned_model(tiny_pipe_dir, tmp_path):
    """Pruned in every step = the pruned model's own images; an early window is closer to the dense images."""
    from obslib.cli import main

    pruned = tmp_path / "p"
    assert main(["prune", tiny_pipe_dir, "--method", "magnitude", "--sparsity", "0.7", "--out", str(pruned),
                 "--quiet"]) == 0
    res = {}
    for name, extra in (("plain", []), ("all", ["--pruned-steps", "1-3"]), ("first", ["--pruned-steps", "1-1"])):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", str(pruned), "--reference", tiny_pipe_dir, "--num-prompts", "4", "--steps", "3",
                     "--out", str(out), *extra]) == 0
        res[name] = json.load(open(out))
    assert res["all"]["psnr"] == res["plain"]["psnr"] and res["all"]["pruned_steps"] == [1, 3]
    assert res["first"]["psnr"] != res["plain"]["psnr"]


def test_equal_probe_has_the_asked_relative_size_and_the_meter_keeps_the_dense_trajectory(tiny_pipe_dir):
    from obslib.study.timesteps import ErrorMeter, OutputNoise

    dense = obslib.load_pipeline(tiny_pipe_dir)
    twin = obslib.load_pipeline(tiny_pipe_dir).transformer
    pruned = obslib.load_pipeline(tiny_pipe_dir)
    obslib.prune(pruned, obslib.PruneConfig(method="magnitude", sparsity=0.7, progress=False, measure_error=False))
    ps, steps = prompts("heldout", 3), 3

    def images(pipe):
        return generate(pipe, ps, seed=5, steps=steps, progress=False)

    ref = images(dense)
    meter = ErrorMeter(twin, pruned.transformer, steps)
    with StepSwitch(dense.transformer, meter, (1, steps), steps):
        metered = images(dense)
    assert np.array_equal(metered, ref)  # the meter returns the dense prediction: the trajectory is the dense one
    per_step = meter.per_step()
    assert len(per_step) == steps and all(0.01 < e < 10 for e in per_step)

    # the probe's noise has exactly the asked size relative to the prediction, sample by sample, and is reproducible
    x = torch.randn(2, 4, 8, 8)
    probe = OutputNoise(lambda v: (v,), 0.25, seed=3)
    out = probe(x)[0]
    rel = ((out - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1))
    assert torch.allclose(rel, torch.full((2,), 0.25), atol=1e-5)
    assert torch.equal(OutputNoise(lambda v: (v,), 0.25, seed=3)(x)[0], out)
    assert not torch.equal(probe(x)[0], out)  # the next call draws new noise
    with StepSwitch(dense.transformer, OutputNoise(twin, 0.0, seed=1), (1, steps), steps):
        assert np.array_equal(images(dense), ref)  # size 0: the dense images, bit for bit
    with StepSwitch(dense.transformer, OutputNoise(twin, 0.3, seed=1), (2, 2), steps):
        assert not np.array_equal(images(dense), ref)


def test_premise_metrics_read_the_same_images_every_way():
    from obslib.study.compare import encode
    from obslib.study.timesteps import DENSE, pooled_psnr, premise_metrics

    def row(window, seed, psnr, fid, att, first=1, last=2):
        return {"setting": "s", "window": window, "seed": seed, "first": first, "last": last, "fid": 10.0,
                "pp_psnr": encode(psnr, 3), "pp_ssim": encode([0.9] * len(psnr), 4), "pp_fidelity": encode(fid),
                "pp_attributes": encode(att, 4)}

    rows = [row(DENSE, sd, [0.0, 0.0], [1, 0], [1.0, 0.5], 0, 0) for sd in (0, 1)]
    # window A: one image badly changed (20 dB), the other untouched (60 dB); its reading changes on one image
    rows += [row("A", 0, [20.0, 60.0], [0, 0], [0.75, 0.5]), row("A", 1, [60.0, 60.0], [1, 0], [1.0, 0.5])]
    # window B: every image a little (35 dB), no reading changes
    rows += [row("B", sd, [35.0, 35.0], [1, 0], [1.0, 0.5], 3, 4) for sd in (0, 1)]
    m = premise_metrics(pd.DataFrame(rows)).set_index("window")
    assert m.loc["A", "mean_db"] == pytest.approx(50.0) and m.loc["B", "mean_db"] == pytest.approx(35.0)
    assert m.loc["A", "pooled_db"] == pytest.approx(pooled_psnr([20, 60, 60, 60]))
    assert m.loc["A", "pooled_db"] < m.loc["B", "pooled_db"] < m.loc["A", "mean_db"]  # the two readings disagree
    assert m.loc["A", "median_db"] == 60.0 and m.loc["A", "below_30db"] == 0.25 and m.loc["B", "below_30db"] == 0.0
    assert m.loc["A", "fidelity_flips"] == 0.25 and m.loc["B", "fidelity_flips"] == 0.0
    assert m.loc["A", "composition_changed"] == 0.25 and m.loc["B", "composition_changed"] == 0.0
    assert m.loc["A", "images"] == 4


def test_which_half_hurts_more_reads_each_metric_its_own_way():
    from obslib.study.timesteps import which_half_hurts_more

    g = pd.DataFrame({"window": ["steps 1-10", "steps 11-20"], "mean_db": [40.0, 35.0], "below_30db": [0.3, 0.0]})
    assert which_half_hurts_more(g, "mean_db") == "the second half"  # lower dB late: the late error hurts more
    assert which_half_hurts_more(g, "below_30db", higher=False) == "the first half"
    assert which_half_hurts_more(g, "ssim") is None and which_half_hurts_more(g.iloc[:1], "mean_db") is None
