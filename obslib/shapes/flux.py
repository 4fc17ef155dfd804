"""The second embedded model: a stock ``FluxPipeline`` sized for CPU, on the same shapes world.

Built offline from constructor arguments, like ``obslib.shapes.model``'s SD3 model, but of another family:

* ``FluxTransformer2DModel`` with both block kinds (``FLUX_CONFIG``: 3 double-stream and 6 single-stream blocks,
  8 heads of 16 dims, rotary positions over (text, row, column) axes) and no guidance embedding;
* a CLIP text model whose pooled output conditions the modulation, and a T5 encoder for the token sequence, each
  with a word-level tokenizer built from the world's captions (``model.build_tokenizer``,
  ``model.build_word_t5_tokenizer``); both are trained with the transformer;
* the VAE of the SD3 model (``models/shapes-sd3``), reused as it is: 48 px images, 8 latent channels at 12 x 12,
  packed by ``FluxPipeline`` into 2 x 2 patches — 6 x 6 image tokens of 32 features, one token per 8 px, so each
  cell of the world's lattice is a whole number of tokens, as it is for the SD3 model's 2 x 2 patches.

Guidance: without a guidance embedding, ``FluxPipeline`` offers classifier-free guidance as ``true_cfg_scale``
with a negative prompt (here the empty prompt, which training shows in place of the caption one time in ten): the
denoiser runs twice per step, once on the prompt and once on the empty prompt (``DENOISER_CALLS_PER_STEP``). The
model's ``obslib_defaults.json`` records this (``"cfg": "true_cfg"``).
"""
from __future__ import annotations

import torch

# 3 + 6 blocks, not 4 + 8: a training step at batch 64 then takes about 0.8 s on 2 cores instead of 1.2 s (measured),
# which keeps the training within about 3 hours
# Sampling defaults of the Flux model (obslib_defaults.json): the guidance is FluxPipeline's true_cfg_scale with the
# empty negative prompt, so every step calls the denoiser twice
DEFAULT_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0, "max_sequence_length": 24, "cfg": "true_cfg"}
DENOISER_CALLS_PER_STEP = 2
T5_TOKENS = 24  # the longest caption is 16 words + EOS

FLUX_CONFIG = dict(
    patch_size=1, in_channels=32, out_channels=32, num_layers=3, num_single_layers=6, attention_head_dim=16,
    num_attention_heads=8, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
T5_CONFIG = dict(d_model=128, d_kv=16, d_ff=256, num_layers=2, num_heads=8, dropout_rate=0.0)


def build_word_t5_tokenizer():
    """A T5 tokenizer with one token per word of the world's captions (plus pad, EOS, unknown)."""
    from transformers import T5TokenizerFast

    from .world import all_scenes

    words = sorted({w for s in all_scenes() for w in s.caption().split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=T5_TOKENS)


def build_flux_pipeline(vae, seed: int = 0, **transformer_overrides):
    """A freshly initialised Flux pipeline around ``vae`` (float32, eval mode); ``transformer_overrides`` change the
    transformer's constructor arguments (tests build tiny ones)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .model import TEXT_CONFIG, build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TEXT_CONFIG))
    t5_tok = build_word_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), decoder_start_token_id=0, **T5_CONFIG))
    cfg = {**FLUX_CONFIG, **transformer_overrides}
    cfg["in_channels"] = cfg["out_channels"] = 4 * vae.config.latent_channels
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
                        text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=FluxTransformer2DModel(**cfg))
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prediction(pipe, captions: list[str], x0_shape: tuple, xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for noisy latents ``xt`` (B, C, H, W) at noise levels ``sigma``, the captions
    encoded by the pipeline's own ``encode_prompt`` and the latents packed as ``FluxPipeline`` packs them: training
    sees exactly the inputs sampling gives. Returned unpacked, in ``xt``'s shape."""
    from diffusers import FluxPipeline

    b, c, h, w = x0_shape
    pe, pooled, text_ids = pipe.encode_prompt(captions, None, device=torch.device("cpu"),
                                              max_sequence_length=T5_TOKENS)
    packed = FluxPipeline._pack_latents(xt, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype)
    v = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=None, pooled_projections=pooled,
                         encoder_hidden_states=pe, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    f = pipe.vae_scale_factor
    return FluxPipeline._unpack_latents(v, h * f, w * f, f)
