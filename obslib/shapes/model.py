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


def build_placeholder_t5(words: list[str] | None = None):
    """A T5 encoder whose output is exactly zero, with a word-level tokenizer.

    SD3 allows leaving T5 out, in which case the pipeline feeds zeros in its place; but the stock
    ``StableDiffusion3Pipeline.from_pretrained`` refuses a directory without ``text_encoder_3``. This
    placeholder (final layer norm = 0) produces the very zeros the T5-less path produces, so the saved
    model loads with the stock call and generates identically either way.
    """
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = words or sorted({w for s in all_scenes() for w in s.caption().split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    tok = T5TokenizerFast(vocab=vocab, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    cfg = T5Config(vocab_size=len(vocab), d_model=TRANSFORMER_CONFIG["joint_attention_dim"], d_kv=16, d_ff=32,
                   num_layers=1, num_heads=2, decoder_start_token_id=0)
    enc = T5EncoderModel(cfg).eval()
    enc.encoder.final_layer_norm.weight.data.zero_()
    return enc, tok


def build_pipeline(seed: int = 0, **transformer_overrides):
    """A freshly initialised pipeline of the embedded model's architecture (float32, eval mode).

    ``transformer_overrides`` change the transformer's constructor arguments (tests build tiny ones).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = build_tokenizer()
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **TEXT_CONFIG,
    )
    pipe = StableDiffusion3Pipeline(
        text_encoder_3=None,
        tokenizer_3=None,
        transformer=SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, **transformer_overrides}),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModelWithProjection(text_cfg),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer_2=build_tokenizer(),
    )
    pipe.register_modules(**dict(zip(("text_encoder_3", "tokenizer_3"), build_placeholder_t5())))
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
