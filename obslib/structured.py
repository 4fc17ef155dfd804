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
import torch.nn as nn

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


def group_update(W: torch.Tensor, Hinv: torch.Tensor, S: list[int]) -> torch.Tensor:
    """W with the columns S removed (set to zero) and the rest optimally compensated."""
    HSS = Hinv[S][:, S]
    W = W - W[:, S] @ torch.linalg.solve(HSS, Hinv[S, :])
    W[:, S] = 0
    return W


def prune_neurons(W: torch.Tensor, H: torch.Tensor, n_remove: int, batch: int = 16, percdamp: float = 0.01,
                  exact_groups: bool = True):
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
        Wa = group_update(Wa, Hinv, local) if exact_groups else _diag_update(Wa, Hinv, local)
        W[:, alive] = Wa
        chosen = [alive[i] for i in local]
        removed += chosen
        alive = [c for c in alive if c not in set(chosen)]
    return W, sorted(removed)


def _diag_update(W, Hinv, S):
    for j in S:  # independent single-column OBS updates (ignores interactions inside the batch)
        W = W - W[:, [j]] @ (Hinv[[j], :] / Hinv[j, j])
    W[:, S] = 0
    return W


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


# ---------------------------------------------------------------------------------------------------
# Physical removal and the manifest that lets a pruned model be rebuilt before loading its weights.

def _resolve(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def keep_rows(root: nn.Module, name: str, keep: torch.Tensor) -> None:
    m = _resolve(root, name)
    _set(root, name, _linear_like(m, m.weight.data[keep], None if m.bias is None else m.bias.data[keep]))


def keep_cols(root: nn.Module, name: str, keep: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    m = _resolve(root, name)
    w = (m.weight.data if weight is None else weight.to(m.weight.dtype))[:, keep]
    _set(root, name, _linear_like(m, w, None if m.bias is None else m.bias.data))


def kept_index(n: int, removed: list[int], group: int = 1) -> torch.Tensor:
    gone = {c for r in removed for c in range(r * group, (r + 1) * group)}
    return torch.tensor([i for i in range(n * group) if i not in gone], dtype=torch.long)


def linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: [m.out_features, m.in_features] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def head_counts(model: nn.Module) -> dict[str, int]:
    return {n: int(m.heads) for n, m in model.named_modules() if hasattr(m, "heads") and isinstance(getattr(m, "heads"), int)}


def make_manifest(component: str, model: nn.Module, reference_shapes: dict, reference_heads: dict) -> dict:
    """Shapes and head counts that differ from the unpruned model built from the same config."""
    from .processors import BY_KIND

    shapes = {n: s for n, s in linear_shapes(model).items() if reference_shapes.get(n) != s}
    heads = {n: h for n, h in head_counts(model).items() if reference_heads.get(n) != h}
    attention = {n: {"processor": m.processor.kind, "scale": m.processor.scale} for n, m in model.named_modules()
                 if isinstance(getattr(m, "processor", None), tuple(BY_KIND.values()))}
    out = {"format": "obslib-structured-v1", "component": component, "linear_shapes": shapes, "heads": heads}
    if attention:  # reshaped Q/K/V head dimensions (SlimDiff): processors and the original softmax scales
        out["attention"] = attention
    return out


def apply_manifest(model: nn.Module, manifest: dict) -> None:
    """Resize a freshly built model to the manifest's shapes (weights are loaded afterwards)."""
    from .io import UsageError

    shapes, heads = manifest.get("linear_shapes"), manifest.get("heads")
    if not isinstance(shapes, dict) or not isinstance(heads, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v) for v in shapes.values()) \
            or not all(isinstance(h, int) and h > 0 for h in heads.values()):
        raise UsageError("the manifest's linear_shapes must map names to [out, in] positive integers and its heads "
                         "to positive integers")
    names = dict(model.named_modules())
    missing = [n for n in list(shapes) + list(heads) + list(manifest.get("attention", {})) if n not in names]
    if missing:
        raise UsageError(f"the manifest names modules the model does not have ({', '.join(missing[:3])})")
    for name, (out_f, in_f) in manifest["linear_shapes"].items():
        old = _resolve(model, name)
        _set(model, name, nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=old.weight.dtype))
    for name, h in manifest["heads"].items():
        set_heads(_resolve(model, name), h)
    if manifest.get("attention"):
        from .processors import BY_KIND

        for name, a in manifest["attention"].items():
            if not isinstance(a, dict) or a.get("processor") not in BY_KIND or not isinstance(a.get("scale"), float):
                raise UsageError(f"the manifest's attention entry for {name} is malformed")
            _resolve(model, name).set_processor(BY_KIND[a["processor"]](a["scale"]))


def set_heads(attn: nn.Module, heads: int) -> None:
    head_dim = attn.inner_dim // attn.heads if getattr(attn, "inner_dim", None) else None
    attn.heads = heads
    if head_dim is not None:
        attn.inner_dim = heads * head_dim
    if hasattr(attn, "inner_kv_dim") and head_dim is not None:
        attn.inner_kv_dim = heads * head_dim
