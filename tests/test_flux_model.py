"""The second embedded model's construction and training step (obslib.shapes.flux), on a tiny transformer: stock
FluxPipeline components, the latents packed as the pipeline packs them, the SD3 model's VAE shared, true CFG."""
import json

import pytest

import torch
from diffusers import FluxPipeline

from obslib.io import load_pipeline
from obslib.paths import DEFAULT_MODEL
from obslib.shapes import flux
from obslib.shapes.train import train_flux_model

TINY = dict(num_layers=1, num_single_layers=1)


def test_flux_pipeline_shares_the_vae_and_packs_latents_as_sampling_does():
    vae = load_pipeline(DEFAULT_MODEL).vae
    pipe = flux.build_flux_pipeline(vae, **TINY)
    t = pipe.transformer.config
    assert t.num_attention_heads >= 8 and not t.guidance_embeds and t.in_channels == 4 * vae.config.latent_channels
    assert sum(t.axes_dims_rope) == t.attention_head_dim and pipe.vae is vae
    # the training prediction equals the transformer called on FluxPipeline's own packing, unpacked the same way
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 12, generator=g)
    sigma = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        v = flux.flux_prediction(pipe, ["a red circle", ""], tuple(x.shape), x, sigma)
        pe, pooled, ids = pipe.encode_prompt(["a red circle", ""], None, max_sequence_length=flux.T5_TOKENS)
        packed = FluxPipeline._pack_latents(x, 2, 8, 12, 12)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 6, 6, x.device, x.dtype)
        ref = pipe.transformer(hidden_states=packed, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=pe,
                               txt_ids=ids, img_ids=img_ids, return_dict=False)[0]
    assert packed.shape == (2, 36, 32)  # 6 x 6 tokens: one per 8 px of the 48 px image
    assert torch.equal(FluxPipeline._pack_latents(v, 2, 8, 12, 12), ref)


def test_a_trained_flux_model_loads_with_the_stock_pipeline_and_samples_with_true_cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(flux, "FLUX_CONFIG", {**flux.FLUX_CONFIG, **TINY})
    out = tmp_path / "flux"
    train_flux_model(str(out), str(tmp_path / "ck"), steps=2, batch=2, log=str(tmp_path / "log.csv"))
    d = json.loads((out / "obslib_defaults.json").read_text())
    assert d["cfg"] == "true_cfg" and d["guidance_scale"] > 1 and d["max_sequence_length"] == flux.T5_TOKENS
    assert d["height"] == d["width"] == 48  # FluxPipeline would otherwise sample at 512 px (128 x 4)
    assert (tmp_path / "log.csv").exists() and (tmp_path / "ck" / "done.json").exists()
    pipe = FluxPipeline.from_pretrained(str(out))  # no obslib needed to load it
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    img = pipe(["a red circle"], negative_prompt=[""], true_cfg_scale=d["guidance_scale"], num_inference_steps=3,
               height=48, width=48, max_sequence_length=d["max_sequence_length"], output_type="np").images
    assert img.shape == (1, 48, 48, 3) and len(calls) == 3 * flux.DENOISER_CALLS_PER_STEP


def _tiny_flux():
    return flux.build_flux_pipeline(load_pipeline(DEFAULT_MODEL).vae, **TINY)


def test_true_cfg_is_counted_as_two_denoiser_calls_per_step():
    from obslib.sampling import CalibrationRunner, calls_per_step, collect_stats, guidance_kwargs

    pipe = _tiny_flux()
    assert calls_per_step(pipe, 4.0) == 2 and calls_per_step(pipe, 1.0) == 1
    assert guidance_kwargs(pipe, 4.0, 2) == {"guidance_scale": 4.0, "true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    assert calls_per_step(load_pipeline(DEFAULT_MODEL), 4.0) == 1  # SD3 batches the two halves into one call
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"]
    stats = {}
    for g in (1.0, 4.0):  # the calibration's own check: exactly steps x calls-per-step calls per run, or it raises
        stats[g] = collect_stats(pipe, names, ["a red circle", "a blue square"], steps=3, guidance=g, batch_size=2,
                                 per_step=True)
        assert sorted(stats[g][names[0]].step_energy) == [1, 2, 3]
    # under true CFG each step also sees the negative prompt's call: twice the tokens per step
    n1 = stats[1.0][names[0]].step_energy[2][1]
    assert stats[4.0][names[0]].step_energy[2][1] == 2 * n1
    r = CalibrationRunner(pipe, ["a red circle"], 3, 4.0, 0, 1)
    assert r.calls_per_step == 2 and {"negative_prompt_embeds", "true_cfg_scale"} <= set(r.inputs[0])


def test_step_switch_counts_steps_not_calls_under_true_cfg():
    from obslib.windows import StepSwitch

    class Tag(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x):
            return x * 0 + self.v

    base, other = Tag(0.0), Tag(1.0)
    seen = []
    with StepSwitch(base, other, (2, 2), 3, calls_per_step=2):
        for _ in range(6):  # 3 steps x (prompt, negative prompt)
            seen.append(float(base(torch.zeros(1))))
    assert seen == [0, 0, 1, 1, 0, 0]


def test_the_flux_model_prunes_with_resample_and_propagate_under_true_cfg():
    import obslib

    for calibration in ("resample", "propagate"):
        pipe = _tiny_flux()
        rep = obslib.prune(pipe, obslib.PruneConfig(sparsity=0.5, packages=2, calibration=calibration, steps=3,
                                                    guidance=4.0, prompts=["a red circle", "a blue square"],
                                                    batch_size=2, progress=False))
        assert abs(rep["sparsity_actual"] - 0.5) < 0.02 and rep["calibration"] == calibration
        if calibration == "propagate":
            assert rep["replay_block_calls"] > 0
        fl = rep["flops_per_image"]
        assert fl["dense"] > 0 and fl["pruned"] == fl["dense"]  # zeros keep the count
    from obslib.flops import call_flops, denoiser_call

    dense = _tiny_flux()
    one = call_flops(dense.transformer, denoiser_call(dense, "a red circle", 4.0, {"max_sequence_length": 256}))
    assert fl["dense"] == 3 * 2 * one  # 3 steps x (prompt, negative prompt) calls of one image each


def test_the_shapes_world_evaluator_scores_the_flux_model(tmp_path, monkeypatch):
    """obslib evaluate on a (tiny, barely trained) Flux model: sampled with its own defaults (true CFG, its text
    length), and the window probe switches the denoiser per step, not per call."""
    from obslib.cli import main

    monkeypatch.setattr(flux, "FLUX_CONFIG", {**flux.FLUX_CONFIG, **TINY})
    out = tmp_path / "flux"
    train_flux_model(str(out), str(tmp_path / "ck"), steps=1, batch=2, log=str(tmp_path / "log.csv"))
    assert main(["evaluate", str(out), "--num-prompts", "4", "--steps", "2", "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= m["prompt_fidelity"] <= 1 and m["guidance"] == 4.0
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(out, ref)
    assert main(["evaluate", str(out), "--reference", str(ref), "--pruned-steps", "1-1", "--num-prompts", "4",
                 "--steps", "2", "--out", str(tmp_path / "w.json")]) == 0
    w = json.loads((tmp_path / "w.json").read_text())
    assert w["psnr"] > 60  # the same denoiser switched in: the reference's own images


def test_a_resumed_training_logs_each_step_once(tmp_path):
    from obslib.shapes.train import _truncate_log

    log = tmp_path / "log.csv"
    rows = ["stage,step,loss,kl", "vae,0,1.0,", "flux,0,0.9,", "flux,20,0.8,", "flux,40,0.7,", "flux,20,0.75,"]
    log.write_text("\n".join(rows) + "\n")
    _truncate_log(str(log), "flux", 20)  # resumed from the checkpoint of step 20: its rows from 20 on are redone
    assert log.read_text().splitlines() == rows[:3]
    _truncate_log(str(log), "flux", 20)  # nothing left to drop: the file is left as it is
    assert log.read_text().splitlines() == rows[:3]


@pytest.mark.parametrize("method,pattern", [("gradient-flow", "structured"), ("slimdiff", "structured"),
                                            ("obs-diff", "structured"), ("obs-diff", "2:4")])
def test_every_method_family_prunes_a_flux_pipeline_that_saves_and_reloads(tiny_flux_dir, tmp_path, method, pattern):
    """Pipeline level on the Flux architecture, both block kinds: gradient flow trains on Flux's own packed
    flow-matching loss (shapes-world batches), SlimDiff and OBS-Diff calibrate under true CFG; the pruned pipeline
    samples at the model's own 48 px, saves, and reloads to the same images."""
    import numpy as np

    import obslib
    from obslib.evaluate import generate

    pipe = obslib.load_pipeline(tiny_flux_dir)
    cfg = obslib.PruneConfig(method=method, pattern=pattern, sparsity=0.25 if pattern == "structured" else 0.5,
                             prompts=["a red circle", "a blue square"], batch_size=2, iterations=3,
                             exclude_first_last=False, progress=False)
    before = sum(p.numel() for p in pipe.transformer.parameters())
    rep = obslib.prune(pipe, cfg)
    layers = {r["name"].split(".")[0] for r in rep["layers"]}
    if method == "slimdiff":  # its closed forms need separate output projections: the fused ones are left, said so
        assert layers == {"transformer_blocks"}
        assert any("single_transformer_blocks.0" in n and "not slimmed" in n for n in rep["notices"])
    else:
        assert layers == {"transformer_blocks", "single_transformer_blocks"}  # both block kinds pruned
    if pattern == "structured":
        assert rep["params_after"] < before
    else:
        w = pipe.transformer.single_transformer_blocks[0].proj_mlp.weight
        assert (w.view(-1, 4) == 0).sum(1).eq(2).all()  # 2 of every 4 inputs
    if method != "slimdiff":  # a pruned single-stream block's MLP layout reads its current width, not the built one
        from obslib.archs import spec_for
        from obslib.packages import structured_units
        from obslib.surgery import neuron_layout

        den = pipe.transformer
        single = [u for u in structured_units(den, spec_for(den), [1]) if u.kind == "neurons"]
        block = den.single_transformer_blocks[0]
        inner, lo = neuron_layout(den, single[0])
        assert inner == block.proj_mlp.out_features and lo + inner == block.proj_out.in_features
        assert (inner < block.mlp_hidden_dim) == (pattern == "structured")  # neurons went; the attribute stays
    img = generate(pipe, ["a red circle"], 0, steps=2, progress=False)
    assert img.shape == (1, 48, 48, 3)
    obslib.save_pruned(pipe, rep, str(tmp_path / "p"))
    re = obslib.load_pipeline(str(tmp_path / "p"))
    assert type(re).__name__ == "FluxPipeline"
    assert np.array_equal(generate(re, ["a red circle"], 0, steps=2, progress=False), img)
    if method != "slimdiff":
        assert neuron_layout(re.transformer, single[0]) == (inner, lo)  # reloaded: the same layout
