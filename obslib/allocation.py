"""Where the budget goes: ``--allocation global`` (unstructured and structured) and the uniform split of a
structured parameter budget.

Unstructured. The rule. Every weight w_ij of every layer of a package gets the OBS cost of removing it alone, relative to its
layer's output energy,

    r_ij = w_ij^2 / [Hd^-1]_jj / tr(W Hd W^T)        (Hd = H + damp I, the damped H every solve uses),

so costs of different layers are on one scale (the share of that layer's output they would destroy). One threshold
tau is chosen for the whole package; layer l gets the share F_l(tau) of its weights with r <= tau, clipped to
[s - max_shift, s + max_shift] (so no layer is left dense or emptied), and tau is found by bisection so that the
package removes s x its weights in total (to within one weight per layer). Each layer is then pruned by the OBS
solver at its own sparsity. Layers whose removal is cheap (relative to what they contribute) give more.
This is the closed-form analogue of OWL-style non-uniform sparsity, computed per package because a package's
Hessians are all that exist at once (packages are contiguous blocks, so the allocation is global within each).
N:M has no allocation: every layer must keep exactly N of M for the sparse kernels.

Structured, global. Every head and every FFN neuron of the package's units is a candidate, scored by its OBS removal
cost relative to its layers' output energy (``structured.removal_costs``) divided by the parameters removing it saves
(``surgery.group_params``). The cheapest go first, skipping any that would overshoot, until the package has given
``budget`` x its targeted parameters (so the total lands within one neuron of the budget); every unit keeps at least
one head / neuron. Only the counts come from this ranking: each unit is then pruned to its count by the OBS solver,
which re-scores after every removal and compensates.

Structured, uniform with a parameter budget. Every block gives the same share of heads (``--head-sparsity``, else
the budget, rounded to whole heads per block) and the FFN neurons make up the rest of the budget, every FFN at the
same share (``uniform_shares``).
"""
from __future__ import annotations

import torch

from .errors import UsageError
from .hessian import weight_matrix
from .obs import damped_inverse, output_energy
from .structured import removal_costs
from .surgery import group_params, head_layout, n_remove, neuron_layout, unit_name

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


def uniform_shares(den, units, budget: float, total_params: int, head_share: float | None = None) -> tuple[float, float]:
    """(head share, neuron share) for a structured parameter budget with every block alike (module docstring)."""
    sizes = {unit_name(u): group_params(den, u) for u in units}
    h = budget if head_share is None else head_share
    by_heads = sum(n_remove(n, h) * per for u in units if u.kind == "heads" for n, per in [sizes[unit_name(u)]])
    neuron_params = sum(n * per for u in units if u.kind == "neurons" for n, per in [sizes[unit_name(u)]])
    rest = budget * total_params - by_heads
    if rest < -0.5:
        raise UsageError(f"the heads alone remove {by_heads / total_params:.3f} of the targeted parameters, more than "
                         f"the budget {budget}; lower --head-sparsity or raise --param-budget")
    if neuron_params == 0:
        if rest > 0.5 and not any(u.kind == "heads" for u in units):
            raise UsageError(f"the budget {budget} cannot be met: no FFN neurons to remove here")
        return h, 0.0
    share = max(rest, 0.0) / neuron_params
    most = min((n - 1) / n for u in units if u.kind == "neurons" for n, _ in [sizes[unit_name(u)]])
    if share > most:
        raise UsageError(f"the budget {budget} cannot be met with {h:g} of the heads: the FFNs would lose {share:.3f} "
                         f"of their neurons (at most {most:.3f}); raise --head-sparsity or lower --param-budget")
    return h, share


def unit_inputs(den, unit, stats) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(weights, Hessians, group size) of a structured unit's groups: the heads' leading columns of the output
    projections, or the neurons' trailing columns of the down projection."""
    if unit.kind == "heads":
        heads, head_dim, hi = head_layout(den, unit)
        Ws = [weight_matrix(den.get_submodule(n))[:, :hi] for n in unit.hessian_layers]
        return Ws, [stats[n].H[:hi, :hi] for n in unit.hessian_layers], head_dim
    inner, lo = neuron_layout(den, unit)
    n = unit.hessian_layers[0]
    H = stats[n].H
    return [weight_matrix(den.get_submodule(n))[:, lo:]], [H[-inner:, -inner:]], 1


def structured_counts(den, units, stats, budget_params: float, percdamp: float = 0.01) -> dict[str, int]:
    """Heads / neurons removed per unit (by name) under the global structured rule of the module docstring."""
    cands = []
    counts = {}
    for u in units:
        Ws, Hs, size = unit_inputs(den, u, stats)
        cost = removal_costs(Ws, Hs, size, percdamp)
        _, per = group_params(den, u)
        name = unit_name(u)
        counts[name] = 0
        order = torch.argsort(cost)[:-1]  # the most expensive group of every unit is always kept
        cands += [(float(cost[i]) / per, per, name) for i in order]
    cands.sort(key=lambda c: c[0])
    removed = 0
    for _, per, name in cands:
        if removed + per <= budget_params + 0.5:
            counts[name] += 1
            removed += per
    return counts


def shares_for_params(den, units, params: dict[str, int]) -> dict[str, float]:
    """Per unit name, the share of its heads / neurons whose parameters come closest to ``params[name]`` (another
    method's per-group budget, e.g. ``slimdiff.removed_by_unit``); units it does not name give nothing."""
    out = {}
    for u in units:
        n, per = group_params(den, u)
        k = min(n - 1, round(params.get(unit_name(u), 0) / per))
        out[unit_name(u)] = k / n
    return out
