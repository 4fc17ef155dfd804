"""SlimDiff reconstruction: closed forms against exact references, the allocator, the reshaped attention
processors, and prune -> forward -> save -> reload on SD3, SD3.5 (QK-norm) and the UNet."""
import json

import pytest
import torch

import obslib
from obslib.config import PruneConfig
from obslib.driver import prune_model
from obslib.archs import spec_for
from obslib.io import UsageError, load_pruned_model
from obslib.processors import ReshapedAttnProcessor, ReshapedJointAttnProcessor
from obslib.shapes import prompts
from obslib.slimdiff import (Group, allocate, nystrom_refit, rank_factors, ridge_leverage_order, spectral_pair,
                             tail_energy)

from test_archs import BUILDERS, STEPS, _calibrate, _run


def _gram(X):
    return X.T @ X / X.shape[0]


def _tokens(n, d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank or d, generator=g, dtype=torch.float64)
    return A @ torch.randn(rank or d, d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(1, d, generator=g, dtype=torch.float64)


def test_full_rank_factors_reproduce_the_identity():
    pair = spectral_pair(_gram(_tokens(50, 6, seed=1)), _gram(_tokens(40, 6, seed=2)))
    Pl, Pr = rank_factors(pair, 6)
    assert torch.allclose(Pl.T @ Pr, torch.eye(6, dtype=torch.float64), atol=1e-8)


def test_qk_rank_r_is_the_best_bilinear_approximation_on_the_data():
    """Mean squared logit error over all (query, key) token pairs equals the discarded whitened energy,
    and beats the same rank taken without whitening."""
    Q, K = _tokens(60, 8, seed=3), _tokens(45, 8, seed=4)  # query / key vectors of one head
    pair = spectral_pair(_gram(Q), _gram(K))
    logits = Q @ K.T
    for r in (1, 3, 6):
        Pl, Pr = rank_factors(pair, r)
        err = ((Q @ Pl.T @ Pr @ K.T - logits) ** 2).mean() / (logits**2).mean()
        assert float(err) == pytest.approx(float(tail_energy(pair[3])[r]), rel=1e-3, abs=1e-9)
        U, S, Vh = torch.linalg.svd(torch.eye(8, dtype=torch.float64))  # plain truncation: keep r coordinates
        naive = torch.zeros(8, 8, dtype=torch.float64)
        naive[:r, :r] = torch.eye(r, dtype=torch.float64)
        err_naive = ((Q @ naive @ K.T - logits) ** 2).mean() / (logits**2).mean()
        assert err <= err_naive + 1e-12


def test_vo_rank_is_exact_on_low_rank_values_and_matches_eckart_young():
    V = _tokens(80, 8, rank=3, seed=5)  # value vectors spanning 3 dimensions (+ a mean)
    Wo = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    pair = spectral_pair(Wo.T @ Wo, _gram(V))
    out = V @ Wo.T
    Pl, Pr = rank_factors(pair, 4)  # 3 directions + the mean
    assert torch.allclose(V @ Pr.T @ Pl @ Wo.T, out, atol=1e-4 * float(out.abs().max()))
    Pl, Pr = rank_factors(pair, 2)
    err = ((V @ Pr.T @ Pl @ Wo.T - out) ** 2).mean() / (out**2).mean()
    assert float(err) == pytest.approx(float(tail_energy(pair[3])[2]), rel=1e-3)
    # Eckart-Young: the optimum of ||W_o (I - M) V^T|| over rank-2 M is the rank-2 truncation of W_o V^T
    best = torch.linalg.svdvals(out)
    assert float(err) == pytest.approx(float((best[2:] ** 2).sum() / (best**2).sum()), rel=1e-3)


def test_nystrom_refit_is_least_squares_with_bias():
    Hid = torch.relu(_tokens(200, 10, seed=7))  # post-activation hidden states
    W = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    b = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    Y = Hid @ W.T + b
    Xa = torch.cat([Hid, torch.ones(200, 1, dtype=torch.float64)], 1)
    keep = torch.tensor([0, 2, 3, 7, 9])
    W_new, err = nystrom_refit(torch.cat([W, b[:, None]], 1), _gram(Xa), keep, True)
    Xs = torch.cat([Hid[:, keep], torch.ones(200, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(Xs, Y).solution.T
    assert torch.allclose(W_new, ref, rtol=1e-3, atol=1e-3)
    resid = ((Xs @ ref.T - Y) ** 2).sum() / (Y**2).sum()
    assert err == pytest.approx(float(resid), rel=1e-3)


def test_ridge_leverage_prefers_informative_neurons():
    Hid = _tokens(300, 6, seed=10)
    Hid[:, 4] = Hid[:, 0] + Hid[:, 1]  # redundant: a combination of others
    Hid[:, 5] *= 1e-4  # nearly dead
    order = ridge_leverage_order(_gram(Hid)).tolist()
    assert order.index(5) == 5  # the nearly dead neuron is least informative


def test_allocator_spends_the_budget_where_error_is_cheapest():
    cheap = Group("cheap", "ffn", [4, 3, 2, 1], [0.0, 0.01, 0.02, 0.5], [40, 30, 20, 10])
    dear = Group("dear", "vo", [4, 3, 2, 1], [0.0, 0.2, 0.4, 0.6], [40, 30, 20, 10])
    saved = allocate([cheap, dear], 20)
    assert saved == 20 and cheap.choice == 2 and dear.choice == 0
    saved = allocate([cheap, dear], 35)  # continues from the current choices
    assert saved >= 15 and dear.choice >= 1
    with pytest.raises(UsageError, match="cannot be met"):
        allocate([Group("g", "ffn", [2, 1], [0.0, 0.1], [20, 10])], 50)


@pytest.mark.parametrize("arch", ["sd3", "unet"])
def test_reshaped_processors_equal_the_stock_ones(arch, tiny_pipe):
    if arch == "sd3":
        model = tiny_pipe.transformer
        c = model.config
        inputs = lambda g: dict(hidden_states=torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g),  # noqa: E731
                                encoder_hidden_states=torch.randn(2, 7, model.config.joint_attention_dim, generator=g),
                                pooled_projections=torch.randn(2, model.config.pooled_projection_dim, generator=g),
                                timestep=torch.rand(2, generator=g) * 1000)
    else:
        model, inputs = BUILDERS["unet"]()
        model.eval()
    ref = _run(model, inputs)
    for name, m in model.named_modules():
        if type(getattr(m, "processor", None)).__name__ == "JointAttnProcessor2_0":
            m.set_processor(ReshapedJointAttnProcessor(m.scale))
        elif type(getattr(m, "processor", None)).__name__ == "AttnProcessor2_0":
            m.set_processor(ReshapedAttnProcessor(m.scale))
    assert torch.allclose(_run(model, inputs), ref, atol=1e-5)


def test_sparsity_zero_changes_nothing_and_full_rank_apply_is_exact(tiny_pipe, tmp_path):
    from obslib.slimdiff import _attn_groups, _ffn_group, apply_group, plan_groups
    from obslib.packages import structured_units
    from obslib.hessian import Calibration
    from obslib.sampling import CalibrationRunner

    den = tiny_pipe.transformer
    gen = lambda: tiny_pipe("a red circle", num_inference_steps=2, max_sequence_length=8, output_type="np",  # noqa: E731
                            generator=torch.Generator().manual_seed(0)).images
    before = gen()
    rep = obslib.prune(tiny_pipe, PruneConfig(method="slimdiff", pattern="structured", sparsity=0.0,
                                              prompts=prompts("train", 2), steps=2, batch_size=2, progress=False))
    assert rep["layers"] == [] and (gen() == before).all()
    # every group applied at its full level: new (reshaped) modules and processors, the same function
    units = structured_units(den, spec_for(den), [1, 2])
    attns, ffns, layers = plan_groups(den, spec_for(den), units, [])
    calib = Calibration(den, layers, [1.0, 1.0])
    with calib:
        CalibrationRunner(tiny_pipe, prompts("train", 2), 2, 4.0, 0, 2, {"max_sequence_length": 8}, False).run(calib)
    groups = [_ffn_group(den, f, calib.stats) for f in ffns] + [g for a in attns for g in _attn_groups(den, a, calib.stats)]
    from obslib.surgery import NoUndo as _NoUndo

    for g in groups:
        apply_group(den, g, _NoUndo())
    assert isinstance(den.transformer_blocks[1].attn.processor, ReshapedJointAttnProcessor)
    out = gen()
    assert abs(out - before).max() < 2e-3
    # the reshaped processors travel through the manifest
    from obslib.manifest import with_manifest as _with_manifest

    rep = _with_manifest({"method": "slimdiff"}, den, "transformer")
    assert set(rep["manifest"]["attention"]) == {"transformer_blocks.1.attn", "transformer_blocks.2.attn"}
    obslib.save_pruned(tiny_pipe, rep, str(tmp_path / "full"))
    re = obslib.load_pipeline(str(tmp_path / "full"))
    assert isinstance(re.transformer.transformer_blocks[1].attn.processor, ReshapedJointAttnProcessor)
    assert (re("a red circle", num_inference_steps=2, max_sequence_length=8,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
            == out).all()


def test_slimdiff_on_the_sd3_pipeline_saves_and_reloads(tiny_pipe, tmp_path):
    den = tiny_pipe.transformer
    rep = obslib.prune(tiny_pipe, PruneConfig(method="slimdiff", pattern="structured", sparsity=0.3,
                                              prompts=prompts("train", 4), steps=2, batch_size=4, progress=False))
    for key in ("method", "pattern", "sparsity_target", "sparsity_actual", "params_before", "params_after", "timings",
                "layers", "ranks", "manifest"):
        assert key in rep
    assert 0.3 <= rep["sparsity_actual"] < 0.4 and rep["params_after"] < rep["params_before"]
    assert rep["params_before"] - rep["params_after"] == rep["targeted_params_before"] - rep["targeted_params_after"]
    assert {r["kind"] for r in rep["ranks"].values()} == {"ffn", "qk", "vo"}
    for name, r in rep["ranks"].items():
        if r["kind"] == "qk" and r["level"] < r["full"]:
            attn = den.get_submodule(name.split(":")[0])
            assert attn.to_q.out_features == attn.heads * r["level"] == attn.add_k_proj.out_features
    img = lambda p: p("a small red circle", num_inference_steps=2, max_sequence_length=8, output_type="np",  # noqa: E731
                      generator=torch.Generator().manual_seed(0)).images
    out = img(tiny_pipe)
    assert torch.isfinite(torch.from_numpy(out)).all()
    obslib.save_pruned(tiny_pipe, rep, str(tmp_path / "slim"))
    manifest = json.load(open(tmp_path / "slim" / "obslib_manifest.json"))
    assert all(a["processor"] == "joint" for a in manifest.get("attention", {}).values())
    re = obslib.load_pipeline(str(tmp_path / "slim"))
    assert (img(re) == out).all()
    assert json.load(open(tmp_path / "slim" / "pruning_report.json"))["method"] == "slimdiff"


@pytest.mark.parametrize("arch", ["sd3.5", "unet"])
def test_slimdiff_prune_forward_save_reload(arch, tmp_path):
    torch.manual_seed(0)
    model, inputs = BUILDERS[arch]()
    model.eval()
    cfg = PruneConfig(method="slimdiff", pattern="structured", sparsity=0.25, progress=False, exclude_first_last=False)
    before = sum(p.numel() for p in model.parameters())
    rep = prune_model(model, _calibrate(model, inputs), cfg, STEPS, component=spec_for(model).component)
    assert rep["params_after"] < before and rep["sparsity_actual"] >= 0.25
    if arch == "sd3.5":
        assert any("QK-norm" in n for n in rep["notices"]) and not any(r["kind"] == "qk" for r in rep["ranks"].values())
    else:
        assert {r["kind"] for r in rep["ranks"].values()} == {"ffn", "qk", "vo"}
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "m")
    re = load_pruned_model(str(tmp_path / "m"), type(model), rep["manifest"])
    assert torch.equal(_run(re, inputs), out)


def test_slimdiff_config_errors(tiny_pipe):
    with pytest.raises(UsageError, match="does not support pattern 'unstructured'"):
        obslib.prune(tiny_pipe, PruneConfig(method="slimdiff", prompts=["a"], progress=False))
    with pytest.raises(UsageError, match="cannot be met"):
        obslib.prune(tiny_pipe, PruneConfig(method="slimdiff", pattern="structured", sparsity=0.99,
                                            prompts=prompts("train", 2), steps=2, batch_size=2, progress=False))
