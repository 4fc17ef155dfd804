"""OBS-Diff (the paper's method): OBS with the timestep-aware Hessian, per layer (unstructured, N:M) or per group
(heads and FFN neurons) with compensation."""
import torch

from ..obs import obs_prune
from ..structured import prune_heads, prune_neurons
from .base import Method


def obs_unstructured(W, stats, sparsity, n, m, cfg):
    dtype = torch.float64 if cfg.solver_dtype == "float64" else torch.float32
    return obs_prune(W, stats.H, sparsity, n, m, blocksize=cfg.blocksize, percdamp=cfg.percdamp, dtype=dtype,
                     return_error=True)


def obs_heads(Ws, stats, head_dim, n_remove, cfg):
    new, removed = prune_heads(Ws, [s.H for s in stats], head_dim, n_remove,
                               exact=cfg.head_saliency == "exact", percdamp=cfg.percdamp)
    return new, removed, None


def obs_neurons(W, stats, n_remove, cfg):
    new, removed = prune_neurons(W, stats.H, n_remove, batch=cfg.neuron_batch, percdamp=cfg.percdamp)
    return new, removed, None


METHOD = Method("obs-diff", "OBS with the timestep-aware Hessian (the paper's method)",
                unstructured=obs_unstructured, heads=obs_heads, neurons=obs_neurons,
                options=("head_saliency", "neuron_batch"))
