"""Structured OBS: FFN neurons and attention heads, with compensation and physical removal.

Pruning a group S of input columns of an output projection W (out x in) with Hessian H costs

    L_S = 1/2 tr( W_S ([H^-1]_SS)^-1 W_S^T )

and the optimal compensation of the remaining columns is  dW = -W_S ([H^-1]_SS)^-1 [H^-1]_{S,:}.
A neuron is a single column of the down projection; a head is its block of head_dim columns of the
attention output projection. After the columns are chosen, the matching rows of the up projection
(or of q/k/v) are physically deleted and the head count updated; nothing upstream is compensated.

For MMDiT joint attention, image and text tokens share heads but have two output projections with two
Hessians: heads are ranked in each and fused with Reciprocal Rank Fusion, S_j = sum_p 1/(k + r_p(j)).
"""
from __future__ import annotations

import torch

from .obs import check_finite, damped_inverse

RRF_K = 60


def _inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    return damped_inverse(H, percdamp)[0]


def _free(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """W with the columns of dead inputs (H_jj == 0) zeroed: they never change the output, so removing them
    costs nothing and saliencies must see them as zero."""
    dead = H.diagonal() == 0
    if bool(dead.any()):
        W = W.clone()
        W[:, dead] = 0
    return W


def group_saliency(W: torch.Tensor, Hinv: torch.Tensor, groups: list[list[int]], exact: bool = True) -> torch.Tensor:
    """OBS cost of removing each group of columns (exact group form, or the diagonal approximation)."""
    out = []
    for S in groups:
        Ws = W[:, S]
        if exact:
            out.append(0.5 * torch.einsum("ij,jk,ik->", Ws, torch.linalg.inv(Hinv[S][:, S]), Ws))
        else:
            out.append(0.5 * ((Ws**2).sum(0) / Hinv[S, S]).sum())
    return torch.stack(out)


def removal_costs(Ws: list[torch.Tensor], Hs: list[torch.Tensor], group_size: int, percdamp: float = 0.01) -> torch.Tensor:
    """Each group's OBS removal cost relative to its projections' output energy, summed over the projections:
    sum_p L_S(W_p, H_p) / tr(W_p Hd_p W_p^T), groups = consecutive blocks of ``group_size`` columns (a head's
    head_dim, or 1 for a neuron). The scale on which groups of different layers compare (``obslib.allocation``)."""
    n = Ws[0].shape[1] // group_size
    groups = [list(range(i * group_size, (i + 1) * group_size)) for i in range(n)]
    total = torch.zeros(n, dtype=torch.float64)
    for W, H in zip(Ws, Hs):
        check_finite("the weight", W)
        W, H = W.detach().double(), H.double()
        Hinv = _inverse(H, percdamp)
        Wf = _free(W, H)
        if group_size == 1:  # a single column: the exact form is the diagonal one
            sal = 0.5 * (Wf ** 2).sum(0) / Hinv.diagonal()
        else:
            sal = group_saliency(Wf, Hinv, groups, exact=True)
        energy = float(torch.einsum("ij,jk,ik->", W, H, W))
        total += sal.cpu() / max(energy, 1e-300)
    return total


def group_update(W: torch.Tensor, Hinv: torch.Tensor, S: list[int]) -> torch.Tensor:
    """W with the columns S removed (set to zero) and the rest optimally compensated."""
    HSS = Hinv[S][:, S]
    W = W - W[:, S] @ torch.linalg.solve(HSS, Hinv[S, :])
    W[:, S] = 0
    return W


def prune_neurons(W: torch.Tensor, H: torch.Tensor, n_remove: int, batch: int = 16, percdamp: float = 0.01):
    """Remove ``n_remove`` input columns (neurons) of a down projection with OBS compensation.

    Neurons are removed in batches: the ``batch`` lowest-saliency columns (saliency
    ||W_:,q||^2 / (2 [H^-1]_qq) on the current weights), compensated jointly, then H^-1 is recomputed over
    the remaining columns. Dead neurons (H_qq == 0: never active on the calibration data) cost nothing and
    are removed first. Returns (W_hat, removed column indices).
    """
    check_finite("the weight", W)
    W = W.detach().double().clone()
    alive = list(range(W.shape[1]))
    removed: list[int] = []
    while len(removed) < n_remove:
        Ha = H[alive][:, alive]
        Hinv = _inverse(Ha, percdamp)
        Wa = W[:, alive]
        sal = (_free(Wa, Ha) ** 2).sum(0) / (2 * Hinv.diagonal())
        sal[Ha.diagonal() == 0] = -1.0  # dead first, whatever their weights
        b = min(batch, n_remove - len(removed))
        local = torch.topk(sal, b, largest=False).indices.tolist()
        Wa = group_update(Wa, Hinv, local)
        W[:, alive] = Wa
        chosen = [alive[i] for i in local]
        removed += chosen
        alive = [c for c in alive if c not in set(chosen)]
    return W, sorted(removed)


def rrf_fuse(saliencies: list[torch.Tensor], k: int = RRF_K) -> torch.Tensor:
    """Reciprocal Rank Fusion of per-projection head saliencies; the largest fused score is pruned first.

    Rank 1 = least salient head in that projection.
    """
    score = torch.zeros_like(saliencies[0], dtype=torch.float64)
    for s in saliencies:
        ranks = torch.empty_like(score)
        ranks[torch.argsort(s)] = torch.arange(1, len(s) + 1, dtype=torch.float64)
        score += 1.0 / (k + ranks)
    return score


def prune_heads(Ws: list[torch.Tensor], Hs: list[torch.Tensor], head_dim: int, n_remove: int,
                exact: bool = True, percdamp: float = 0.01, rrf_k: int = RRF_K):
    """Remove ``n_remove`` heads shared by one or more output projections (one head per iteration).

    Each projection p has weight Ws[p] (out_p x heads*head_dim) and Hessian Hs[p]. With several
    projections the heads are ranked per projection and fused by RRF; each projection is compensated with
    its own H^-1. Returns (list of W_hat, removed head indices).
    """
    for W in Ws:
        check_finite("the weight", W)
    Ws = [W.detach().double().clone() for W in Ws]
    n_heads = Ws[0].shape[1] // head_dim
    alive = list(range(n_heads))
    removed: list[int] = []
    for _ in range(n_remove):
        cols = [c for h in alive for c in range(h * head_dim, (h + 1) * head_dim)]
        groups = [list(range(i * head_dim, (i + 1) * head_dim)) for i in range(len(alive))]
        sals, Hinvs = [], []
        for W, H in zip(Ws, Hs):
            Hc = H[cols][:, cols]
            Hinv = _inverse(Hc, percdamp)
            Hinvs.append(Hinv)
            sals.append(group_saliency(_free(W[:, cols], Hc), Hinv, groups, exact))
        pick = int(torch.argmin(sals[0])) if len(Ws) == 1 else int(torch.argmax(rrf_fuse(sals, rrf_k)))
        for p, (W, Hinv) in enumerate(zip(Ws, Hinvs)):
            W[:, cols] = group_update(W[:, cols], Hinv, groups[pick])
        removed.append(alive.pop(pick))
    return Ws, sorted(removed)
