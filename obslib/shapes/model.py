"""Build the embedded default model: a real ``StableDiffusion3Pipeline`` sized for CPU.

Everything is built offline from constructor arguments: a word-level CLIP BPE vocabulary made from the
world's captions, two small CLIP text encoders (no T5), a small AutoencoderKL, an MMDiT
``SD3Transformer2DModel`` with the joint-attention text branch and a FlowMatch Euler scheduler.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from .world import IMAGE_SIZE, all_scenes

# Default sampling settings of the embedded model, used everywhere (calibration, evaluation, figures).
# max_sequence_length is the number of (all-zero) T5 slots the stock pipeline appends when no T5
# encoder is present; the model was trained with this many, so it must be passed at sampling time.
DEFAULT_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0, "max_sequence_length": 8}
MAX_TOKENS = 24  # CLIP context length (longest caption is 16 words + BOS/EOS)

TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=8, out_channels=8, num_layers=6,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
    pooled_projection_dim=64, pos_embed_max_size=8,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64], layers_per_block=1,
    latent_channels=8, norm_num_groups=16, sample_size=IMAGE_SIZE, use_quant_conv=False,
    use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0,
)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, projection_dim=32, hidden_act="quick_gelu",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = tuple(out)
    return word


def build_tokenizer_files(directory: str) -> None:
    """Write vocab.json/merges.txt so that every word of the world is one CLIP token."""
    words = sorted({w for s in all_scenes() for w in s.caption().split()} | {""} - {""})
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    merges = []
    for w in words:
        while True:
            toks = _bpe(tuple(w[:-1]) + (w[-1] + "</w>",), ranks)
            if len(toks) == 1:
                break
            pair = (toks[0], toks[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.append(pair[0] + pair[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        build_tokenizer_files(d)
        tok = CLIPTokenizer(
            os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=MAX_TOKENS,
            pad_token="<|endoftext|>",
        )
    return tok


def build_pipeline(seed: int = 0):
    """A freshly initialised pipeline of the embedded model's architecture (float32, eval mode)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = build_tokenizer()
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **TEXT_CONFIG,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TRANSFORMER_CONFIG),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModelWithProjection(text_cfg),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
