"""Baselines, run through the same calibration / package / weighting machinery as OBS-Diff.

Magnitude: |W| with one threshold per matrix (N:M: smallest |W| per row in each group of M).
"""
from __future__ import annotations

import torch

from .methods import Method, register


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the n lowest scores in every group of m consecutive inputs of each row."""
    rows, cols = score.shape
    full = cols - cols % m
    g = score[:, :full].reshape(rows, -1, m)
    idx = torch.topk(g, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, full)
    return torch.cat([mask, torch.zeros(rows, cols - full, dtype=torch.bool, device=score.device)], 1)


def global_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(score.numel() * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask


def _magnitude(W, stats, sparsity, n, m, cfg):
    W = W.detach().double().clone()
    score = W.abs()
    mask = nm_mask(score, n, m) if n else global_mask(score, sparsity)
    W[mask] = 0
    return W, mask


register(Method("magnitude", needs_calibration=False, unstructured=_magnitude,
                description="|W| per layer, no calibration, no compensation"))
