"""Gradient-flow iterative structured pruning (arXiv 2501.09464), a *reconstruction*.

The paper's method section is not available offline (``../shared/paper/peers-brief.md``). Its abstract
states: structured pruning with soft masks, a progressive soft-pruning strategy that keeps the masks
continuous and moves them along the gradient flow of an energy function during training, and a criterion
that prunes what *increases the gradient norm of the loss* when removed, so that the pruned model converges
fast. What follows fills the gaps with the closest published forms; each choice is marked **[gap]**.

* **Groups and soft masks.** A gate m_g in [0, 1] on every attention head (multiplying the head's columns
  at the input of the output projections; both streams' projections in MMDiT joint attention) and every
  FFN neuron (the down projection's input column), applied by forward pre-hooks. The groups and the number
  removed per block are those of structured OBS-Diff (``sparsity`` x heads, x neurons; first and last block
  excluded by default), so the two are compared at identical shapes.
* **Training.** The parameters of the targeted blocks train with AdamW on the model's own denoising loss
  (flow matching for SD3-class and Flux models, noise / v prediction for SD 2.x and SDXL UNet pipelines;
  ``TRAIN_BATCHES``), while the gates follow the schedule; the rest of the model is frozen **[gap: what trains]**.
* **Criterion.** GraSP (Wang et al., 2020) on the gates: removing gate g (delta = -1) changes the squared
  gradient norm by about -2 (H grad)_g, so its score is S_g = -(H grad)_g over the gates; the largest S_g
  (removal raises the gradient norm, the paper's stated criterion) are pruned **[gap: GraSP on gates, not
  on weights]**. H grad is a finite difference of gate gradients along the gradient (one extra forward and
  backward), every ``SCORE_EVERY`` iterations, smoothed by an exponential moving average **[gap]**.
* **Schedule.** At each score step the chosen set of every block is re-selected (soft: a group can come
  back); chosen gates fall linearly from 1 to 0 over the first ``RAMP`` share of the iterations, after which
  the selection is frozen at 0 and the model keeps training to recover **[gap: linear ramp]**.
* **Hard prune.** The chosen groups (gates exactly 0, so nothing changes) are physically removed by the
  same functions as structured OBS-Diff.

Resumable: every ``CKPT_EVERY`` iterations the trained parameters, the optimiser state, the scores and the
selection go to ``checkpoint_dir/it-NNNNNNN`` (safetensors + JSON, written to a temporary name and renamed);
batches are a pure function of (seed, iteration), so a resumed run ends with bytes identical to an
uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .archs import iter_blocks, spec_for
from .errors import UsageError
from .checkpoint import optim_restore, optim_tensors
from .shapes.batches import BATCH_SEED_STRIDE, NOISE_SEED_STRIDE

SCORE_EVERY = 4
EMA = 0.7  # weight of the previous score average
RAMP = 0.75  # chosen gates reach 0 after this share of the iterations
FD_STEP = 1e-3  # finite-difference step of the Hessian-gradient product (gates are O(1))
CKPT_EVERY = 25
CFG_DROPOUT = 0.1
SHAPES_DATA_SEED_OFFSET = 17  # the shapes-world batches of gradient flow differ from the trainer's (seed + 17)
# PruneConfig.gradient_criterion: "raise" prunes the groups whose removal raises the gradient norm (the paper's
# stated criterion, GraSP's rule); "lower" those whose removal lowers it (the direction Lubana & Dick argue can be
# the safer one on a trained model) -- an ablation  # share of empty captions in training batches (keeps the unconditional branch for CFG)


# ------------------------------------------------------------------------------------------- gates
class SoftMasks:
    """Gates on the heads and neurons of the structured units, applied by forward pre-hooks."""

    def __init__(self, den, units):
        from .surgery import head_layout, neuron_layout

        self.den, self.units, self.slices, self._handles = den, units, [], []
        self.hooks = []  # (module name, unit index, first column, columns per group)
        n = 0
        for ui, u in enumerate(units):
            if u.kind == "heads":
                heads, hd, _ = head_layout(den, u)
                self.slices.append(slice(n, n + heads))
                self.hooks += [(name, ui, 0, hd) for name in u.hessian_layers]
                n += heads
            else:
                inner, lo = neuron_layout(den, u)
                self.slices.append(slice(n, n + inner))
                self.hooks.append((u.hessian_layers[0], ui, lo, 1))
                n += inner
        self.m = torch.ones(n)

    def size(self, ui: int) -> int:
        s = self.slices[ui]
        return s.stop - s.start

    def _hook(self, ui, lo, width):
        def hook(module, args):
            x = args[0]
            gate = self.m[self.slices[ui]].to(x.dtype).repeat_interleave(width)
            hi = lo + gate.numel()
            x = torch.cat([x[..., :lo], x[..., lo:hi] * gate, x[..., hi:]], -1) if (lo or hi < x.shape[-1]) else x * gate
            return (x, *args[1:])
        return hook

    def __enter__(self):
        for name, ui, lo, width in self.hooks:
            self._handles.append(self.den.get_submodule(name).register_forward_pre_hook(self._hook(ui, lo, width)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


# ------------------------------------------------------------------------------------ training data
class ImageFolder:
    """A folder in the diffusers text-to-image convention: images plus ``metadata.jsonl`` whose lines hold
    ``file_name`` and ``text``. Batch i is a seeded draw (pure function of seed and i)."""

    def __init__(self, path: str, size: int, batch: int, seed: int):
        meta = os.path.join(str(path), "metadata.jsonl")
        if not os.path.isdir(path) or not os.path.isfile(meta):
            raise UsageError(f"--train-data {path!r}: expected a folder with images and metadata.jsonl "
                             "(one JSON object per line with file_name and text)")
        self.items = []
        try:
            with open(meta, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UsageError(f"{meta}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it "
                             "as UTF-8") from None
        except OSError as e:
            raise UsageError(f"{meta}: cannot be read ({e.strerror or e})") from None
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                fn, text = d["file_name"], d["text"]
                assert isinstance(fn, str) and isinstance(text, str)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UsageError(f"{meta}: line {ln} is not a JSON object with string file_name and text") from None
            if not os.path.isfile(os.path.join(path, fn)):
                raise UsageError(f"{meta}: line {ln} names {fn!r}, which is not in {path!r}")
            self.items.append((os.path.join(path, fn), text))
        if not self.items:
            raise UsageError(f"{meta} lists no images")
        self.path, self.size, self.batch, self.seed = path, size, batch, seed

    def __call__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        rng = random.Random(self.seed * BATCH_SEED_STRIDE + i)
        picks = [self.items[rng.randrange(len(self.items))] for _ in range(self.batch)]
        ims = []
        for fn, _ in picks:
            try:
                im = Image.open(fn).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
            except (OSError, UnidentifiedImageError) as e:
                raise UsageError(f"--train-data: {fn!r} is not a readable image ({e})") from None
            ims.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3))
        x = torch.stack(ims).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return [t for _, t in picks], x


def _shapes_world(batch: int, seed: int):
    from .shapes.batches import TrainBatches

    data = TrainBatches(seed + SHAPES_DATA_SEED_OFFSET, batch)
    return data.get


def _captions_dropped(captions, gen):
    return ["" if torch.rand(1, generator=gen).item() < CFG_DROPOUT else c for c in captions]


def _flow_draw(pipe, source, seed: int, i: int):
    """Batch ``i`` of a flow-matching model (SD3 / SD3.5 / Flux): (its captions after the dropout, the clean latents
    x0, sigma drawn logit-normal, the noise), all from the batch's own generator."""
    from .io import quiet_diffusers

    vae = pipe.vae
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed * NOISE_SEED_STRIDE + i)
    captions, x = source(i)
    captions = _captions_dropped(captions, gen)
    with torch.no_grad(), quiet_diffusers():
        x0 = (vae.encode(x.to(pipe._execution_device, vae.dtype)).latent_dist.sample(generator=gen).cpu().float()
              - shift) * scale
    sigma = torch.sigmoid(torch.randn(len(captions), generator=gen))
    return captions, x0, sigma, torch.randn(x0.shape, generator=gen)


def _sd3_batches(pipe, source, seed: int, msl: int):
    """Flow matching (SD3 / SD3.5): x_t = (1 - s) x0 + s eps, target eps - x0, s logit-normal."""
    device = pipe._execution_device

    def batch(i: int):
        from .io import quiet_diffusers

        captions, x0, sigma, noise = _flow_draw(pipe, source, seed, i)
        with torch.no_grad(), quiet_diffusers():
            pe, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=msl)
        s = sigma.view(-1, 1, 1, 1)
        dt = pipe.transformer.dtype
        kwargs = dict(hidden_states=((1 - s) * x0 + s * noise).to(device, dt), timestep=(sigma * 1000).to(device),
                      encoder_hidden_states=pe, pooled_projections=pooled)
        return kwargs, (noise - x0).to(device, dt)

    return batch


def _flux_batches(pipe, source, seed: int, msl: int):
    """Flux: SD3's flow matching on the latents packed into 2 x 2 patches as ``FluxPipeline`` packs them, with the
    image and text position ids; the guidance embedding (FLUX.1-dev) gets the pipeline's default 3.5."""
    from diffusers import FluxPipeline

    device = pipe._execution_device
    guided = bool(getattr(pipe.transformer.config, "guidance_embeds", False))

    def batch(i: int):
        from .io import quiet_diffusers

        captions, x0, sigma, noise = _flow_draw(pipe, source, seed, i)
        with torch.no_grad(), quiet_diffusers():
            pe, pooled, txt_ids = pipe.encode_prompt(captions, None, device=device, max_sequence_length=msl)
        b, c, h, w = x0.shape
        s = sigma.view(-1, 1, 1, 1)
        dt = pipe.transformer.dtype
        packed = FluxPipeline._pack_latents((1 - s) * x0 + s * noise, b, c, h, w)
        kwargs = dict(hidden_states=packed.to(device, dt), timestep=sigma.to(device, dt), encoder_hidden_states=pe,
                      pooled_projections=pooled, txt_ids=txt_ids,
                      img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dt),
                      guidance=torch.full((b,), 3.5, device=device, dtype=dt) if guided else None)
        return kwargs, FluxPipeline._pack_latents(noise - x0, b, c, h, w).to(device, dt)

    return batch


def _ddpm_noised(sched, x0: torch.Tensor, gen: torch.Generator):
    """A DDPM-family training pair: (x_t, t, target) with target the noise or the velocity, as the scheduler says."""
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = sched.add_noise(x0, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    return xt, t, target


def _sd_text(pipe, captions, x, device) -> tuple[torch.Tensor, dict]:
    """SD 1.x / 2.x: the text encoder's hidden states only."""
    return pipe.encode_prompt(captions, device, 1, False)[0], {}


def _sdxl_text(pipe, captions, x, device) -> tuple[torch.Tensor, dict]:
    """SDXL: both encoders' hidden states, plus the micro-conditioning (pooled embedding, size / crop time ids)."""
    pe, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    size = (x.shape[-2], x.shape[-1])
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
    return pe, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(captions), 1)}}


def _unet_batches(text):
    """DDPM-family UNet pipelines: noise (epsilon) or v prediction, as the scheduler says; ``text`` conditions."""

    def build(pipe, source, seed: int, msl: int):
        vae, device = pipe.vae, pipe._execution_device

        def batch(i: int):
            gen = torch.Generator().manual_seed(seed * NOISE_SEED_STRIDE + i)
            captions, x = source(i)
            captions = _captions_dropped(captions, gen)
            with torch.no_grad():
                x0 = vae.encode(x.to(device, vae.dtype)).latent_dist.sample(generator=gen).cpu().float() \
                    * vae.config.scaling_factor
                pe, extra = text(pipe, captions, x, device)
            xt, t, target = _ddpm_noised(pipe.scheduler, x0, gen)
            dt = pipe.unet.dtype
            return (dict(sample=xt.to(device, dt), timestep=t.to(device), encoder_hidden_states=pe, **extra),
                    target.to(device, dt))

        return batch

    return build


# pipeline class -> how its denoiser is trained (its own loss)
TRAIN_BATCHES = {"StableDiffusion3Pipeline": _sd3_batches, "FluxPipeline": _flux_batches,
                 "StableDiffusionPipeline": _unet_batches(_sd_text),
                 "StableDiffusionXLPipeline": _unet_batches(_sdxl_text)}


def training_batches(pipe, cfg, defaults: dict):
    """Batches for ``pipe``'s denoiser: the shapes world for the embedded model, else ``cfg.train_data``."""
    name = type(pipe).__name__
    if name not in TRAIN_BATCHES:
        raise UsageError(f"gradient-flow pruning trains {', '.join(TRAIN_BATCHES)} pipelines; this is a {name}")
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    # the model's own image size (FluxPipeline's default of 128 latent px is the real Flux's), else its denoiser's
    size = defaults.get("height") or int(getattr(den.config, "sample_size", None) or pipe.default_sample_size) \
        * int(pipe.vae_scale_factor)
    if cfg.train_data is not None:
        source = ImageFolder(cfg.train_data, size, cfg.batch_size, cfg.seed)
    elif defaults.get("calibration_prompts") == "shapes-train":
        source = _shapes_world(cfg.batch_size, cfg.seed)
    else:
        raise UsageError("gradient-flow pruning needs training data: --train-data DIR (images + metadata.jsonl)")
    return TRAIN_BATCHES[name](pipe, source, cfg.seed, int(defaults.get("max_sequence_length", 256)))


# ---------------------------------------------------------------------------------------- checkpoint
def _fingerprint(cfg, units) -> dict:
    """The configuration fields that change the result (``PruneConfig`` metadata) and the units."""
    from .checkpoint import config_fingerprint

    return {**config_fingerprint(cfg), "units": [u.hessian_layers for u in units]}


def _ckpt(ckdir: str, fp: dict | None = None):
    from .checkpoint import CheckpointDir

    return CheckpointDir(ckdir, "gradient-flow", fingerprint=fp)


def _latest(ckdir: str | None):
    if not ckdir:
        return None
    entries = _ckpt(ckdir).entries()
    return entries[-1] if entries else None


def _save(ckdir: str, it: int, params: dict, opt, ema, chosen, log, fp) -> None:

    ot, groups = optim_tensors(opt, "opt")
    tensors = {**{f"param.{k}": v.detach().contiguous() for k, v in params.items()}, **ot, "ema": ema.contiguous()}
    ck = _ckpt(ckdir, fp)
    final = ck.write(it, tensors, {"iteration": it, "chosen": chosen, "loss": log, "optim": groups, "fingerprint": fp})
    ck.keep_only(os.path.basename(final))  # the newest complete checkpoint only


_FIELDS = {"iteration": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
           "chosen": lambda v: isinstance(v, list) and all(isinstance(g, list) and all(
               isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in g) for g in v),
           "loss": lambda v: isinstance(v, list),
           "optim": lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list),
           "fingerprint": lambda v: isinstance(v, dict)}


def _restore(ckdir: str, name: str, params: dict, opt, fp, ema_like: torch.Tensor, sizes: list[int], n_iter: int):
    from .checkpoint import DELETE_HINT

    ck = _ckpt(ckdir, fp)
    state, meta = ck.read(name, _FIELDS)
    where = os.path.join(ck.path, name)
    if json.loads(json.dumps(fp)) != meta["fingerprint"]:
        raise UsageError(f"the checkpoint in {ckdir!r} belongs to a different configuration (see {where!r}); "
                         "rerun with the same settings or delete that directory")
    bad = None
    if meta["iteration"] > n_iter or len(meta["chosen"]) != len(sizes) or any(
            any(i >= s for i in g) for g, s in zip(meta["chosen"], sizes)):
        bad = "its iteration or chosen groups do not fit this model"
    for k, p in params.items():
        t = state.get(f"param.{k}")
        if bad is None and (t is None or t.shape != p.shape or t.dtype != p.dtype):
            bad = f"tensor param.{k} is missing or has the wrong shape or dtype"
    e = state.get("ema")
    if bad is None and (e is None or e.shape != ema_like.shape):
        bad = "tensor ema is missing or has the wrong shape"
    if bad is not None:
        raise UsageError(f"checkpoint {where!r}: {bad}; {DELETE_HINT}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[f"param.{k}"])
    try:
        optim_restore(opt, state, meta["optim"], "opt")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise UsageError(f"checkpoint {where!r}: its optimiser state does not fit ({' '.join(str(e).split())[:80]}); "
                         f"{DELETE_HINT}") from None
    return meta["iteration"], state["ema"], meta["chosen"], meta["loss"]


# ------------------------------------------------------------------------------------------ driver
def hessian_gradient(loss_at, m: torch.Tensor, g: torch.Tensor, step: float = FD_STEP) -> torch.Tensor:
    """H g of ``loss_at`` at ``m`` (g its gradient there) by a finite difference of gradients along g:
    H g ~ |g| (grad L(m + step g/|g|) - g) / step; exact for a quadratic loss."""
    norm = float(g.norm())
    if norm == 0:
        return torch.zeros_like(g)
    m2 = (m + step * g / norm).detach().requires_grad_(True)
    g2 = torch.autograd.grad(loss_at(m2), m2)[0]
    return (g2 - g) / step * norm


def _select(masks: SoftMasks, ema: torch.Tensor, counts: list[int]) -> list[list[int]]:
    return [sorted(torch.topk(ema[masks.slices[ui]], k).indices.tolist()) if k else [] for ui, k in enumerate(counts)]


def _set_gates(masks: SoftMasks, chosen, value: float) -> None:
    masks.m.fill_(1.0)
    for ui, groups in enumerate(chosen):
        idx = torch.tensor(groups, dtype=torch.long) + masks.slices[ui].start
        masks.m[idx] = value


def gradient_flow_prune(run) -> dict:
    """Train with soft gates, score by GraSP on the gates, hard-prune; returns the method's report fields. ``run``:
    an ``obslib.methods.base.WholeModelRun`` (the denoiser, the checked config, the rollback record, the targeted
    blocks, the training batches, and per-unit removal shares of a parameter budget or unit map, or None)."""
    from .surgery import n_remove, targeted_layers, targeted_size, unit_name
    from .packages import structured_units

    den, cfg = run.den, run.cfg
    if run.train_batches is None:
        raise UsageError("method 'gradient-flow' needs training batches (obslib.prune builds them from the pipeline)")
    spec = spec_for(den)
    units = list(structured_units(den, spec, run.block_ids))
    masks = SoftMasks(den, units)
    shares = run.shares or {}  # per unit (a parameter budget's uniform split, a unit sparsity map); else the config's
    counts = [n_remove(masks.size(ui), shares.get(unit_name(units[ui]), cfg.group_sparsity(units[ui].kind, cfg.sparsity)))
              for ui in range(len(units))]
    targeted = targeted_layers(den, spec, units, True)
    target_before = targeted_size(den, targeted, "weights")
    t0 = time.perf_counter()
    chosen, log = _train_gates(den, cfg, units, masks, counts, _trainable(den, spec, units, run.undo), run.train_batches)
    t_train = time.perf_counter() - t0
    t = time.perf_counter()
    layers = _hard_prune(den, units, masks, chosen, run.undo)
    return {
        "sparsity_actual": 1 - targeted_size(den, targeted, "weights") / target_before, "sparsity_counts": "weights",
        "layers": layers,
        "groups_removed": {f"{u.block}:{u.kind}:{','.join(u.hessian_layers)}": r for u, r in zip(units, chosen)},
        "iterations": cfg.iterations, "loss": log, "hessian_mb_per_package": [],
        "timings": {"calibration_s": 0.0, "training_s": t_train, "solve_s": time.perf_counter() - t},
    }


def _trainable(den, spec, units, undo) -> dict:
    """The parameters of the blocks that hold the units (kept for a rollback), by name: what training updates."""
    blocks = dict(iter_blocks(den, spec))
    names = [name for bi, (name, _) in enumerate(iter_blocks(den, spec)) if bi in set(u.block_index for u in units)]
    for b in names:
        undo.parameters(b)
    return {f"{b}.{k}": p for b in names for k, p in blocks[b].named_parameters()}


def _train_gates(den, cfg, units, masks, counts, params: dict, train_batches) -> tuple[list, list]:
    """Train ``params`` with the gates closing over the ramp, scoring the gates by GraSP every SCORE_EVERY
    iterations (resumable from ``cfg.checkpoint_dir``); (the groups chosen per unit, the loss log). Only ``params``
    take gradients meanwhile; every parameter's flag is put back after."""
    flags = {n: p.requires_grad for n, p in den.named_parameters()}
    den.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    fp = _fingerprint(cfg, units)
    start, ema, chosen, log = 0, torch.zeros_like(masks.m), [[] for _ in units], []
    latest = _latest(cfg.checkpoint_dir)
    if latest is not None:
        if not cfg.resume:
            raise UsageError(f"{cfg.checkpoint_dir!r} holds a checkpoint of an interrupted run; pass --resume "
                             "(resume=True) to continue it, or delete that directory")
        start, ema, chosen, log = _restore(cfg.checkpoint_dir, latest, params, opt, fp, masks.m,
                                           [masks.size(ui) for ui in range(len(units))], cfg.iterations)
    n = cfg.iterations
    ramp_end = max(1, round(RAMP * n))
    step = _Trainer(den, cfg, masks, counts, params, opt, ramp_end)
    bar = tqdm(range(start, n), initial=start, total=n, desc="gradient-flow", disable=not cfg.progress)
    try:
        with masks:
            for it in bar:
                loss, ema, chosen = _train_step(step, train_batches(it), it, ema, chosen)
                if it % 10 == 0 or it == n - 1:
                    log.append([it, loss])
                bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.checkpoint_dir and ((it + 1) % CKPT_EVERY == 0 or it + 1 == n):
                    _save(cfg.checkpoint_dir, it + 1, params, opt, ema, chosen, log, fp)
    finally:
        for name, p in den.named_parameters():
            p.requires_grad_(flags.get(name, True))
    return chosen, log


@dataclass(frozen=True)
class _Trainer:
    """What every training iteration of gradient flow uses: the model, config, gates, groups to remove per unit,
    trained parameters, optimiser and the iteration where the gates' ramp ends."""

    den: torch.nn.Module
    cfg: object
    masks: object
    counts: list
    params: dict
    opt: object
    ramp_end: int


def _train_step(tr: _Trainer, batch, it: int, ema, chosen):
    """One training iteration at gate value 1 − (it + 1) / ramp_end (0 after the ramp), re-choosing the groups from
    the GraSP score's running mean on scoring iterations; (the loss, the score's mean, the chosen groups)."""
    den, cfg, masks, counts, params, opt, ramp_end = (tr.den, tr.cfg, tr.masks, tr.counts, tr.params, tr.opt,
                                                      tr.ramp_end)
    kwargs, target = batch
    scoring = it < ramp_end and it % SCORE_EVERY == 0
    _set_gates(masks, chosen, 0.0 if it >= ramp_end else 1.0 - (it + 1) / ramp_end)
    if scoring:
        masks.m.requires_grad_(True)
    loss = F.mse_loss(den(**kwargs, return_dict=False)[0].float(), target.float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if scoring:
        base = masks.m.detach().clone()

        def loss_at(m):
            masks.m = m
            return F.mse_loss(den(**kwargs, return_dict=False)[0].float(), target.float())

        hg = hessian_gradient(loss_at, base, masks.m.grad.detach().clone())
        # GraSP on the gates: closing gate g (delta = -1) changes |grad|^2 by about -2 (Hg)_g;
        # S_g = -(Hg)_g > 0 means the removal raises the gradient norm: those are pruned first
        ema = EMA * ema + (1 - EMA) * (-hg if cfg.gradient_criterion == "raise" else hg)
        masks.m = base
        chosen = _select(masks, ema, counts)
        _set_gates(masks, chosen, 1.0 - (it + 1) / ramp_end)
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    opt.step()
    if not bool(torch.isfinite(loss.detach())) or not all(bool(torch.isfinite(p).all()) for p in params.values()):
        raise UsageError(f"gradient-flow training diverged at iteration {it + 1} of {cfg.iterations} (loss "
                         f"{float(loss.detach()):.4g}, or NaN/inf weights) with --lr {cfg.lr:g}; lower "
                         "--lr (no output was written)")
    return float(loss.detach()), ema, chosen


def _hard_prune(den, units, masks, chosen, undo) -> list[dict]:
    """Remove the chosen heads and neurons for good; the layers' report entries."""
    from .surgery import remove_heads, remove_neurons

    layers = []
    for ui, (u, removed) in enumerate(zip(units, chosen)):
        if not removed:
            continue
        if u.kind == "heads":
            remove_heads(den, u, removed, undo)
            layers += [{"name": nm, "sparsity": len(removed) / masks.size(ui), "rel_error": None,
                        "removed_heads": removed} for nm in u.hessian_layers]
        else:
            remove_neurons(den, u, removed, undo)
            layers.append({"name": u.hessian_layers[0], "sparsity": len(removed) / masks.size(ui),
                           "rel_error": None, "removed_neurons": sorted(removed)})
    return layers
