"""Baselines, run through the same calibration / package / weighting machinery as OBS-Diff.

- magnitude: |W| with one threshold per matrix (N:M: smallest |W| per row in each group of M).
- wanda: |W_ij| * ||X_j||_2, pruned per output row (N:M per row and group); no weight update.
- dsnot: Wanda's mask refined without training: per row, swap one pruned and one kept weight per cycle
  when it shrinks the expected reconstruction error |sum_{j pruned} W_ij E[X_j]| (regrow by
  W E[X] / Var(X), prune the lowest Wanda score); at most 50 cycles; N:M swaps stay inside a group.
- l1-norm (structured): heads / neurons ranked by the L1 norm of their output-projection columns; no
  compensation.
- flap (structured): fluctuation score Var(X_j) ||W_:,j||^2 with bias compensation W_:,pruned E[X_pruned].

The method table (``obslib.methods``) names these functions; ``sparsegpt`` is OBS-Diff's solver with uniform
timestep weights.
"""
from __future__ import annotations

import torch

from .structured import rrf_fuse


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the n lowest scores in every group of m consecutive inputs of each row."""
    rows, cols = score.shape
    full = cols - cols % m
    g = score[:, :full].reshape(rows, -1, m)
    idx = torch.topk(g, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, full)
    return torch.cat([mask, torch.zeros(rows, cols - full, dtype=torch.bool, device=score.device)], 1)


def global_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the lowest ``sparsity`` share of all scores (one threshold per matrix)."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the lowest ``sparsity`` share of each row."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def _masked(W, mask):
    W = W.detach().double().clone()
    W[mask] = 0
    return W, mask


def magnitude_prune(W, stats, sparsity, n, m, cfg):
    score = W.detach().double().abs()
    return _masked(W, nm_mask(score, n, m) if n else global_mask(score, sparsity))


def wanda_score(W, stats) -> torch.Tensor:
    # ||X_j||^2 is proportional to diag(H); the per-row comparison is scale-free
    return W.detach().double().abs() * stats.H.double().diagonal().clamp_min(0).sqrt().unsqueeze(0)


def wanda_prune(W, stats, sparsity, n, m, cfg):
    score = wanda_score(W, stats)
    return _masked(W, nm_mask(score, n, m) if n else row_mask(score, sparsity))


def dsnot_refine(W, stats, mask, m: int = 0, cycles: int = 50):
    """Swap pruned/kept weights per row while |expected reconstruction error| strictly decreases.

    Returns the refined mask and the per-cycle objective (sum over rows of |e_r|), non-increasing.
    """
    W = W.detach().double()
    mu = stats.mean.double()
    var = stats.var.double().clamp_min(1e-12)
    wanda = wanda_score(W, stats)
    contrib = W * mu  # c_rj: what pruning j adds to row r's expected error
    mask = mask.clone()
    rows, cols = W.shape
    group = torch.arange(cols) // m if m else torch.zeros(cols, dtype=torch.long)
    history = []
    for _ in range(cycles):
        e = (contrib * mask).sum(1)
        history.append(float(e.abs().sum()))
        s = torch.sign(e).unsqueeze(1)
        # grow: the pruned weight whose contribution has the sign of e, largest |c| / Var
        grow = torch.where(mask & (torch.sign(contrib) == s), contrib.abs() / var, torch.full_like(W, -1.0))
        j = grow.argmax(1)
        ok = grow.gather(1, j[:, None]).squeeze(1) > 0
        e_grown = e - contrib.gather(1, j[:, None]).squeeze(1)
        # prune: among kept weights (same N:M group as j), the lowest Wanda score that keeps |e| smaller
        cand = (~mask) & (group.unsqueeze(0) == group[j].unsqueeze(1))
        e_new_all = e_grown.unsqueeze(1) + contrib
        better = cand & (e_new_all.abs() < e.abs().unsqueeze(1))
        pscore = torch.where(better, wanda, torch.full_like(W, float("inf")))
        k = pscore.argmin(1)
        ok &= torch.isfinite(pscore.gather(1, k[:, None]).squeeze(1))
        if not ok.any():
            break
        r = torch.nonzero(ok).squeeze(1)
        mask[r, j[r]] = False
        mask[r, k[r]] = True
    history.append(float((contrib * mask).sum(1).abs().sum()))
    return mask, history


def dsnot_prune(W, stats, sparsity, n, m, cfg):
    _, mask = wanda_prune(W, stats, sparsity, n, m, cfg)
    mask, _ = dsnot_refine(W, stats, mask, m if n else 0, cycles=cfg.extra.get("dsnot_cycles", 50) if cfg else 50)
    return _masked(W, mask)


# --- structured baselines -----------------------------------------------------------------------

def _pick_heads(scores_per_proj: list[torch.Tensor], n_remove: int) -> list[int]:
    fused = scores_per_proj[0] if len(scores_per_proj) == 1 else -rrf_fuse(scores_per_proj)
    return sorted(torch.topk(fused, n_remove, largest=False).indices.tolist())


def _zero_cols(Ws, cols):
    out = []
    for W in Ws:
        W = W.detach().double().clone()
        W[:, cols] = 0
        out.append(W)
    return out


def _head_cols(heads, head_dim):
    return [c for h in heads for c in range(h * head_dim, (h + 1) * head_dim)]


def l1_heads(Ws, stats, head_dim, n_remove, cfg):
    scores = [W.double().abs().sum(0).reshape(-1, head_dim).sum(1) for W in Ws]
    removed = _pick_heads(scores, n_remove)
    return _zero_cols(Ws, _head_cols(removed, head_dim)), removed, None


def l1_neurons(W, stats, n_remove, cfg):
    removed = sorted(torch.topk(W.double().abs().sum(0), n_remove, largest=False).indices.tolist())
    return _zero_cols([W], removed)[0], removed, None


def _flap_score(W, st):
    return st.var.double() * (W.double() ** 2).sum(0)


def _flap_bias(W, st, cols):
    return W.double()[:, cols] @ st.mean.double()[cols]


def flap_heads(Ws, stats, head_dim, n_remove, cfg):
    scores = [_flap_score(W, st).reshape(-1, head_dim).sum(1) for W, st in zip(Ws, stats)]
    removed = _pick_heads(scores, n_remove)
    cols = _head_cols(removed, head_dim)
    return _zero_cols(Ws, cols), removed, [_flap_bias(W, st, cols) for W, st in zip(Ws, stats)]


def flap_neurons(W, st, n_remove, cfg):
    removed = sorted(torch.topk(_flap_score(W, st), n_remove, largest=False).indices.tolist())
    return _zero_cols([W], removed)[0], removed, _flap_bias(W, st, removed)
