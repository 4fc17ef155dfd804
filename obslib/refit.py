"""Refit on a fixed mask: the least-squares optimum of the kept weights for the layer's own objective.

Every OBS solve minimises the layer error (W - W_hat) Hd (W - W_hat)^T row by row, with Hd = H + damp I the
damped Hessian (``obs.damping``). Once the mask is fixed (True = removed), row i's optimum over its kept inputs
S_i is the least-squares solution

    w_hat_S = (Hd_SS)^-1 (Hd w)_S ,   w_hat elsewhere = 0,

and nothing with this mask does better. SparseGPT's sequential update is not this optimum: column j's error is
pushed only onto the columns to its right, with the inverse Hessian of those columns alone, so the columns to its
left are never revisited (ALPS and OPTIMA refit them; the gain grows with the sparsity).

``refit`` solves every row's system at once by preconditioned conjugate gradients restricted to the kept inputs
(Jacobi preconditioner), starting from the OBS solution: each iteration costs one (rows x in) @ (in x in)
product, and a few iterations take most of the gain. In exact arithmetic CG never raises the objective; in
floating point a row whose error rose keeps its start, so the layer error never increases. ``refit_exact``
solves each row directly (tests and small layers).
"""
from __future__ import annotations

import torch

from .obs import check_finite, damping


def damped_hessian(H: torch.Tensor, percdamp: float = 0.01, dtype=torch.float64) -> torch.Tensor:
    """Hd = H + damp I with dead inputs on a unit diagonal: the matrix every solve works with (obs.damping)."""
    dead, damp = damping(H, percdamp)
    Hd = H.detach().to(dtype=dtype, copy=True)
    if bool(dead.any()):
        Hd[dead, dead] = 1.0
    Hd.diagonal().add_(damp)
    return Hd


def row_errors(W: torch.Tensor, V: torch.Tensor, Hd: torch.Tensor) -> torch.Tensor:
    """(w_i - v_i) Hd (w_i - v_i)^T for every row i."""
    D = (W - V).to(Hd.dtype)
    return ((D @ Hd) * D).sum(1)


def refit(W: torch.Tensor, W_hat: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, iterations: int = 20,
          percdamp: float = 0.01, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    """The kept weights of ``W_hat`` refitted to the least-squares optimum on ``mask`` (True = removed) by
    ``iterations`` of masked preconditioned CG; returns (W_refit, {"error_before", "error_after", "rows_kept"}),
    errors as sums over rows of (w - v) Hd (w - v)^T. ``W``, ``W_hat`` are not modified."""
    if iterations < 0:
        raise ValueError(f"iterations {iterations} must be >= 0")
    check_finite("the weight", W)
    Hd = damped_hessian(H, percdamp, dtype)
    Wd = W.detach().to(dtype)
    keep = (~mask).to(dtype)
    V = W_hat.detach().to(dtype) * keep
    diag = Hd.diagonal().clamp_min(1e-30)
    before = row_errors(Wd, V, Hd)
    R = ((Wd - V) @ Hd) * keep  # minus half the gradient on the kept inputs
    Z = R / diag
    P = Z.clone()
    rz = (R * Z).sum(1)
    for _ in range(iterations):
        AP = (P @ Hd) * keep
        pap = (P * AP).sum(1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-300), torch.zeros_like(pap))
        V.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], AP, value=-1)
        Z = R / diag
        rz_new = (R * Z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        P = Z + beta[:, None] * P
        rz = rz_new
    after = row_errors(Wd, V, Hd)
    worse = ~(after <= before)  # NaN counts as worse
    if bool(worse.any()):
        V[worse] = W_hat.detach().to(dtype)[worse] * keep[worse]
        after = torch.where(worse, before, after)
    out = V.to(W_hat.dtype)
    return out, {"error_before": float(before.sum()), "error_after": float(after.sum()), "rows_kept": int(worse.sum())}


def refit_exact(W: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The least-squares optimum on ``mask`` by a direct float64 solve per row (O(rows x kept^3): small layers)."""
    Hd = damped_hessian(H, percdamp, torch.float64)
    Wd = W.detach().double()
    out = torch.zeros_like(Wd)
    b = Wd @ Hd
    for i in range(W.shape[0]):
        S = ~mask[i]
        if bool(S.any()):
            out[i, S] = torch.linalg.solve(Hd[S][:, S], b[i, S])
    return out.to(W.dtype)
