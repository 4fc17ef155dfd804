"""Propagated calibration (``calibration="propagate"``): checked against an independent reference that
re-runs the whole denoiser on its recorded dense inputs, against resample where they must agree (K = 1),
spilled to disk against in RAM, resumed against uninterrupted, and refused where it cannot work."""
import os

import pytest
import torch
import torch.nn.functional as F

import obslib
from obslib.config import PruneConfig
from obslib.sampling import sampling_defaults
from obslib.archs import iter_blocks, spec_for
from obslib.hessian import Calibration
from obslib.io import UsageError
from obslib.packages import layer_units, package_layers, split_packages, structured_units
from obslib.sampling import CalibrationRunner
from obslib.propagate import Propagation
from obslib.shapes import prompts

_SDPA = F.scaled_dot_product_attention
from obslib.weighting import timestep_weights

BASE = dict(prompts=prompts("train", 4), steps=3, batch_size=2, progress=False)


def _weights(pipe):
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def test_package_hessians_equal_a_full_denoiser_rerun_on_recorded_inputs(tiny_pipe):
    """Package 2's statistics from replaying block inputs through its own blocks equal those of running the
    whole (partly pruned) denoiser on the inputs it received during dense sampling."""
    pipe = tiny_pipe
    den = pipe.transformer
    spec = spec_for(den)
    blocks = [b for _, b in iter_blocks(den, spec)]
    units = layer_units(den, spec, list(range(len(blocks))))
    p1, p2 = split_packages(units, 3)[:2]
    assert max(u.block_index for u in p2) > min(u.block_index for u in p1)  # the replay crosses blocks
    steps = 3
    alphas = timestep_weights("log-decrease", steps)
    runner = CalibrationRunner(pipe, BASE["prompts"], steps, sampling_defaults(pipe)["guidance_scale"], 0, 2,
                               progress=False)
    recorded = []  # the reference: every denoiser call's inputs during dense sampling
    h = den.register_forward_pre_hook(lambda m, a, kw: recorded.append({k: v for k, v in kw.items()}),
                                      with_kwargs=True)
    prop = Propagation(blocks, spec.chain, runner.run, alphas, len(runner.batches), progress=False)
    try:
        stats1 = prop.first(den, min(u.block_index for u in p1), package_layers(den, p1))
    finally:
        h.remove()
    assert len(recorded) == len(runner.batches) * steps
    assert len(prop.record) == len(recorded)
    orig = {name: den.get_submodule(name).weight.detach().clone() for name in stats1}
    torch.manual_seed(0)
    for name in stats1:  # "prune" package 1: any change must reach package 2's inputs
        w = den.get_submodule(name).weight
        w.data.mul_((torch.rand_like(w) > 0.5).float())
    layers2 = package_layers(den, p2)
    stats2 = prop.package(min(u.block_index for u in p2), max(u.block_index for u in p2), layers2)

    def rerun():
        ref = Calibration(den, layers2, alphas)
        with ref, torch.no_grad():
            for i, kw in enumerate(recorded):
                if i % steps == 0:
                    ref.begin_run()
                den(**kw)
                if i % steps == steps - 1:
                    ref.end_run()
        return ref

    ref = rerun()
    assert stats2.keys() == ref.stats.keys()
    for name in layers2:
        a, b = stats2[name], ref.stats[name]
        assert a.weight == b.weight and a.tokens == b.tokens
        torch.testing.assert_close(a.xtx, b.xtx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.xsum, b.xsum, rtol=1e-5, atol=1e-5)
    # through the unpruned package 1 the statistics differ: a replay that skipped the pruning would fail above
    for name, w in orig.items():
        den.get_submodule(name).weight.data.copy_(w)
    dense = rerun()
    assert any(not torch.allclose(dense.stats[n].xtx, stats2[n].xtx, rtol=1e-3) for n in layers2)
    prop.close()


def test_one_package_is_exactly_resample(tiny_pipe_dir):
    a, b = obslib.load_pipeline(tiny_pipe_dir), obslib.load_pipeline(tiny_pipe_dir)
    ra = obslib.prune(a, PruneConfig(**BASE, packages=1))
    rb = obslib.prune(b, PruneConfig(**BASE, packages=1, calibration="propagate"))
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rb["calibration"] == "propagate" and rb["replay_block_calls"] == 0
    assert [x["rel_error"] for x in ra["layers"]] == [x["rel_error"] for x in rb["layers"]]


@pytest.mark.parametrize("pattern, sparsity, extra", [("unstructured", 0.5, {}), ("2:4", 0.5, {}), ("structured", 0.25, {}),
                                                      ("structured", 0.25, {"allocation": "global"})])
def test_every_unit_propagate_prunes_runs_and_stays_close_to_resample(tiny_pipe_dir, pattern, sparsity, extra):
    a, b = obslib.load_pipeline(tiny_pipe_dir), obslib.load_pipeline(tiny_pipe_dir)
    den = a.transformer
    spec = spec_for(den)
    ids = list(range(len(iter_blocks(den, spec))))
    n_units = len(layer_units(den, spec, ids)) if pattern != "structured" else None
    k = n_units or 4
    cfg = dict(BASE, pattern=pattern, sparsity=sparsity, packages=k, **extra)
    ra = obslib.prune(a, PruneConfig(**cfg))
    rb = obslib.prune(b, PruneConfig(**cfg, calibration="propagate"))
    assert rb["packages"] == k and rb["replay_block_calls"] > 0
    # a global allocation follows each package's statistics: the same budget, the counts may move by a neuron or two
    assert abs(rb["sparsity_actual"] - ra["sparsity_actual"]) < (0.01 if extra else 1e-9)
    if pattern == "2:4":
        for layer in rb["layers"]:
            w = b.transformer.get_submodule(layer["name"]).weight.reshape(-1, 4)
            assert int((w != 0).sum(1).max()) <= 2
    # the first package is calibrated identically; later ones differ only through the trajectory
    first = [x["name"] for x in rb["layers"]][:1]
    assert all(torch.equal(a.transformer.get_submodule(n).weight, b.transformer.get_submodule(n).weight) for n in first)
    err_a = [x["rel_error"] for x in ra["layers"]]
    err_b = [x["rel_error"] for x in rb["layers"]]
    assert len(err_a) == len(err_b)
    assert sum(err_b) == pytest.approx(sum(err_a), rel=0.5)
    out = b(prompts("heldout", 1), num_inference_steps=2, output_type="latent",
            generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()


def test_spilled_record_equals_record_in_ram(tiny_pipe_dir, tmp_path, capsys):
    a, b = obslib.load_pipeline(tiny_pipe_dir), obslib.load_pipeline(tiny_pipe_dir)
    cfg = dict(BASE, packages=6, calibration="propagate", progress=True)
    obslib.prune(a, PruneConfig(**cfg))
    assert "kept in RAM" in capsys.readouterr().out
    seen = []
    real_add = obslib.propagate.BlockRecord.add

    def spy(self, *args):
        real_add(self, *args)
        seen.append((self.on_disk, os.path.isdir(self.spill_dir) and len(os.listdir(self.spill_dir))))

    import obslib.propagate as pr

    pr.BlockRecord.add = spy
    try:
        obslib.prune(b, PruneConfig(**cfg, record_ram_mb=0, checkpoint_dir=str(tmp_path / "ck")))
    finally:
        pr.BlockRecord.add = real_add
    said = capsys.readouterr().out
    assert "spilled to" in said and "MiB" in said
    assert seen and all(on for on, _ in seen) and max(n for _, n in seen) > 1
    assert not any(n.startswith(".obslib-record-") for n in os.listdir(tmp_path))  # removed after the run
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_propagate_resumes_to_identical_weights(tiny_pipe_dir, tmp_path, monkeypatch):
    import obslib.propagate as pr

    cfg = dict(BASE, packages=5, calibration="propagate", checkpoint_dir=str(tmp_path / "ck"))
    whole = obslib.load_pipeline(tiny_pipe_dir)
    obslib.prune(whole, PruneConfig(**{**cfg, "checkpoint_dir": None}))
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    real, calls = pr.Propagation.package, {"n": 0}

    def dying(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(pr.Propagation, "package", dying)
    with pytest.raises(KeyboardInterrupt):
        obslib.prune(pipe, PruneConfig(**cfg))
    monkeypatch.setattr(pr.Propagation, "package", real)
    assert sorted(os.listdir(tmp_path / "ck")) == ["obslib_checkpoint.json", "pkg-0000", "pkg-0001", "pkg-0002"]
    with pytest.raises(UsageError, match="different configuration"):
        obslib.prune(pipe, PruneConfig(**{**cfg, "calibration": "resample"}, resume=True))
    obslib.prune(pipe, PruneConfig(**cfg, resume=True))
    a, b = _weights(whole), _weights(pipe)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_calibration_and_unet_are_refused(tiny_pipe, tiny_sd_pipe):
    with pytest.raises(UsageError, match="calibration 'replay' is unknown; allowed: resample, propagate"):
        obslib.prune(tiny_pipe, PruneConfig(**BASE, calibration="replay"))
    with pytest.raises(UsageError, match=r"--record-ram-mb -1.0 is outside \[0, 2\*\*40\]"):
        obslib.prune(tiny_pipe, PruneConfig(**BASE, calibration="propagate", record_ram_mb=-1))
    with pytest.raises(UsageError, match="blocks run one after another"):
        obslib.prune(tiny_sd_pipe, PruneConfig(**BASE, calibration="propagate"))


def test_cli_propagate_and_bad_value(tiny_pipe_dir, tmp_path, capsys):
    from obslib.cli import main

    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(prompts("train", 2)))
    out = tmp_path / "out"
    assert main(["prune", tiny_pipe_dir, "--out", str(out), "--prompts", str(pf), "--steps", "2",
                 "--calibration", "replay"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "replay" in err and "propagate" in err and not out.exists()
    assert main(["prune", tiny_pipe_dir, "--out", str(out), "--prompts", str(pf), "--steps", "2", "--packages", "3",
                 "--calibration", "propagate", "--quiet"]) == 0
    import json

    rep = json.loads((out / "pruning_report.json").read_text())
    assert rep["calibration"] == "propagate" and rep["packages"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".obslib")]


@pytest.mark.parametrize("arch", ["sd3.5", "flux", "dit", "pixart"])
@pytest.mark.parametrize("pattern", ["unstructured", "structured"])
def test_propagate_equals_resample_when_the_trajectory_is_fixed(arch, pattern):
    """With calibration inputs that do not depend on the model's own outputs (no sampling trajectory),
    resample and propagate see the same activations, so they must prune identically: this checks each
    table's ``chain`` (Flux across its double- to single-stream blocks) and the replay for every family."""
    from test_archs import BUILDERS, STEPS, _calibrate

    from obslib.driver import prune_model

    pruned = []
    for calibration in ("resample", "propagate"):
        torch.manual_seed(0)
        model, inputs = BUILDERS[arch]()
        model.eval()
        spec = spec_for(model)
        ids = list(range(len(iter_blocks(model, spec))))
        n = len(layer_units(model, spec, ids) if pattern != "structured" else structured_units(model, spec, ids[1:-1]))
        cfg = PruneConfig(pattern=pattern, sparsity=0.5, packages=n, calibration=calibration, progress=False)
        rep = prune_model(model, _calibrate(model, inputs), cfg, STEPS, component=spec.component, calibration_runs=2)
        pruned.append((model, rep))
    (ma, ra), (mb, rb) = pruned
    assert rb["replay_block_calls"] > 0
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k] == 0, sb[k] == 0), k  # the same masks
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)


def test_unet_cannot_propagate():
    from test_archs import BUILDERS, STEPS, _calibrate

    from obslib.driver import prune_model

    model, inputs = BUILDERS["unet"]()
    model.eval()
    with pytest.raises(UsageError, match="use resample"):
        prune_model(model, _calibrate(model, inputs), PruneConfig(calibration="propagate", progress=False), STEPS,
                    component="unet", calibration_runs=2)


def test_a_killed_runs_spill_directory_is_removed_by_the_next_run(tmp_path):
    from obslib.propagate import _remove_dead_records

    dead = subprocess_dead_pid()
    from test_safety import _marked_dead

    left = tmp_path / f".obslib-record-{dead}-abc123"
    (left / "b0000").mkdir(parents=True)
    (left / "b0000" / "b0000-000000.safetensors").write_bytes(b"0")
    _marked_dead(left, "propagate-record", dead)
    mine = tmp_path / f".obslib-record-{dead}-def456"  # a dead PID's name and marker, but a user's file in it: kept
    (mine / "b0000").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    _marked_dead(mine, "propagate-record", dead)
    alive = tmp_path / f".obslib-record-{os.getpid()}-zzz"
    alive.mkdir()
    user = tmp_path / ".obslib-record-notes"  # not ours by name: never touched
    user.mkdir()
    _remove_dead_records(str(tmp_path))
    assert not left.exists() and alive.exists() and user.exists()
    assert (mine / "notes.txt").read_text() == "mine"


def subprocess_dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("structured", 0.25)])
def test_memo_and_stubs_change_no_bit(tiny_pipe_dir, monkeypatch, pattern, sparsity):
    """One package per unit: replays that reuse settled sub-modules' outputs and skip layers no Hessian reads
    give bitwise the weights of plain replays (every block recomputed up to the package's last layer)."""
    import obslib.driver as driver

    a, b = obslib.load_pipeline(tiny_pipe_dir), obslib.load_pipeline(tiny_pipe_dir)
    den = a.transformer
    spec = spec_for(den)
    ids = list(range(len(iter_blocks(den, spec))))
    k = len(layer_units(den, spec, ids)) if pattern != "structured" else len(structured_units(den, spec, ids[1:-1]))
    cfg = PruneConfig(**BASE, pattern=pattern, sparsity=sparsity, packages=k, calibration="propagate")
    ra = obslib.prune(a, cfg)
    monkeypatch.setattr(driver, "_replay_plan", lambda *args: (None, set()))  # plain replays
    rb = obslib.prune(b, cfg)
    assert ra["replay_memo"]["hits"] > 0 and rb["replay_memo"]["hits"] == 0
    assert ra["replay_memo"]["attention_hits"] > 0  # the attention core computed once per block and entry
    assert F.scaled_dot_product_attention is _SDPA  # the attention function restored
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not any("forward" in m.__dict__ for m in a.transformer.modules())  # every wrapper removed


def test_replay_plan_stubs_own_layers_only_for_one_unit(tiny_pipe):
    from obslib.driver import _replay_plan

    den = tiny_pipe.transformer
    spec = spec_for(den)
    units = layer_units(den, spec, list(range(len(iter_blocks(den, spec)))))
    one = split_packages(units, len(units))
    changing, not_needed = _replay_plan(den, spec, one, 1, False)
    own, later = set(one[1][0].hessian_layers), {n for u in units[2:] for n in u.hessian_layers}
    assert not_needed == own | later and changing == own | later
    two = split_packages(units, len(units) // 2)  # two units a package: the second reads the first's outputs
    changing, not_needed = _replay_plan(den, spec, two, 0, False)
    assert not_needed == {n for u in units[2:] for n in u.hessian_layers}
    assert changing == not_needed | {n for u in units[:2] for n in u.hessian_layers}


def test_module_memo_reuses_only_equal_untouched_calls():
    import torch.nn as nn

    from obslib.propagate import ModuleMemo

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    calls = []
    block[0].register_forward_hook(lambda m, i, o: calls.append(0))
    memo = ModuleMemo(2**20, say=lambda s: None)
    memo.install({0: ("blocks.0", block)}, changing={"blocks.0.1"})  # layer 1 is still to be pruned
    assert "forward" in block[0].__dict__ and "forward" not in block[1].__dict__
    x = torch.randn(3, 4)
    with torch.no_grad():
        memo.set_entry(0)
        y0 = block[0](x)
        memo.set_entry(0)
        y1 = block[0](x.clone())  # equal inputs: kept output, no compute (hooks still run around the call)
        assert y1 is y0 and memo.hits == 1
        y1.add_(1.0)  # changed in place by its reader: the kept output is no longer trusted
        memo.set_entry(0)
        y2 = block[0](x)
        assert memo.hits == 1 and torch.allclose(y2, y0 - 1.0)
        memo.set_entry(0)
        y3 = block[0](x + 1)  # other inputs: computed
        assert memo.hits == 1 and torch.allclose(y3, nn.functional.linear(x + 1, block[0].weight, block[0].bias))
        memo.set_entry(1)  # another record entry has nothing kept
        block[0](x)
        assert memo.hits == 1
    memo.remove()
    assert "forward" not in block[0].__dict__
    assert memo.bytes > 0
    memo.drop_before(1)
    assert memo.bytes == 0 and not memo.store


def test_memo_limit_keeps_what_fits_and_says_so():
    import torch.nn as nn

    from obslib.propagate import ModuleMemo

    said = []
    block = nn.Sequential(nn.Linear(64, 64)).eval()
    memo = ModuleMemo(3 * 64 * 4 * 2, say=said.append)  # room for one call's input and output of 3 rows, not two
    memo.install({0: ("b", block)}, changing=set())
    with torch.no_grad():
        for e in range(3):
            memo.set_entry(e)
            block(torch.randn(3, 64))
    memo.remove()
    assert memo.skipped == 2 and len(said) == 1 and "limit" in said[0] and memo.bytes <= memo.limit


def test_module_memo_keeps_nothing_from_inference_mode():
    import torch.nn as nn

    from obslib.propagate import ModuleMemo

    block = nn.Sequential(nn.Linear(4, 4)).eval()
    memo = ModuleMemo(2**20, say=lambda s: None)
    memo.install({0: ("b", block)}, changing=set())
    x = torch.randn(2, 4)
    with torch.inference_mode():
        for _ in range(2):
            memo.set_entry(0)
            y = block(x)
    memo.remove()
    assert memo.hits == 0 and memo.bytes == 0 and torch.allclose(y, block(x))
