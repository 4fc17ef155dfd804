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

from .errors import SolverError  # noqa: F401  (obslib.obs.SolverError, as before)




def check_finite(name: str, T: torch.Tensor) -> None:
    if T.numel() == 0 or (bool(torch.isfinite(T.max())) and bool(torch.isfinite(T.min()))):
        return  # max/min propagate NaN and reach any inf: no tensor-sized temporary on the common path
    bad = int((~torch.isfinite(T)).sum())
    if bad:
        raise SolverError(f"{name} has {bad} non-finite value(s) (NaN or inf) out of {T.numel()}")


DAMP_RETRIES = 4  # a Cholesky that fails is retried with 10x the damping, this many times


def _dead_and_damp(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """The dead inputs (H_jj == 0) and damp = percdamp * mean of the live diagonal."""
    check_finite("the Hessian", H)
    diag = H.diagonal()
    dead = diag == 0
    live_mean = float(diag[~dead].double().mean()) if bool((~dead).any()) else 1.0
    return dead, percdamp * live_mean


def damping(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """The damping every solve applies to ``H``: the mask of dead inputs (H_jj == 0, put on a unit diagonal) and
    damp = percdamp * mean of the live diagonal, added to the diagonal before inverting (a factorisation that
    still fails is retried with more, see ``DAMP_RETRIES``)."""
    return _dead_and_damp(H, percdamp)


def _retry_damped(factor, damp: float, percdamp: float, dtypes):
    """factor(damp, dtype) over the dtypes, then with ten times the damping, up to DAMP_RETRIES times."""
    for _ in range(DAMP_RETRIES + 1):
        for dt in dtypes:
            try:
                return factor(damp, dt), dt
            except torch.linalg.LinAlgError:
                continue
        damp = max(damp, 1e-12) * 10
    raise SolverError(f"the Hessian is not positive definite even with damping {damp / 10:.3g} "
                      f"({percdamp} x {10 ** DAMP_RETRIES} of the mean diagonal)")


def damped_inverse(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp I)^-1 in float64 and the mask of dead inputs (H_jj == 0).

    damp = percdamp * mean(diag H) over the live inputs; dead inputs get a unit diagonal (their rows and
    columns of H are zero, so this only keeps the matrix invertible). A factorisation that fails is
    retried with ten times the damping up to ``DAMP_RETRIES`` times, then ``SolverError``."""
    dead, damp = _dead_and_damp(H, percdamp)
    H = H.detach().double().clone()
    H[dead, dead] = 1.0

    def factor(d, dt):
        return torch.cholesky_inverse(torch.linalg.cholesky(H + d * torch.eye(len(H), dtype=dt, device=H.device)))

    return _retry_damped(factor, damp, percdamp, (torch.float64,))[0], dead


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp I)^-1 in float64 and the mask of dead inputs (H_ii == 0)."""
    U, dead, _ = inverse_cholesky(H, percdamp, torch.float64)
    return U, dead


def _inverse_cholesky_in(H: torch.Tensor, dead: torch.Tensor, damp: float, dtype) -> torch.Tensor:
    """U with U^T U = (H + damp I)^-1 (dead inputs on a unit diagonal), in ``dtype``, in one n x n buffer."""
    A = H.detach().to(dtype=dtype, copy=True)
    if bool(dead.any()):
        A[dead, dead] = 1.0
    A.diagonal().add_(damp)
    # LAPACK works in column-major order: through the transposed view of the (symmetric) buffer every step runs
    # in place. B = L, then B = (L L^T)^-1, then B = L2 with L2 L2^T = H^-1, so A = B^T = L2^T = U.
    B = A.mT
    torch.linalg.cholesky(B, out=B)
    torch.cholesky_inverse(B, out=B)
    torch.linalg.cholesky(B, out=B)
    if not bool(torch.isfinite(A.diagonal()).all()):
        raise torch.linalg.LinAlgError("non-finite factor")
    return A


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, dtype: torch.dtype = torch.float32):
    """Upper Cholesky factor U of (H + damp I)^-1 for the solver, the mask of dead inputs and the dtype used.

    Tried in ``dtype`` first; a factorisation that fails in float32 is retried in float64 at the same
    damping, and only then with ten times the damping (up to ``DAMP_RETRIES`` times), then ``SolverError``.
    damp = percdamp * mean of the live diagonal. Extra memory: one n x n buffer."""
    dead, damp = _dead_and_damp(H, percdamp)
    dtypes = (dtype,) if dtype == torch.float64 else (dtype, torch.float64)
    U, dt = _retry_damped(lambda d, t: _inverse_cholesky_in(H, dead, d, t), damp, percdamp, dtypes)
    return U, dead, dt


def obs_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype = torch.float32,
              return_error: bool = False):
    """Prune ``W`` to ``sparsity`` (unstructured) or N:M (prune_n of every prune_m inputs per row).

    Returns (W_hat, mask) with mask True where a weight was removed, and with ``return_error`` also the
    squared output error the solve itself accumulated, sum_j ||w_j - q_j||^2 / U_jj^2 = tr((W - W_hat)
    (H + damp I) (W - W_hat)^T) (no second pass over W and H). ``W`` is not modified. Computed in ``dtype``
    (float32 by default; float64 where the factorisation needs it). With N:M an incomplete last group of
    fewer than M inputs stays dense (as in ``baselines.nm_mask``). Extra memory: W_hat, the mask (1 byte per
    weight), one n x n factor and a few ``blocksize``-wide panels.
    """
    check_finite("the weight", W)
    if prune_m and blocksize % prune_m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={prune_m} for N:M sparsity")
    U, dead, dt = inverse_cholesky(H, percdamp, dtype)
    rows, cols = W.shape
    # W is held transposed (column j of W = row j of Wt, contiguous), so every update below is in place on a
    # contiguous slab: no temporary the size of W.
    Wt = torch.empty(cols, rows, dtype=dt, device=W.device).copy_(W.detach().t())  # one allocation
    if bool(dead.any()):
        Wt[dead] = 0
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    sq_err = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2]  # (block x rows), updated in place
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        mask1 = torch.zeros(i2 - i1, rows, dtype=torch.bool, device=W.device)
        if prune_n == 0:
            k = int(W1.numel() * sparsity)
            if k > 0:
                score = (W1 / d.reshape(-1, 1)).square_()
                mask1.view(-1)[torch.topk(score.view(-1), k, largest=False, sorted=False).indices] = True
                del score
        for i in range(i2 - i1):
            w = W1[i]
            if prune_n != 0 and (i1 + i) % prune_m == 0 and i1 + i + prune_m <= cols:
                score = W1[i:i + prune_m] ** 2 / d[i:i + prune_m].reshape(-1, 1) ** 2
                mask1.scatter_(0, i + torch.topk(score, prune_n, dim=0, largest=False).indices, True)
            err = torch.where(mask1[i], w, torch.zeros_like(w)) / d[i]  # (w - q) / U_jj, q = 0 where pruned
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
            Err1[i] = err
        W1.masked_fill_(mask1, 0)
        mask[:, i1:i2] = mask1.t()
        sq_err += (Err1.double() ** 2).sum()
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    if bool(dead.any()):
        mask[:, dead] = True  # weights on inputs that never fire are removed for free
    W_hat = Wt.t()  # a transposed view: no copy
    return (W_hat, mask, float(sq_err)) if return_error else (W_hat, mask)


def output_energy(W: torch.Tensor, H: torch.Tensor, chunk: int = 1024) -> float:
    """tr(W H W^T) in row chunks (the denominator of rel_error without an out x in temporary)."""
    total = 0.0
    for r in range(0, W.shape[0], chunk):
        Wc = W[r:r + chunk].to(H.dtype)
        total += float(((Wc @ H) * Wc).sum(dtype=torch.float64))
    return total


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
