"""The pruning methods as a registry: one entry per ``--method``.

A method supplies, per granularity, a function that turns a layer's weight and calibration statistics
into pruned weights. Unstructured / N:M functions take (W, stats, sparsity, n, m, cfg) and return
(W_hat, mask); structured ones return compensated output-projection weights, the removed heads or
neurons and optional bias deltas (added where the layer has a bias). The driver (``obslib.driver``) is the same for every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import baselines
from .obs import obs_prune
from .structured import prune_heads, prune_neurons


@dataclass(frozen=True)
class Method:
    name: str
    needs_calibration: bool = True
    needs_training: bool = False  # trains the denoiser on its own loss (obslib.prune builds the batches)
    forced_weighting: str | None = None  # e.g. SparseGPT: uniform
    unstructured: Callable | None = None
    heads: Callable | None = None
    neurons: Callable | None = None
    driver: Callable | None = None  # a whole-model driver replacing the per-unit one (SlimDiff, gradient flow)
    patterns: tuple[str, ...] | None = None  # the patterns it supports (None: decided by the functions above)
    ignores: tuple[str, ...] = ()  # PruneConfig fields it does not use (the CLI says so when they are set)
    allocation: str = "uniform"  # its allocation when PruneConfig.allocation is None
    description: str = ""


def _obs_unstructured(W, stats, sparsity, n, m, cfg):
    dtype = torch.float64 if cfg.solver_dtype == "float64" else torch.float32
    return obs_prune(W, stats.H, sparsity, n, m, blocksize=cfg.blocksize, percdamp=cfg.percdamp, dtype=dtype,
                     return_error=True)


def _obs_heads(Ws, stats, head_dim, n_remove, cfg):
    new, removed = prune_heads(Ws, [s.H for s in stats], head_dim, n_remove,
                               exact=cfg.head_saliency == "exact", percdamp=cfg.percdamp)
    return new, removed, None


def _obs_neurons(W, stats, n_remove, cfg):
    new, removed = prune_neurons(W, stats.H, n_remove, batch=cfg.neuron_batch, percdamp=cfg.percdamp)
    return new, removed, None


def _slimdiff(*args, **kwargs):
    from .slimdiff import slimdiff_prune

    return slimdiff_prune(*args, **kwargs)


def _gradient_flow(*args, **kwargs):
    from .gradflow import gradient_flow_prune

    return gradient_flow_prune(*args, **kwargs)


_TABLE = [
    Method("obs-diff", unstructured=_obs_unstructured, heads=_obs_heads, neurons=_obs_neurons,
           description="OBS with the timestep-aware Hessian (the paper's method)"),
    Method("sparsegpt", forced_weighting="uniform", unstructured=_obs_unstructured, heads=_obs_heads,
           neurons=_obs_neurons, description="OBS-Diff's solver with uniform timestep weights"),
    Method("magnitude", needs_calibration=False, unstructured=baselines.magnitude_prune,
           description="|W| per layer; no calibration, no compensation"),
    Method("wanda", unstructured=baselines.wanda_prune, description="|W|*||X|| per output row; no compensation"),
    Method("dsnot", unstructured=baselines.dsnot_prune, description="Wanda mask refined by training-free swaps"),
    Method("l1-norm", needs_calibration=False, heads=baselines.l1_heads, neurons=baselines.l1_neurons,
           description="structured: L1 norm of output-projection columns; no compensation"),
    Method("flap", heads=baselines.flap_heads, neurons=baselines.flap_neurons,
           description="structured: fluctuation score with bias compensation"),
    Method("slimdiff", driver=_slimdiff, patterns=("structured",), ignores=("packages", "calibration"), allocation="global",
           description="SlimDiff reconstruction: spectral QK / VO / FFN slimming with a global rank allocator"),
    Method("gradient-flow", needs_calibration=False, needs_training=True, driver=_gradient_flow,
           patterns=("structured",), ignores=("packages", "weighting", "calibration"),
           description="gradient-flow reconstruction: soft gates on heads / neurons, GraSP criterion, training"),
]
METHODS: dict[str, Method] = {m.name: m for m in _TABLE}
