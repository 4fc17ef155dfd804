"""``--allocation global`` for unstructured sparsity: per-layer sparsities that spend the budget where OBS says
removing weights costs least.

The rule. Every weight w_ij of every layer of a package gets the OBS cost of removing it alone, relative to its
layer's output energy,

    r_ij = w_ij^2 / [Hd^-1]_jj / tr(W Hd W^T)        (Hd = H + damp I, the damped H every solve uses),

so costs of different layers are on one scale (the share of that layer's output they would destroy). One threshold
tau is chosen for the whole package; layer l gets the share F_l(tau) of its weights with r <= tau, clipped to
[s - max_shift, s + max_shift] (so no layer is left dense or emptied), and tau is found by bisection so that the
package removes s x its weights in total (to within one weight per layer). Each layer is then pruned by the OBS
solver at its own sparsity. Layers whose removal is cheap (relative to what they contribute) give more.
This is the closed-form analogue of OWL-style non-uniform sparsity, computed per package because a package's
Hessians are all that exist at once (packages are contiguous blocks, so the allocation is global within each).
"""
from __future__ import annotations

import torch

from .hessian import weight_matrix
from .obs import damped_inverse, output_energy

MAX_SHIFT = 0.2  # a layer's sparsity stays within the target +- this


def relative_costs(W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """r_ij of the module docstring for one layer (float32, the shape of W)."""
    Hinv, dead = damped_inverse(H, percdamp)
    d = Hinv.diagonal().clamp_min(1e-30)
    energy = max(output_energy(W, H.double()), 1e-300)
    r = (W.double() ** 2 / d.unsqueeze(0)) / energy
    r[:, dead] = 0.0  # dead inputs are free to remove
    return r.float()


def allocate(costs: dict[str, torch.Tensor], sparsity: float, max_shift: float = MAX_SHIFT) -> dict[str, float]:
    """Per-layer sparsities from the relative costs of each layer's weights (see the module docstring)."""
    if not costs:
        return {}
    lo_s, hi_s = max(0.0, sparsity - max_shift), min(0.999, sparsity + max_shift)
    flat = {k: torch.sort(v.flatten()).values for k, v in costs.items()}
    sizes = {k: v.numel() for k, v in flat.items()}
    total = sum(sizes.values())

    def shares(tau: float) -> dict[str, float]:
        out = {}
        for k, v in flat.items():
            f = float(torch.searchsorted(v, torch.tensor([tau], dtype=v.dtype), right=True)) / sizes[k]
            out[k] = min(max(f, lo_s), hi_s)
        return out

    def removed(tau: float) -> float:
        return sum(s * sizes[k] for k, s in shares(tau).items())

    target = sparsity * total
    merged = torch.sort(torch.cat(list(flat.values()))).values
    lo, hi = 0, len(merged) - 1  # bisection over the candidate thresholds: removed() is non-decreasing in tau
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(float(merged[mid])) < target:
            lo = mid + 1
        else:
            hi = mid
    out = shares(float(merged[hi]))
    # weights tied at the threshold (or the clipping) overshoot the target: take the excess back from every layer in
    # proportion to how far it can move, so ties are shared out evenly
    excess = sum(out[k] * sizes[k] for k in out) - target
    if abs(excess) > 1e-9:
        room = {k: ((out[k] - lo_s) if excess > 0 else (hi_s - out[k])) * sizes[k] for k in out}
        total_room = sum(room.values())
        if total_room > 0:
            for k in out:
                out[k] -= excess * room[k] / total_room / sizes[k]
    return out


def package_sparsities(den, names: list[str], stats: dict, sparsity: float, percdamp: float = 0.01,
                       max_shift: float = MAX_SHIFT) -> dict[str, float]:
    """``allocate`` over the named layers of one package, from their calibration statistics."""
    costs = {n: relative_costs(weight_matrix(den.get_submodule(n)), stats[n].H, percdamp) for n in names}
    return allocate(costs, sparsity, max_shift)
