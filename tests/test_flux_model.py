"""The second embedded model's construction and training step (obslib.shapes.flux), on a tiny transformer: stock
FluxPipeline components, the latents packed as the pipeline packs them, the SD3 model's VAE shared, true CFG."""
import json

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
    assert (tmp_path / "log.csv").exists() and (tmp_path / "ck" / "done.json").exists()
    pipe = FluxPipeline.from_pretrained(str(out))  # no obslib needed to load it
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    img = pipe(["a red circle"], negative_prompt=[""], true_cfg_scale=d["guidance_scale"], num_inference_steps=3,
               height=48, width=48, max_sequence_length=d["max_sequence_length"], output_type="np").images
    assert img.shape == (1, 48, 48, 3) and len(calls) == 3 * flux.DENOISER_CALLS_PER_STEP
