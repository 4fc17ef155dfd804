"""OBS solver for unstructured and N:M sparsity (SparseGPT-style lazy column blocks).

For a weight W (out x in) and Hessian H (in x in) of the layer-wise objective
sum_t alpha_t ||W X_t - W_hat X_t||^2, pruning weight q of a row costs  L_q = w_q^2 / (2 [H^-1]_qq)
and the optimal compensation of the row is  dw = -(w_q / [H^-1]_qq) H^-1_{:,q}.

Columns are processed left to right; once a column is done it is frozen, so the inverse Hessian of
the remaining columns is read off the upper Cholesky factor U of H^-1 (row j of U, divided by U_jj,
is the OBS update direction of column j over columns j..in). Work is done in lazy blocks of
``blocksize`` columns whose errors are pushed to later columns in one matrix product.
"""
from __future__ import annotations

import torch


def damped_inverse(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp I)^-1 in float64, damp = percdamp * mean(diag H), dead inputs (H_ii == 0) set to H_ii = 1;
    returns the inverse and the mask of dead inputs."""
    H = H.clone().double()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    return torch.cholesky_inverse(torch.linalg.cholesky(H)), dead


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp I)^-1 and the mask of dead inputs (H_ii == 0)."""
    Hinv, dead = damped_inverse(H, percdamp)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def obs_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` to ``sparsity`` (unstructured) or N:M (prune_n of every prune_m inputs per row).

    Returns (W_hat, mask) with mask True where a weight was removed. ``W`` is not modified.
    """
    W = W.detach().double().clone()
    rows, cols = W.shape
    U, dead = damped_inverse_cholesky(H, percdamp)
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        if prune_n == 0:
            score = W1**2 / d.reshape(1, -1) ** 2
            k = int(score.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                idx = torch.topk(score.flatten(), k, largest=False).indices
                mask1.view(-1)[idx] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if prune_n != 0 and (i1 + i) % prune_m == 0:
                score = W1[:, i:i + prune_m] ** 2 / d[i:i + prune_m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(score, prune_n, dim=1, largest=False).indices, True)
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    mask |= dead.unsqueeze(0).expand_as(mask) & (W == 0)
    return W, mask


def saliency(W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Textbook OBS saliency w_q^2 / (2 [H^-1]_qq) of every weight (all columns still present)."""
    Hinv, _ = damped_inverse(H, percdamp)
    return W.double() ** 2 / (2 * Hinv.diagonal().unsqueeze(0))


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """rel_error = ||WX - W_hat X||^2_F / ||WX||^2_F on the weighted calibration inputs (via H)."""
    W, W_hat, H = W.double(), W_hat.double(), H.double()
    D = W - W_hat
    num = torch.einsum("ij,jk,ik->", D, H, D)
    den = torch.einsum("ij,jk,ik->", W, H, W)
    return float(num / den) if den > 0 else 0.0


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row has at least n pruned weights."""
    rows, cols = mask.shape
    g = mask[:, : cols - cols % m].reshape(rows, -1, m).sum(-1)
    return bool((g >= n).all())
