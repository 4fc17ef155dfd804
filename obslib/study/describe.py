"""What a chapter prints about the model it runs on, read off the loaded pipeline for any architecture obslib
prunes: its block kinds, heads, FFN widths and text tokens (chapter 00's card; the structured chapters' units)."""
from __future__ import annotations

import re

import torch

from ..archs import block_units, iter_blocks, spec_for
from ..hessian import weight_matrix
from ..io import quiet_diffusers
from ..sampling import MAX_SEQUENCE_LENGTH, PROMPT_ENCODERS

# what a block family is called, per architecture (the ArchSpec's block regexes, in order)
BLOCK_KINDS = {
    "sd3": ("MMDiT blocks (joint attention)",),
    "flux": ("double-stream blocks (joint attention)", "single-stream blocks (fused attention + MLP)"),
    "dit": ("transformer blocks",),
    "unet": ("down-stage blocks", "mid-block blocks", "up-stage blocks"),
}


def block_counts(denoiser) -> list[tuple[str, int]]:
    """(kind, number of blocks) per block family of the denoiser, in execution order."""
    spec = spec_for(denoiser)
    names = [n for n, _ in iter_blocks(denoiser, spec)]
    kinds = BLOCK_KINDS.get(spec.name, spec.blocks)
    return [(kind, sum(bool(re.fullmatch(rx, n)) for n in names)) for rx, kind in zip(spec.blocks, kinds)]


def heads_and_ffn(denoiser) -> tuple[int, int]:
    """Attention heads per block and hidden neurons of the first block's image-stream FFN: the units structured
    pruning removes."""
    first = next(blk for _, blk in iter_blocks(denoiser, spec_for(denoiser)))
    return denoiser.config.num_attention_heads, first.ff.net[2].in_features


def text_tokens(pipe, prompt: str, max_sequence_length: int) -> tuple[int, str]:
    """The number of text tokens the denoiser attends to per prompt, and what they are made of."""
    enc = PROMPT_ENCODERS[type(pipe).__name__]
    with torch.no_grad(), quiet_diffusers():  # quiet: SD3's placeholder T5 "truncates" every caption to its slots
        n = enc(pipe, [prompt], 1.0, max_sequence_length)["prompt_embeds"].shape[1]
    if type(pipe).__name__ == "FluxPipeline":
        return n, f"{n} T5 tokens; the CLIP text model gives only the pooled vector"
    return n, f"{n} ({pipe.tokenizer_max_length} CLIP + {max_sequence_length} T5 slots)"


def model_card(pipe, defaults: dict, prompt: str):
    """Chapter 00's table of the model: pipeline, denoiser, blocks, heads, resolution, tokens, text encoders,
    targeted layers and default sampling."""
    import pandas as pd

    tr, cfg = pipe.transformer, pipe.transformer.config
    spec = spec_for(tr)
    msl = defaults.get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    targets = [n for b, blk in iter_blocks(tr, spec) for unit in block_units(b, blk, spec) for n in unit]
    target_weights = sum(weight_matrix(tr.get_submodule(n)).numel() for n in targets)
    n_params = sum(p.numel() for p in tr.parameters())
    f = pipe.vae_scale_factor
    latent = cfg.sample_size if hasattr(cfg, "sample_size") else defaults["image_size"] // f
    patch = 2 if type(pipe).__name__ == "FluxPipeline" else cfg.patch_size  # FluxPipeline packs 2 x 2 patches
    encoders = [(k.replace("_", " "), f"{type(m).__name__}, {sum(p.numel() for p in m.parameters()):,} parameters")
                for k, m in pipe.components.items() if k.startswith("text_encoder") and m is not None]
    latent_channels = pipe.vae.config.latent_channels
    rows = [
        ("pipeline", type(pipe).__name__),
        ("denoiser", f"{type(tr).__name__}, {n_params:,} parameters"),
        *[(kind, str(n)) for kind, n in block_counts(tr) if n],
        ("attention heads × head dim", f"{cfg.num_attention_heads} × {cfg.attention_head_dim}"),
        ("hidden size", f"{cfg.num_attention_heads * cfg.attention_head_dim}"),
        ("image resolution", f"{latent * f} × {latent * f} pixels"),
        ("latent", f"{latent_channels} channels × {latent} × {latent} (VAE downsampling {f}×)"),
        ("image tokens", f"{(latent // patch) ** 2} = ({latent} / patch size {patch})²"),
        ("text tokens per prompt", text_tokens(pipe, prompt, msl)[1]),
        *encoders,
        ("targeted linear layers",
         f"{len(targets)}, {target_weights:,} weights ({target_weights / n_params:.0%} of the denoiser)"),
        ("default sampling", f"{defaults['num_inference_steps']} steps, guidance {defaults['guidance_scale']}"
                             f"{' (true CFG, two denoiser calls per step)' if defaults.get('cfg') == 'true_cfg' else ''}"
                             f", {type(pipe.scheduler).__name__}"),
    ]
    return pd.DataFrame(rows, columns=["property", "value"]).set_index("property")
