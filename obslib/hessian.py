"""Timestep-aware Hessians collected by forward hooks during real sampling runs.

``Calibration`` owns everything stateful: the hooks, the call counter (advanced by a forward pre-hook
on the denoiser, reset by ``begin_run`` before each sampling run; a pipeline whose guidance calls the denoiser more
than once per step — FluxPipeline's ``true_cfg_scale``: once on the prompt, once on the negative one — declares
``calls_per_step``, and call c belongs to step c // calls_per_step) and the float32 accumulators

    H_l   = 2 * sum_t alpha_t X_{l,t} X_{l,t}^T / sum_t alpha_t n_t        (in x in)
    mean_l = sum_t alpha_t 1^T X_{l,t} / sum_t alpha_t n_t                  (in)

where X_{l,t} holds every token of every image of the step as a column (the classifier-free-guidance
doubled batch included). Conv2d layers are handled through unfolded inputs (columns = patches), so
their weight matrix is ``weight.reshape(out, -1)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .seeds import token_subset


def input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows (n_tokens x in_features), float32."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # B, C*k*k, L
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).float()
    return x.reshape(-1, x.shape[-1]).float()


def weight_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.data.reshape(module.weight.shape[0], -1)


class LayerStats:
    """Weighted second and first moments of one layer's inputs."""

    def __init__(self, in_features: int, device, per_step: bool = False):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.step_xtx: dict[int, torch.Tensor] | None = {} if per_step else None  # step -> unweighted X_t^T X_t
        self.xsum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.weight = 0.0  # sum_t alpha_t n_t
        self.tokens = 0
        self.step_energy: dict[int, list[float]] = {}  # step -> [sum ||x||^2, tokens] (unweighted)

    def add(self, x: torch.Tensor, alpha: float, step: int | None = None) -> None:
        if step is not None:
            e = self.step_energy.setdefault(step, [0.0, 0])
            e[0] += float((x * x).sum())
            e[1] += x.shape[0]
        self.xtx.addmm_(x.t(), x, alpha=alpha)
        if self.step_xtx is not None:
            if step is None:
                raise RuntimeError("per-step statistics need the step of every input")
            acc = self.step_xtx.get(step)
            if acc is None:
                self.step_xtx[step] = x.t() @ x
            else:
                acc.addmm_(x.t(), x)
        self.xsum.add_(x.sum(0), alpha=alpha)
        self.weight += alpha * x.shape[0]
        self.tokens += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.weight == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return self.xtx * (2.0 / self.weight)

    def step_H(self, step: int) -> torch.Tensor:
        """H_t = 2 X_t^T X_t / n_t of one step (needs ``per_step=True``)."""
        if self.step_xtx is None or step not in self.step_xtx:
            raise RuntimeError(f"no per-step statistics for step {step} (collect with per_step=True)")
        return self.step_xtx[step] * (2.0 / self.step_energy[step][1])

    def weighted_H(self, alphas: list[float]) -> torch.Tensor:
        """The H a weighting would give on these inputs, 2 sum_t alpha_t X_t^T X_t / sum_t alpha_t n_t, from the
        per-step sums (needs ``per_step=True``): every scheme's Hessian from one calibration."""
        if self.step_xtx is None:
            raise RuntimeError("weighted_H needs per-step statistics (collect with per_step=True)")
        steps = sorted(self.step_xtx)
        if len(alphas) != len(steps):
            raise ValueError(f"{len(alphas)} weights for {len(steps)} steps")
        acc = torch.zeros_like(self.xtx)
        n = 0.0
        for a, t in zip(alphas, steps):
            acc.add_(self.step_xtx[t], alpha=a)
            n += a * self.step_energy[t][1]
        return acc * (2.0 / n)

    @property
    def mean(self) -> torch.Tensor:
        return self.xsum / self.weight

    @property
    def var(self) -> torch.Tensor:
        return (self.xtx.diagonal() / self.weight - self.mean**2).clamp_min(0)


def check_stats(stats: dict) -> None:
    """Every layer saw calibration inputs and they are finite; else ``SolverError`` naming the layer."""
    from .obs import SolverError

    for name, st in stats.items():
        if st.weight == 0:
            raise SolverError(f"layer {name}: no calibration inputs reached it")
        if not bool(torch.isfinite(st.xtx).all()):
            raise SolverError(f"layer {name}: its calibration inputs hold NaN or inf (the model's activations "
                              "overflow; try --dtype float32 or a lower guidance)")


def unique_mb(stats: dict) -> float:
    """MiB of the distinct float32 X^T X accumulators in ``stats`` (shared ones counted once)."""
    return sum(st.xtx.numel() * 4 for st in {id(st): st for st in stats.values()}.values()) / 2**20


def calib_options(cfg) -> dict:
    """``Calibration`` keyword arguments a ``PruneConfig`` sets: the token subset and its seed."""
    return {"tokens": cfg.calib_tokens, "token_seed": cfg.seed}


class Calibration:
    """Collects timestep-weighted input statistics for a set of layers of one denoiser.

    Usage::

        calib = Calibration(denoiser, {"blocks.0.attn.to_q": module, ...}, alphas)
        with calib:
            for batch in prompts:
                calib.begin_run()
                pipe(batch, num_inference_steps=len(alphas), output_type="latent")
        H = calib.stats["blocks.0.attn.to_q"].H

    ``per_step=True`` also keeps each step's X_t^T X_t (T times the memory; for analysis of a few layers).

    Layers that read the same input tensor in a row (``to_q``/``to_k``/``to_v``, ``add_q/k/v_proj``, Flux's
    single-stream ``to_q/k/v`` and ``proj_mlp``) share one accumulator (``shared``; ``stats`` holds the same
    object under each name), found at run time by tensor identity, so X^T X is formed once. ``tokens``: a seeded
    random subset of that many tokens per image and step goes into the statistics (``obslib.seeds.token_subset``;
    default: all).
    """

    def __init__(self, denoiser: nn.Module, layers: dict[str, nn.Module], alphas: list[float], per_step: bool = False,
                 tokens: int | None = None, token_seed: int = 0, share_inputs: bool = True,
                 run_prompts: list[list[int]] | None = None, calls_per_step: int = 1):
        self.denoiser, self.layers, self.alphas = denoiser, layers, list(alphas)
        self.step = 0  # number of denoiser calls in the current sampling run
        self.calls_per_step = int(calls_per_step)  # denoiser calls per sampling step (2 with FluxPipeline's true CFG)
        self.run = -1  # index of the current sampling run (begin_run counts them)
        self.stats = {}
        for name, m in layers.items():
            n_in = weight_matrix(m).shape[1]
            self.stats[name] = LayerStats(n_in, m.weight.device, per_step)
        self.tokens, self.token_seed, self.share_inputs = tokens, token_seed, share_inputs
        self.run_prompts = list(run_prompts) if run_prompts is not None else []  # prompt numbers of each run
        self.shared: dict[str, str] = {}  # layer -> the layer whose accumulator it shares (same input tensor)
        self._prompts: list[int] | None = None
        self._prev = None  # (input tensor, layer) of the last hooked layer in this denoiser call
        self._subsets: dict[tuple, torch.Tensor] = {}
        self._handles = []

    def begin_run(self, prompts: list[int] | None = None, calls_per_step: int | None = None) -> None:
        """A new sampling run; ``prompts``: the numbers of its prompts (token subsets are drawn per prompt), else
        those recorded for this run number (a replay), else the run's own numbering; ``calls_per_step``: the
        denoiser calls each step of this run makes (the sampler says: ``CalibrationRunner.calls_per_step``)."""
        self.step = 0
        if calls_per_step is not None:
            self.calls_per_step = int(calls_per_step)
        self.run += 1
        if prompts is not None:
            self.run_prompts[self.run:self.run + 1] = [list(prompts)]
        self._prompts = self.run_prompts[self.run] if self.run < len(self.run_prompts) else None

    def end_run(self) -> None:
        self._prev = None
        if self.step != len(self.alphas) * self.calls_per_step:
            raise RuntimeError(
                f"calibration run made {self.step} denoiser calls but {len(self.alphas)} weights were given "
                f"({self.calls_per_step} call(s) per step); use a first-order sampler with num_inference_steps equal "
                "to the weighting length")

    def _pre_hook(self, module, args, kwargs=None):
        self.step += 1
        self._prev = None
        self._subsets.clear()
        if self.step > len(self.alphas) * self.calls_per_step:
            raise RuntimeError(f"denoiser called {self.step} times in one run; expected "
                               f"{len(self.alphas) * self.calls_per_step}")

    @property
    def current_step(self) -> int:
        """The 1-based sampling step of the current denoiser call."""
        return (self.step - 1) // self.calls_per_step + 1

    def _subset(self, batch: int, length: int) -> torch.Tensor:
        """(batch, tokens) positions kept of each image in this call: image b is prompt b mod P of the run, in CFG
        half b // P; the same for every layer whose inputs have this shape in this call."""
        key = (batch, length)
        if key not in self._subsets:
            p = self._prompts
            if p and batch % len(p) == 0:
                keys = [(p[b % len(p)], b // len(p)) for b in range(batch)]
            else:
                keys = [(-1 - self.run, b) for b in range(batch)]
            self._subsets[key] = torch.stack([token_subset(self.token_seed, i, h, self.step, length, self.tokens)
                                              for i, h in keys])
        return self._subsets[key]

    def rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as rows (tokens x in), float32; with ``tokens`` a seeded subset of each image's tokens."""
        if not self.tokens or x.dim() < 3:
            return input_matrix(module, x)
        if isinstance(module, nn.Conv2d):
            x3 = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        else:
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        B, L, D = x3.shape
        if L > self.tokens:
            idx = self._subset(B, L).to(x3.device)
            x3 = x3[torch.arange(B, device=x3.device)[:, None], idx]
        return x3.reshape(-1, D).float()

    def _hook(self, name):
        module = self.layers[name]

        def hook(mod, inputs, output):
            x = inputs[0]
            prev = self._prev
            if self.share_inputs and prev is not None and prev[0] is x:  # the tensor the last hooked layer read
                self._share(name, prev[1])
                return
            if name in self.shared:
                raise RuntimeError(f"layer {name} read the same input as {self.shared[name]} before but not in this "
                                   "call; calibrate with share_inputs=False")
            self._prev = (x, name)
            t = self.current_step
            self.stats[name].add(self.rows(module, x.detach()), self.alphas[t - 1], t)

        return hook

    def _share(self, name: str, leader: str) -> None:
        root = self.shared.get(leader, leader)
        if name not in self.shared:
            if self.stats[name].tokens:
                raise RuntimeError(f"layer {name} read its own inputs before and now {root}'s; calibrate with "
                                   "share_inputs=False")
            self.shared[name] = root
            self.stats[name] = self.stats[root]  # one accumulator: the same X^T X
        elif self.shared[name] != root:
            raise RuntimeError(f"layer {name} shared {self.shared[name]}'s input before and now {root}'s")

    def __enter__(self):
        self._handles.append(self.denoiser.register_forward_pre_hook(self._pre_hook))
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
