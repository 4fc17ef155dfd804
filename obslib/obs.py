"""OBS solver for unstructured and N:M sparsity (SparseGPT-style lazy column blocks).

For a weight W (out x in) and Hessian H (in x in) of the layer-wise objective
sum_t alpha_t ||W X_t - W_hat X_t||^2, the textbook OBS step removes the weight q of a row with the least
cost  L_q = w_q^2 / (2 [H^-1]_qq)  and compensates every other weight of the row by
dw = -(w_q / [H^-1]_qq) H^-1_{:,q}  (``saliency`` below is this textbook cost).

The solver does not apply the textbook rule over all columns. Like SparseGPT it is *sequential*: columns
are processed left to right, and once a column is done it is frozen, so the error of column j is pushed
only onto the columns to its right. The cost and update of column j then use the inverse Hessian of the
columns j..in alone, H_F^-1 with F = {j, ..., in}; it is read off the upper Cholesky factor U of H^-1:
[H_F^-1]_jj = U_jj^2 and row j of U divided by U_jj is the update direction over F. The mask is chosen
once per lazy block of ``blocksize`` columns (per row group of M columns for N:M) from w^2 / U_jj^2 on
the weights as updated so far; block errors reach later columns in one matrix product.

Inputs that never fire (H_jj == 0, "dead") carry no information: their weights are set to zero at no
cost, and they do not enter the damping (damp = percdamp * mean of the live diagonal).
"""
from __future__ import annotations

import torch


class SolverError(ValueError):
    """A layer cannot be solved: non-finite weights or statistics, or a Hessian that stays singular."""


def check_finite(name: str, T: torch.Tensor) -> None:
    bad = int((~torch.isfinite(T)).sum())
    if bad:
        raise SolverError(f"{name} has {bad} non-finite value(s) (NaN or inf) out of {T.numel()}")


DAMP_RETRIES = 4  # a Cholesky that fails is retried with 10x the damping, this many times


def damped_inverse(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp I)^-1 in float64 and the mask of dead inputs (H_jj == 0).

    damp = percdamp * mean(diag H) over the live inputs; dead inputs get a unit diagonal (their rows and
    columns of H are zero, so this only keeps the matrix invertible). A factorisation that fails is
    retried with ten times the damping up to ``DAMP_RETRIES`` times, then ``SolverError``."""
    check_finite("the Hessian", H)
    H = H.detach().double().clone()
    diag = H.diagonal()
    dead = diag == 0
    live_mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    H[dead, dead] = 1.0
    damp = percdamp * live_mean
    for attempt in range(DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(len(H), dtype=H.dtype, device=H.device))
        if int(info) == 0:
            return torch.cholesky_inverse(L), dead
        damp = max(damp, 1e-12) * 10
    raise SolverError(f"the Hessian is not positive definite even with damping {damp / 10:.3g} "
                      f"({percdamp} x {10 ** DAMP_RETRIES} of the mean diagonal)")


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp I)^-1 and the mask of dead inputs (H_ii == 0)."""
    Hinv, dead = damped_inverse(H, percdamp)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise SolverError("the inverse Hessian lost positive definiteness in float64 (raise percdamp)")
    return U, dead


def obs_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` to ``sparsity`` (unstructured) or N:M (prune_n of every prune_m inputs per row).

    Returns (W_hat, mask) with mask True where a weight was removed. ``W`` is not modified. With N:M an
    incomplete last group of fewer than M inputs stays dense (as in ``baselines.nm_mask``).
    """
    check_finite("the weight", W)
    if prune_m and blocksize % prune_m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={prune_m} for N:M sparsity")
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
            if prune_n != 0 and (i1 + i) % prune_m == 0 and i1 + i + prune_m <= cols:
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
