"""Train the embedded default model on CPU: the VAE first, then transformer + both text encoders.

Resumable: a checkpoint (safetensors weights/optimiser state + a JSON cursor) is written every
``ckpt_every`` steps; rerunning the same command continues from the last one. The loss log goes to a
CSV. The transformer learns through the pipeline's own ``encode_prompt`` so that the saved pipeline
generates exactly what it learned.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import CheckpointDir, optim_restore, optim_tensors
from ..io import quiet_diffusers
from ..owned import write_text
from .model import DEFAULT_SAMPLING, build_pipeline
from .batches import NOISE_SEED_STRIDE, TrainBatches


CFG_DROPOUT = 0.1


def _save_ckpt(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The stage's newest checkpoint (the same checkpoint directories as pruning: obslib/checkpoint.py)."""
    ck = CheckpointDir(path, "training", "training checkpoint")
    seen, out = set(), {}
    for k, v in tensors.items():  # tied weights (T5's shared embedding) are saved as copies: safetensors refuses aliases
        out[k] = v.contiguous() if v.data_ptr() not in seen else v.clone()
        seen.add(v.data_ptr())
    final = ck.write(meta["step"], out, meta)
    ck.keep_only(os.path.basename(final))


def _load_ckpt(path: str):
    ck = CheckpointDir(path, "training", "training checkpoint")
    if os.path.lexists(path):
        ck.check()  # a folder that is not an obslib checkpoint is refused, never overwritten
    entries = ck.entries()
    if not entries:
        return None, None
    return ck.read(entries[-1], {"step": lambda v: isinstance(v, int) and v >= 1})


def _truncate_log(path: str, stage: str, step: int) -> None:
    """On resume: drop the log's rows of ``stage`` at or after ``step`` (written after the checkpoint resumed from),
    so each step is logged once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    keep = lines[:1] + [ln for ln in lines[1:] if not (ln.split(",")[0] == stage and int(ln.split(",")[1]) >= step)]
    if len(keep) < len(lines):
        write_text(path, "\n".join(keep) + "\n")


def _log(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write(",".join(row) + "\n")
        f.write(",".join(str(v) for v in row.values()) + "\n")


def train_vae(pipe, steps: int, batch: int, ckpt: str, log: str, seed: int = 0, ckpt_every: int = 200, lr=1e-3,
              free: bool = False):
    vae = pipe.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    state, meta = _load_ckpt(ckpt)
    start = 0
    if meta is not None:
        vae.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vae.")})
        optim_restore(opt, state, meta["optim"], "opt")
        start = meta["step"]
    _truncate_log(log, "vae", start)
    data = TrainBatches(seed, batch, free=free)
    vae.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="vae"):
        _, x = data.get(step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            _log(log, {"stage": "vae", "step": step, "loss": f"{mse.item():.5f}", "kl": f"{kl.item():.4f}"})
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            t, g = optim_tensors(opt, "opt")
            _save_ckpt(ckpt, {**{f"vae.{k}": v for k, v in vae.state_dict().items()}, **t}, {"step": step + 1, "optim": g})
    vae.eval()
    # latent statistics -> the pipeline's shift/scale (as SD3's VAE config carries them)
    with torch.no_grad():
        lat = torch.cat([vae.encode(data.get(10_000_000 + i)[1]).latent_dist.mean for i in range(8)])
    vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1.0 / lat.std()))
    return vae


def _sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=gen))  # logit-normal, as in SD3


def sd3_prediction(pipe, captions: list[str], x0_shape: tuple, xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The SD3 model's velocity for noisy latents ``xt`` at noise levels ``sigma``, the captions encoded by the
    pipeline's own ``encode_prompt`` (so the saved pipeline generates exactly what it learned)."""
    with quiet_diffusers():  # the placeholder T5's "truncated" warning, on every step otherwise
        pe, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=DEFAULT_SAMPLING["max_sequence_length"])
    return pipe.transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=pe,
                            pooled_projections=pooled, return_dict=False)[0]


def train_denoiser(pipe, steps: int, batch: int, ckpt: str, log: str, seed: int = 0, ckpt_every: int = 200,
                   lr: float = 4e-4, ema_decay: float = 0.999, warmup: int = 200, stage: str = "denoiser",
                   free: bool = False, predict=sd3_prediction):
    """Train the transformer and the text encoders on the flow-matching loss (``predict``: the architecture's
    velocity for a batch, ``sd3_prediction`` or ``obslib.shapes.flux.flux_prediction``), with an EMA of the weights
    that the saved model keeps."""
    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {n: copy.deepcopy(m).requires_grad_(False) for n, m in modules.items()}
    state, meta = _load_ckpt(ckpt)
    start = 0
    if meta is not None:
        for n, m in modules.items():
            m.load_state_dict({k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})
            ema[n].load_state_dict({k[len(n) + 5:]: v for k, v in state.items() if k.startswith(f"ema_{n}.")})
        optim_restore(opt, state, meta["optim"], "opt")
        start = meta["step"]
    _truncate_log(log, stage, start)
    vae = pipe.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    data = TrainBatches(seed + 1, batch, free=free)
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="denoiser")
    running = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        gen = torch.Generator().manual_seed(seed * NOISE_SEED_STRIDE + step)
        captions, x = data.get(step)
        captions = ["" if torch.rand(1, generator=gen).item() < CFG_DROPOUT else c for c in captions]
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.sample(generator=gen) - shift) * scale
        sigma = _sigmas(len(captions), gen)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = predict(pipe, captions, tuple(x0.shape), xt, sigma)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for n, m in modules.items():
                for pe_, p in zip(ema[n].parameters(), m.parameters()):
                    pe_.lerp_(p, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 20 == 0:
            _log(log, {"stage": stage, "step": step, "loss": f"{loss.item():.5f}", "kl": ""})
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            tensors = {}
            for n, m in modules.items():
                tensors.update({f"{n}.{k}": v for k, v in m.state_dict().items()})
                tensors.update({f"ema_{n}.{k}": v for k, v in ema[n].state_dict().items()})
            t, g = optim_tensors(opt, "opt")
            _save_ckpt(ckpt, {**tensors, **t}, {"step": step + 1, "optim": g})
    for n, m in modules.items():
        m.load_state_dict(ema[n].state_dict())
        m.eval()
    return pipe


def train_decoder(pipe, steps: int, batch: int, ckpt: str, log: str, seed: int = 0, ckpt_every: int = 100,
                  lr: float = 3e-4, free: bool = False):
    """Fine-tune the VAE *decoder* on unconditional renders of the whole world (encoder frozen).

    The VAE was first trained on training-split images only; it then decodes colour/background pairs it never
    saw (yellow on white, blue on gray) into wrong colours, which would make the held-out set measure the
    autoencoder rather than the text-to-image model. The decoder is an image decoder with no text input, so
    it is fine-tuned on renders of every scene (no captions); the encoder, the latent space, the transformer
    and the text encoders keep having seen the training split only.
    """
    from .world import all_scenes

    vae = pipe.vae
    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    state, meta = _load_ckpt(ckpt)
    start = 0
    if meta is not None:
        vae.decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})
        optim_restore(opt, state, meta["optim"], "opt")
        start = meta["step"]
    _truncate_log(log, "decoder", start)
    data = TrainBatches(seed + 2, batch, scenes=all_scenes(), free=free)
    vae.decoder.train()
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="decoder (whole world)"):
        gen = torch.Generator().manual_seed(seed * 31 + step)
        _, x = data.get(step)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            _log(log, {"stage": "decoder", "step": step, "loss": f"{loss.item():.5f}", "kl": ""})
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            t, g = optim_tensors(opt, "opt")
            _save_ckpt(ckpt, {**{f"decoder.{k}": v for k, v in vae.decoder.state_dict().items()}, **t},
                       {"step": step + 1, "optim": g})
    vae.eval()
    return vae


def train_default_model(out: str, checkpoint_dir: str, vae_steps: int, steps: int, batch: int, vae_batch: int,
                        log: str, seed: int = 0, decoder_steps: int = 400, init_from: str | None = None,
                        layout: str = "lattice") -> None:
    """Train from scratch, or (``init_from``) continue the denoiser of a saved pipeline with a fresh optimiser,
    keeping its VAE; checkpoints go to ``checkpoint_dir`` either way. ``layout="free"`` trains on the
    off-lattice placement (how the first 5,000 steps of the committed model were trained)."""
    if layout not in ("lattice", "free"):
        raise ValueError(f"layout={layout!r}: must be 'lattice' or 'free'")
    free = layout == "free"
    from ..io import check_output_dir

    # refuse a destination that would lose files before hours of training, not after
    check_output_dir(out, [init_from] if init_from else [], overwrite=True)
    torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    if init_from:
        from ..io import load_pipeline

        pipe = load_pipeline(init_from)
        train_denoiser(pipe, steps, batch, os.path.join(checkpoint_dir, "denoiser"), log, seed + 100,
                       stage="denoiser_continued", free=free)
    else:
        pipe = build_pipeline(seed)
        train_vae(pipe, vae_steps, vae_batch, os.path.join(checkpoint_dir, "vae"), log, seed, free=free)
        train_denoiser(pipe, steps, batch, os.path.join(checkpoint_dir, "denoiser"), log, seed, free=free)
        train_decoder(pipe, decoder_steps, vae_batch, os.path.join(checkpoint_dir, "decoder"), log, seed, free=free)
    from ..io import save_pipeline

    defaults = {**DEFAULT_SAMPLING, "calibration_prompts": "shapes-train", "image_size": pipe.vae.config.sample_size}
    stage = {"init_from": init_from, "layout": layout, "vae_steps": 0 if init_from else vae_steps, "steps": steps,
             "batch": batch, "decoder_steps": 0 if init_from else decoder_steps, "seed": seed,
             "seconds": round(time.time() - t0, 1)}
    history = training_history(init_from) + [stage] if init_from else [stage]
    # replaces only an earlier obslib model (e.g. `make model` retraining models/shapes-sd3), never anything else
    save_pipeline(pipe, out, extra_json={"obslib_defaults.json": defaults, "obslib_training.json": history},
                  protect=[init_from] if init_from else [], overwrite=True)
    with open(os.path.join(checkpoint_dir, "done.json"), "w") as f:
        json.dump(stage, f)


def train_flux_model(out: str, checkpoint_dir: str, steps: int, batch: int, log: str, seed: int = 0,
                     vae_from: str = "models/shapes-sd3") -> None:
    """Train the Flux model (``obslib.shapes.flux``): the transformer and both text encoders from scratch, around the
    VAE of ``vae_from`` (frozen: the two models share one latent space). Resumable from ``checkpoint_dir``."""
    from ..io import check_output_dir, load_pipeline, save_pipeline
    from .flux import DEFAULT_SAMPLING as FLUX_SAMPLING, build_flux_pipeline, flux_prediction

    check_output_dir(out, [vae_from], overwrite=True)
    torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    vae = load_pipeline(vae_from).vae.requires_grad_(False).eval()
    pipe = build_flux_pipeline(vae, seed)
    train_denoiser(pipe, steps, batch, os.path.join(checkpoint_dir, "denoiser"), log, seed, stage="flux",
                   predict=flux_prediction)
    size = vae.config.sample_size  # FluxPipeline's own default is 128 latent px x the VAE factor
    defaults = {**FLUX_SAMPLING, "calibration_prompts": "shapes-train", "image_size": size, "height": size,
                "width": size}
    stage = {"arch": "flux", "vae_from": vae_from, "steps": steps, "batch": batch, "seed": seed,
             "seconds": round(time.time() - t0, 1)}
    save_pipeline(pipe, out, extra_json={"obslib_defaults.json": defaults, "obslib_training.json": [stage]},
                  protect=[vae_from], overwrite=True)
    with open(os.path.join(checkpoint_dir, "done.json"), "w") as f:
        json.dump(stage, f)


def training_history(model_dir: str) -> list[dict]:
    """The training stages recorded in a saved model (``obslib_training.json``; empty when absent)."""
    path = os.path.join(model_dir, "obslib_training.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m obslib.shapes.train", description=__doc__)
    p.add_argument("--out", default="models/shapes-sd3")
    p.add_argument("--checkpoint-dir", default="checkpoints/shapes-sd3")
    p.add_argument("--vae-steps", type=int, default=700)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--decoder-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--log", default="results/train_loss.csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", help="continue training the denoiser of this saved pipeline (e.g. models/shapes-sd3)")
    p.add_argument("--layout", choices=("lattice", "free"), default="lattice",
                   help="object placement of the training renders (the world's lattice, or free placement)")
    p.add_argument("--arch", choices=("sd3", "flux"), default="sd3",
                   help="sd3: the embedded SD3 model; flux: the second model (obslib.shapes.flux), around the SD3 "
                        "model's VAE (--vae-from)")
    p.add_argument("--vae-from", default="models/shapes-sd3", help="--arch flux: the pipeline whose VAE it reuses")
    a = p.parse_args(argv)
    from ..errors import UsageError

    try:
        if a.arch == "flux":
            train_flux_model(a.out, a.checkpoint_dir, a.steps, a.batch, a.log, a.seed, a.vae_from)
        else:
            train_default_model(a.out, a.checkpoint_dir, a.vae_steps, a.steps, a.batch, a.vae_batch, a.log, a.seed,
                                a.decoder_steps, a.init_from, a.layout)
    except UsageError as e:  # bad input: one line, exit 2, nothing written
        print(f"obslib train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
