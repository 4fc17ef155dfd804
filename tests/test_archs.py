"""Every architecture table on a tiny random configuration built offline from constructor arguments:
unstructured, 2:4 and structured pruning -> forward runs -> save -> reload -> identical outputs."""
import pytest
import torch

from obslib.config import PruneConfig
from obslib.driver import prune_model
from obslib.archs import ARCHS, iter_blocks, spec_for
from obslib.io import load_pruned_model, write_json
from obslib.obs import check_nm

B = 2


def _sd35():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                              attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                              joint_attention_dim=32, pooled_projection_dim=16, dual_attention_layers=(0, 1),
                              qk_norm="rms_norm", pos_embed_max_size=8)

    def inputs(g):
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(B, 7, 32, generator=g),
                    pooled_projections=torch.randn(B, 16, generator=g), timestep=torch.rand(B, generator=g) * 1000)
    return m, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=16,
                               axes_dims_rope=(4, 2, 2))

    def inputs(g):
        return dict(hidden_states=torch.randn(B, 16, 4, generator=g), encoder_hidden_states=torch.randn(B, 5, 16, generator=g),
                    pooled_projections=torch.randn(B, 16, generator=g), timestep=torch.rand(B, generator=g),
                    img_ids=torch.randint(0, 4, (16, 3), generator=g).float(), txt_ids=torch.zeros(5, 3))
    return m, inputs


def _unet():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                             out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                             attention_head_dim=4, norm_num_groups=8)

    def inputs(g):
        return dict(sample=torch.randn(B, 4, 8, 8, generator=g), timestep=torch.rand(B, generator=g) * 1000,
                    encoder_hidden_states=torch.randn(B, 5, 16, generator=g))
    return m, inputs


def _dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=3,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10)

    def inputs(g):
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), timestep=torch.randint(0, 1000, (B,), generator=g),
                    class_labels=torch.randint(0, 10, (B,), generator=g))
    return m, inputs


def _pixart():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=3, sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=16)

    def inputs(g):
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(B, 6, 16, generator=g),
                    timestep=torch.randint(0, 1000, (B,), generator=g), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return m, inputs


BUILDERS = {"sd3.5": _sd35, "flux": _flux, "unet": _unet, "dit": _dit, "pixart": _pixart}
STEPS = 3


def _run(model, inputs, seed=0):
    with torch.no_grad():
        return model(**inputs(torch.Generator().manual_seed(seed)), return_dict=False)[0]


def _calibrate(model, inputs):
    def calibrate(calib, desc):
        for run in range(2):
            calib.begin_run()
            for t in range(STEPS):
                _run(model, inputs, seed=100 + 10 * run + t)
            calib.end_run()
    return calibrate


def test_every_supported_class_has_a_table():
    assert set(ARCHS) == {"SD3Transformer2DModel", "FluxTransformer2DModel", "UNet2DConditionModel",
                          "DiTTransformer2DModel", "PixArtTransformer2DModel"}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_every_targeted_layer_is_in_exactly_one_unit(arch):
    """A layer named by two units would be pruned twice (Flux's double-stream q/k/v once were)."""
    from obslib.packages import layer_units

    torch.manual_seed(0)
    model, _ = BUILDERS[arch]()
    spec = spec_for(model)
    units = layer_units(model, spec, list(range(len(iter_blocks(model, spec)))))
    names = [n for u in units for n in u.hessian_layers]
    assert len(names) == len(set(names))
    if arch == "flux":  # double-stream blocks as MMDiT (4 units), single-stream: q/k/v + proj_mlp, then proj_out
        per_block = {}
        for u in units:
            per_block.setdefault(u.block, []).append([n.split(".", 2)[2] for n in u.hessian_layers])
        assert [len(v) for k, v in per_block.items() if k.startswith("transformer_blocks")] == [4, 4]
        assert per_block["single_transformer_blocks.0"] == [["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                                                            ["proj_out"]]


def test_a_table_naming_a_layer_in_two_units_is_refused():
    import dataclasses

    from obslib.archs import block_units

    torch.manual_seed(0)
    model, _ = BUILDERS["dit"]()
    spec = spec_for(model)
    bad = dataclasses.replace(spec, units=spec.units + (spec.units[0],))
    name, block = iter_blocks(model, spec)[0]
    with pytest.raises(ValueError, match="is in two units"):
        block_units(name, block, bad)


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "structured"])
def test_prune_forward_save_reload(arch, pattern, tmp_path):
    torch.manual_seed(0)
    model, inputs = BUILDERS[arch]()
    model.eval()
    spec = spec_for(model)
    assert len(iter_blocks(model, spec)) >= 3
    sparsity = {"unstructured": 0.5, "2:4": 0.5, "structured": 0.5}[pattern]
    cfg = PruneConfig(pattern=pattern, sparsity=sparsity, packages=2, progress=False)
    before = sum(p.numel() for p in model.parameters())
    rep = prune_model(model, _calibrate(model, inputs), cfg, STEPS, component=spec.component)
    assert rep["layers"], "nothing was pruned"
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    if pattern == "structured":
        assert rep["params_after"] < before
        assert any("removed_heads" in r for r in rep["layers"]) and any("removed_neurons" in r for r in rep["layers"])
        model.save_pretrained(tmp_path / "m")
        write_json(str(tmp_path / "m" / "manifest.json"), rep["manifest"])
        re = load_pruned_model(str(tmp_path / "m"), type(model), rep["manifest"])
    else:
        assert rep["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
        for layer in rep["layers"]:
            w = model.get_submodule(layer["name"]).weight
            if pattern == "2:4":
                assert check_nm(w.reshape(w.shape[0], -1) == 0, 2, 4)
        model.save_pretrained(tmp_path / "m")
        re = type(model).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(_run(re, inputs), out)


def test_real_size_benchmark_blocks_target_every_unit_layer(monkeypatch):
    """obslib.study.bench_scale builds one block of each kind and reads its layers from the same tables."""
    from obslib.study import bench_scale

    monkeypatch.setattr(bench_scale, "BLOCKS", {
        "sd3-medium-joint": dict(kind="joint", dim=32, heads=2, head_dim=16, text_tokens=4),
        "flux-single": dict(kind="single", dim=32, heads=2, head_dim=16, text_tokens=4)})
    _, joint, _ = bench_scale._block("sd3-medium-joint", 8)
    _, single, _ = bench_scale._block("flux-single", 8)
    assert sorted(single) == ["attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp", "proj_out"]
    assert sorted(joint) == sorted(["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                                    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
                                    "ff_context.net.0.proj", "ff.net.2", "ff_context.net.2"])
