"""Structured parameter budgets (--param-budget), global structured allocation, the unit sparsity map, SlimDiff's
uniform allocation and the report's FLOPs per image."""
import subprocess
import sys

import pytest
import torch

import obslib
from obslib.allocation import shares_for_params, structured_counts, uniform_shares
from obslib.archs import spec_for
from obslib.errors import UsageError
from obslib.flops import flops_per_image
from obslib.packages import structured_units
from obslib.sampling import call_kwargs, sampling_defaults
from obslib.shapes import prompts
from obslib.slimdiff import Group, allocate_uniform, removed_by_unit
from obslib.surgery import group_params, targeted_layers, targeted_size, unit_name

P = prompts("train", 4)


def _prune(d, **kw):
    pipe = obslib.load_pipeline(d)
    kw = {"pattern": "structured", "prompts": P, "steps": 2, "batch_size": 4, "packages": 1, "progress": False, **kw}
    return pipe, obslib.prune(pipe, obslib.PruneConfig(**kw))


def _units(den):
    return structured_units(den, spec_for(den), [1, 2])


def _largest_group(den) -> int:
    return max(group_params(den, u)[1] for u in _units(den) if u.kind == "neurons")


def test_group_params_count_what_removal_takes(tiny_pipe_dir):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    den = pipe.transformer
    units = _units(den)
    before = sum(p.numel() for p in den.parameters())
    per = {unit_name(u): group_params(den, u) for u in units}
    pipe2, rep = _prune(tiny_pipe_dir, method="l1-norm", sparsity=0.1, head_sparsity=0.25, neuron_sparsity=0.125)
    expected = sum(round(0.25 * n) * p if u.kind == "heads" else round(0.125 * n) * p
                   for u in units for n, p in [per[unit_name(u)]])
    assert rep["params_removed"] == before - sum(p.numel() for p in pipe2.transformer.parameters()) == expected


@pytest.mark.parametrize("method", ["obs-diff", "l1-norm", "gradient-flow"])
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_uniform_budget_is_met_by_every_method(tiny_pipe_dir, method, budget):
    extra = {"iterations": 2} if method == "gradient-flow" else {}
    pipe, rep = _prune(tiny_pipe_dir, method=method, sparsity=0.5, param_budget=budget, **extra)
    den0 = obslib.load_pipeline(tiny_pipe_dir).transformer
    total = targeted_size(den0, sorted(set(targeted_layers(den0, spec_for(den0), _units(den0), True))), "parameters")
    assert abs(rep["params_removed"] - budget * total) <= 4 * _largest_group(den0)  # one neuron per FFN at most
    if method != "gradient-flow":
        assert rep["targeted_params_before"] == total
        assert rep["targeted_params_before"] - rep["targeted_params_after"] == rep["params_removed"]
    # every block alike: the same heads and neurons in each
    blocks = pipe.transformer.transformer_blocks
    assert blocks[1].attn.heads == blocks[2].attn.heads
    assert blocks[1].ff.net[2].in_features == blocks[2].ff.net[2].in_features == blocks[2].ff_context.net[2].in_features


def test_uniform_shares_split_heads_then_neurons(tiny_pipe_dir):
    den = obslib.load_pipeline(tiny_pipe_dir).transformer
    units = _units(den)
    total = targeted_size(den, sorted(set(targeted_layers(den, spec_for(den), units, True))), "parameters")
    h, n = uniform_shares(den, units, 0.3, total)
    assert h == 0.3  # round(0.3 x 4) = 1 head per block
    heads = sum(round(h * 4) * group_params(den, u)[1] for u in units if u.kind == "heads")
    neurons = sum(group_params(den, u)[0] * group_params(den, u)[1] for u in units if u.kind == "neurons")
    assert n == pytest.approx((0.3 * total - heads) / neurons)
    assert uniform_shares(den, units, 0.3, total, head_share=0.0) == (0.0, pytest.approx(0.3 * total / neurons))
    with pytest.raises(UsageError, match="the heads alone remove"):
        uniform_shares(den, units, 0.05, total, head_share=0.5)


def test_global_structured_meets_the_budget_and_keeps_a_group(tiny_pipe_dir):
    pipe, rep = _prune(tiny_pipe_dir, sparsity=0.5, param_budget=0.3, allocation="global")
    den0 = obslib.load_pipeline(tiny_pipe_dir).transformer
    total = rep["targeted_params_before"]
    assert rep["allocation"] == "global"
    assert abs(rep["params_removed"] - 0.3 * total) <= _largest_group(den0)
    for b in pipe.transformer.transformer_blocks:
        assert b.attn.heads >= 1 and b.ff.net[2].in_features >= 1


class _Stats:
    def __init__(self, H):
        self.H = H


def test_global_structured_counts_take_the_cheapest_first(tiny_pipe_dir):
    """A FFN whose neurons never fire (zero H) is free: it gives all but one neuron before anything else goes."""
    den = obslib.load_pipeline(tiny_pipe_dir).transformer
    units = [u for u in _units(den) if u.kind == "neurons"][:2]
    g = torch.Generator().manual_seed(0)
    stats = {}
    for i, u in enumerate(units):
        n = den.get_submodule(u.hessian_layers[0]).in_features
        X = torch.randn(4 * n, n, generator=g)
        stats[u.hessian_layers[0]] = _Stats(torch.zeros(n, n) if i == 0 else X.T @ X)
    n0, per = group_params(den, units[0])
    counts = structured_counts(den, units, stats, budget_params=(n0 + 3) * per)
    assert counts[unit_name(units[0])] == n0 - 1  # the dead FFN first, one neuron kept
    assert counts[unit_name(units[1])] == 4  # then the live one makes up the rest
    assert structured_counts(den, units, stats, 0) == {unit_name(u): 0 for u in units}


def test_unit_sparsity_map_and_another_methods_allocation(tiny_pipe_dir):
    den = obslib.load_pipeline(tiny_pipe_dir).transformer
    units = _units(den)
    _, rep_s = _prune(tiny_pipe_dir, method="slimdiff", sparsity=0.3)
    params = removed_by_unit(rep_s)
    assert sum(params.values()) == sum(r["params_removed"] for r in rep_s["ranks"].values())
    shares = shares_for_params(den, units, params)
    pipe, rep = _prune(tiny_pipe_dir, sparsity=0.0, unit_sparsity=shares)
    for u in units:
        n, per = group_params(den, u)
        k = round(shares[unit_name(u)] * n)
        assert abs(k * per - params.get(unit_name(u), 0)) <= per / 2 or k == n - 1
        mod = pipe.transformer.get_submodule(unit_name(u))
        assert (mod.heads if u.kind == "heads" else mod.in_features) == n - k
    with pytest.raises(UsageError, match="unit sparsity names 'transformer_blocks.0.attn'"):
        _prune(tiny_pipe_dir, unit_sparsity={"transformer_blocks.0.attn": 0.5})


def test_slimdiff_uniform_gives_every_group_the_same_share():
    groups = [Group(f"g{i}", "ffn", list(range(16, 0, -1)), [j / 16 * (i + 1) for j in range(16)],
                    [k * per for k in range(16, 0, -1)]) for i, per in enumerate((10, 30, 50))]
    total = sum(g.params[0] for g in groups)
    saved = allocate_uniform(groups, int(0.25 * total))
    assert saved >= 0.25 * total
    shares = [1 - g.params[g.choice] / g.params[0] for g in groups]
    assert max(shares) - min(shares) <= 1 / 16 + 1e-9  # within one level of each other
    assert all(0.25 - 1 / 16 <= s <= 0.25 + 1 / 16 for s in shares)


def test_slimdiff_uniform_runs_and_meets_its_budget(tiny_pipe_dir):
    _, rep = _prune(tiny_pipe_dir, method="slimdiff", sparsity=0.3, allocation="uniform")
    assert rep["allocation"] == "uniform" and 0.3 <= rep["sparsity_actual"] < 0.36
    _, rep_g = _prune(tiny_pipe_dir, method="slimdiff", param_budget=0.3)
    assert rep_g["allocation"] == "global" and 0.3 <= rep_g["sparsity_actual"] < 0.36


def test_flops_per_image_drop_by_exactly_the_removed_neurons(tiny_pipe_dir):
    pipe0 = obslib.load_pipeline(tiny_pipe_dir)
    _, rep = _prune(tiny_pipe_dir, sparsity=0.0, head_sparsity=0.0, neuron_sparsity=0.25, steps=3)
    fl = rep["flops_per_image"]
    dense, call = flops_per_image(pipe0, 3, rep["guidance"], P[0], call_kwargs(sampling_defaults(pipe0)))
    assert fl["dense"] == dense and fl["pruned"] < dense and fl["ratio"] == pytest.approx(fl["pruned"] / dense)
    kw = call[1]
    B, _, Hh, Ww = kw["hidden_states"].shape
    img_tokens = B * Hh * Ww // pipe0.transformer.config.patch_size ** 2
    txt_tokens = B * kw["encoder_hidden_states"].shape[1]
    den = pipe0.transformer
    drop = 0
    for u in [u for u in _units(den) if u.kind == "neurons"]:
        up, down = den.get_submodule(f"{u.block}.{u.group.ups[0]}"), den.get_submodule(u.hessian_layers[0])
        tokens = txt_tokens if "context" in u.block + u.hessian_layers[0] else img_tokens
        drop += round(0.25 * down.in_features) * 2 * (up.in_features + down.out_features) * tokens
    assert dense - fl["pruned"] == 3 * drop
    _, rep_u = _prune(tiny_pipe_dir, pattern="unstructured", sparsity=0.5)
    assert rep_u["flops_per_image"]["ratio"] == 1.0  # zeros are still multiplied


@pytest.mark.parametrize("kw, needle", [
    (dict(pattern="structured", param_budget=1.0), "--param-budget 1.0 is outside [0, 1)"),
    (dict(pattern="structured", param_budget=-0.1), "--param-budget -0.1 is outside [0, 1)"),
    (dict(param_budget=0.2), "--param-budget applies to --pattern structured only (got 'unstructured')"),
    (dict(pattern="structured", param_budget=0.2, neuron_sparsity=0.1), "drop --neuron-sparsity"),
    (dict(pattern="2:4", sparsity=0.5, allocation="global"), "--allocation global does not apply to 2:4"),
    (dict(pattern="structured", method="l1-norm", allocation="global"), "needs a method that calibrates a Hessian"),
    (dict(pattern="structured", method="gradient-flow", allocation="global"), "trains gates instead"),
    (dict(pattern="structured", allocation="global", head_sparsity=0.25), "drop --head-sparsity"),
    (dict(pattern="structured", unit_sparsity={"a": 1.5}), "unit sparsity a=1.5: expected a unit name and a share"),
    (dict(unit_sparsity={"a": 0.5}), "a unit sparsity map applies to --pattern structured only"),
])
def test_bad_budget_and_allocation(kw, needle):
    import re

    with pytest.raises(UsageError, match=re.escape(needle)):
        obslib.PruneConfig(**kw).validate()


@pytest.mark.parametrize("args, needle", [
    (["--pattern", "structured", "--param-budget", "1.5"], "--param-budget 1.5 is outside [0, 1)"),
    (["--param-budget", "0.2"], "--param-budget applies to --pattern structured only"),
    (["--pattern", "4:8", "--sparsity", "0.5", "--allocation", "global"], "--allocation global does not apply to 4:8"),
])
def test_cli_bad_budget_is_one_line(tiny_pipe_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "obslib", "prune", tiny_pipe_dir, "--num-prompts", "4", "--out", str(out),
                        *args], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert not out.exists()
