"""SlimDiff-style spectral slimming (arXiv 2509.21498), a *reconstruction*.

SlimDiff's method section is not available offline (see ``../shared/paper/peers-brief.md``). Its abstract
states: training-free and gradient-free structural compression of attention and FFN widths, posed as a
spectral approximation with activation covariances gathered across denoising timesteps, decomposed per
functional group (query-key, value-output, FFN), with the budget distributed unevenly by an automatic
allocator. The closed forms below are those of its closest published relative (MoDeGPT, arXiv 2408.09632)
applied to those three groups. Each choice that fills a gap is marked **[gap]**.

Statistics: one calibration pass (``Calibration``, timestep weights apply) collects, per attention module,
the second moment C = E_alpha[x x^T] and mean of the tokens entering each query and key projection (values
are computed from the same tokens as keys in every diffusers attention, so the key statistics serve the
values), and per FFN the second moment of the hidden activations (the down projection's input). Biases
are handled by augmenting x with a constant 1 (C~ = [[C, mu], [mu^T, 1]]).

* **FFN (Nystrom).** Keep the k hidden neurons of largest ridge leverage diag(C (C + lam I)^-1) (equivalently
  smallest diag((C + lam I)^-1)), lam = 1e-3 x mean diag C **[gap: lam]**; drop the other rows of the up
  projection (GEGLU: both halves); refit the down projection and its bias in closed form,
  [W_S, b] = [W, b] C~[:, S+] (C~[S+, S+])^-1 — the least-squares fit of the full FFN output from the kept
  neurons.
* **Value-output, per head.** With G_v = sum_s w_s W~_v,s C~_s W~_v,s^T the covariance of the head's value
  vectors (streams s weighted by their token share w_s; in MMDiT joint attention image and text values share
  the head) and G_o = sum_o w_o W_o,o^T W_o,o the metric of its output projections, the best rank-r map
  M (head_dim x head_dim) minimising E||W_o (I - M) v||^2 is found by the SVD of L_o^T L_v (G = L L^T);
  new W_v = P W_v and W_o = W_o Q with Q P = M — one basis for every stream's value and output
  projection. The split of the singular values between P and Q is ours **[gap]**.
* **Query-key, per head.** The logits x_i^T W_q^T W_k x_j form a bilinear map; with G_q, G_k the
  covariances of query and key vectors (both streams), the best rank-r M minimising E(q^T (I - M) k)^2
  comes from the SVD of L_q^T L_k; new W_q = P_q W_q, W_k = P_k W_k with P_q^T P_k = M. The softmax keeps
  the original head dimension's scale (``processors``). With QK-norm (SD3.5, Flux) the map is not linear:
  QK is left alone, with a one-line notice.
* **Allocation.** **[gap: the paper's "propagation-aware" allocator is not public]** Each group g offers
  levels (ranks 1..head_dim per module, shared by its heads; FFN keep-counts in steps of 1/16 of the
  width) with a relative spectral error e_g (discarded whitened energy / total) and a parameter count. A
  greedy allocator repeatedly takes the move, over all groups and all lower levels, with the smallest
  increase of e_g per parameter saved, until the budget (``sparsity`` x the targeted groups' parameters)
  is met.
* One rank per attention module for all its heads (SDPA needs equal dimensions across heads) **[gap]**;
  blocks as for structured OBS-Diff (first and last excluded by default); Flux single-stream blocks (fused
  ``proj_out``) are not slimmed **[ours]**.

The result is physically smaller: the new shapes go to the manifest (``obslib_manifest.json``, with the
reshaped attention processors and their softmax scales) and ``obslib.load_pruned`` rebuilds it.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .archs import has, spec_for
from .hessian import Calibration, LayerStats, calib_options, check_stats
from .errors import UsageError
from .obs import SolverError, check_finite
from .processors import reshaped_processor
from .surgery import keep_rows, linear_like, replace_module, targeted_size

FFN_LEVELS = 16  # FFN keep-counts offered to the allocator: width x (1 - j/16), j = 0..15
RIDGE = 1e-3  # ridge of the leverage scores, relative to the mean diagonal
EPS = 1e-6  # relative damping of the Cholesky factors of the Gram matrices


# ---------------------------------------------------------------------------------------- closed forms
def second_moment(stats: LayerStats, augment: bool) -> torch.Tensor:
    """E_alpha[x x^T] (float64); with ``augment`` the moment of [x, 1]: [[C, mu], [mu^T, 1]]."""
    C = stats.H.double() / 2
    if not augment:
        return C
    mu = stats.mean.double()
    n = len(C)
    out = torch.empty(n + 1, n + 1, dtype=torch.float64, device=C.device)
    out[:n, :n], out[:n, n], out[n, :n], out[n, n] = C, mu, mu, 1.0
    return out


def _chol(G: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Lower Cholesky factor of a Gram matrix with a small relative ridge (retried with more)."""
    G = G.double()
    scale = float(G.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(len(G), dtype=G.dtype, device=G.device)
    for k in range(5):
        L, info = torch.linalg.cholesky_ex(G + eps * 10**k * scale * eye)
        if int(info) == 0:
            return L
    raise SolverError("a Gram matrix is not positive semi-definite")


def spectral_pair(G_left: torch.Tensor, G_right: torch.Tensor):
    """Whitened core of the identity pairing between two spaces of one dimension n, with Grams G_left and
    G_right: returns (L_left, L_right, U, S, V) with L_left^T L_right = U diag(S) V^T."""
    Ll, Lr = _chol(G_left), _chol(G_right)
    U, S, Vh = torch.linalg.svd(Ll.T @ Lr)
    return Ll, Lr, U, S, Vh.T


def rank_factors(pair, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_left, P_right), each r x n, with P_left^T P_right the rank-r M minimising ||L_l^T (I - M) L_r||_F
    (Eckart-Young on the whitened core); at r = n, P_left^T P_right = I exactly."""
    Ll, Lr, U, S, V = pair
    s = S[:r].sqrt()
    Pl = torch.linalg.solve_triangular(Ll.T, U[:, :r], upper=True) * s
    Pr = torch.linalg.solve_triangular(Lr.T, V[:, :r], upper=True) * s
    return Pl.T, Pr.T


def tail_energy(S: torch.Tensor) -> torch.Tensor:
    """Relative discarded energy at each rank r = 0..n: sum_{i >= r} S_i^2 / sum S_i^2."""
    e = S.double() ** 2
    tot = e.sum().clamp_min(1e-300)
    return torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)]) / tot


def ridge_leverage_order(C: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Neurons by decreasing ridge leverage diag(C (C + lam I)^-1) (the most informative first)."""
    n = len(C)
    lam = ridge * float(C.diagonal().mean().clamp_min(1e-30))
    inv_diag = torch.linalg.inv(C + lam * torch.eye(n, dtype=C.dtype, device=C.device)).diagonal()
    return torch.argsort(inv_diag, stable=True)


def nystrom_refit(W: torch.Tensor, Ct: torch.Tensor, keep: torch.Tensor, has_bias: bool):
    """Least-squares refit of the down projection on the kept neurons.

    ``W`` is [W_down, b] (out x (h+1)) when ``has_bias`` else W_down, ``Ct`` the matching second moment.
    Returns (W_new over the kept columns (+ bias column), relative output error)."""
    h = Ct.shape[0] - (1 if has_bias else 0)
    idx = torch.cat([keep, torch.tensor([h], device=keep.device)]) if has_bias else keep
    A = Ct[idx][:, idx]
    A = A + EPS * float(A.diagonal().mean().clamp_min(1e-30)) * torch.eye(len(A), dtype=A.dtype, device=A.device)
    B = Ct[:, idx]  # (h(+1)) x |idx|
    W_new = torch.linalg.solve(A, (W @ B).T).T
    full = torch.einsum("ij,jk,ik->", W, Ct, W)
    kept = torch.einsum("ij,jk,ik->", W_new, A, W_new)  # = tr(W B A^-1 B^T W^T) at the optimum
    err = float(((full - kept) / full.clamp_min(1e-300)).clamp(0, 1))
    return W_new, err


# ------------------------------------------------------------------------------------------- groups
@dataclass
class Group:
    """One allocation group: its levels (descending; index 0 = untouched), relative error and parameters."""

    name: str
    kind: str  # "ffn", "qk" or "vo"
    levels: list[int]
    errors: list[float]
    params: list[int]
    data: dict = field(default_factory=dict, repr=False)
    choice: int = 0


def _stream_triplets(block, group) -> list[tuple[str, str, str]]:
    """The head group's (q, k, v) projections per stream (``HeadGroup.inputs`` lists them in threes)."""
    ins = group.inputs
    out = []
    for i in range(0, len(ins) - len(ins) % 3, 3):
        q, k, v = ins[i:i + 3]
        if all(has(block, n) for n in (q, k, v)):
            out.append((q, k, v))
    return out


def _aug(lin: nn.Linear, rows: slice) -> torch.Tensor:
    """Rows of [W, b] (bias column of zeros when the layer has none)."""
    W = lin.weight.detach().double()[rows]
    b = lin.bias.detach().double()[rows] if lin.bias is not None else W.new_zeros(W.shape[0])
    return torch.cat([W, b[:, None]], 1)


def plan_groups(den, spec, units, notices: list[str]):
    """Attention modules and FFNs of the targeted units, with the layers whose inputs must be calibrated."""
    attns, ffns, layers = [], [], {}
    for u in units:
        block = den.get_submodule(u.block)
        g = u.group
        if u.kind == "heads":
            attn = block.get_submodule(g.attn)
            if g.out_cols:
                notices.append(f"{u.block}.{g.attn}: fused single-stream projection, not slimmed")
                continue
            proc = reshaped_processor(attn)
            if proc is None:
                notices.append(f"{u.block}.{g.attn}: attention processor {type(attn.processor).__name__} "
                               "cannot be reshaped; left alone")
                continue
            streams = _stream_triplets(block, g)
            outs = [o for o in g.outs if has(block, o)]
            if not streams or not outs:
                continue
            qk_norm = any(getattr(attn, n, None) is not None for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
            a = dict(name=f"{u.block}.{g.attn}", block=u.block, attn=attn, proc=proc, outs=outs, streams=streams,
                     qk=not qk_norm)
            if qk_norm:
                notices.append(f"{a['name']}: QK-norm makes the query-key map non-linear; its Q/K width is kept")
            attns.append(a)
            for q, k, _ in streams:
                layers[f"{u.block}.{q}"] = den.get_submodule(f"{u.block}.{q}")
                layers[f"{u.block}.{k}"] = den.get_submodule(f"{u.block}.{k}")
        else:
            if g.down_cols:
                notices.append(f"{u.block}.{g.down}: fused single-stream projection, not slimmed")
                continue
            down = f"{u.block}.{g.down}"
            ffns.append(dict(name=down, block=u.block, ups=[f"{u.block}.{x}" for x in g.ups if has(block, x)], down=down))
            layers[down] = den.get_submodule(down)
    return attns, ffns, layers


def _ffn_sizes(den, f) -> tuple[int, list[int], int]:
    """(width, keep-count levels, parameters per neuron) of one FFN: what the allocator can choose from."""
    down = den.get_submodule(f["down"])
    h = down.in_features
    ups = [den.get_submodule(n) for n in f["ups"]]
    per_neuron = down.out_features + sum((2 if u.out_features == 2 * h else 1) * (u.in_features + (u.bias is not None))
                                         for u in ups)
    levels = sorted({max(1, round(h * (1 - j / FFN_LEVELS))) for j in range(FFN_LEVELS)}, reverse=True)
    return h, levels, per_neuron


def _attn_sizes(den, a) -> list[tuple[str, int, int]]:
    """(kind, head dim, parameters per rank) of the value-output and (without QK-norm) query-key groups."""
    attn, blk, lin = a["attn"], a["block"], den.get_submodule
    heads = attn.heads
    vn = [f"{blk}.{v}" for _, _, v in a["streams"]]
    on = [f"{blk}.{o}" for o in a["outs"]]
    qk = [f"{blk}.{x}" for q, k, _ in a["streams"] for x in (q, k)]
    hd_qk = lin(f"{blk}.{a['streams'][0][0]}").out_features // heads
    hd_v = lin(vn[0]).out_features // heads
    per_vo = heads * (sum(lin(n).in_features + (lin(n).bias is not None) for n in vn) + sum(lin(n).out_features for n in on))
    out = [("vo", hd_v, per_vo)]
    if a["qk"]:
        out.append(("qk", hd_qk, heads * sum(lin(n).in_features + (lin(n).bias is not None) for n in qk)))
    return out


def max_removable(den, attns, ffns) -> int:
    """The most parameters slimdiff can remove here (every group at its lowest level): known before calibration."""
    total = 0
    for f in ffns:
        h, levels, per_neuron = _ffn_sizes(den, f)
        total += (h - levels[-1]) * per_neuron
    for a in attns:
        total += sum((hd - 1) * per_rank for _, hd, per_rank in _attn_sizes(den, a))
    return total


def _ffn_group(den, f, stats) -> Group:
    down = den.get_submodule(f["down"])
    h, levels, per_neuron = _ffn_sizes(den, f)
    st = stats[f["down"]]
    has_bias = down.bias is not None
    Ct = second_moment(st, has_bias)
    order = ridge_leverage_order(Ct[:h, :h])
    W = _aug(down, slice(None)) if has_bias else down.weight.detach().double()
    errors = [nystrom_refit(W, Ct, torch.sort(order[:k]).values, has_bias)[1] if k < h else 0.0 for k in levels]
    return Group(f["name"], "ffn", levels, errors, [k * per_neuron for k in levels],
                 dict(f, order=order, Ct=Ct, W=W, has_bias=has_bias, h=h))


def _weighted_gram(projs, stats_names, den, stats, head: slice, weights) -> torch.Tensor:
    G = 0
    for name, sname, w in zip(projs, stats_names, weights):
        Wa = _aug(den.get_submodule(name), head)
        G = G + w * Wa @ second_moment(stats[sname], True) @ Wa.T
    return G


def _attn_groups(den, a, stats) -> list[Group]:
    attn, blk = a["attn"], a["block"]
    heads = attn.heads
    q0 = den.get_submodule(f"{blk}.{a['streams'][0][0]}")
    hd_qk = q0.out_features // heads
    hd_v = den.get_submodule(f"{blk}.{a['streams'][0][2]}").out_features // heads
    qn = [f"{blk}.{q}" for q, _, _ in a["streams"]]
    kn = [f"{blk}.{k}" for _, k, _ in a["streams"]]
    vn = [f"{blk}.{v}" for _, _, v in a["streams"]]
    on = [f"{blk}.{o}" for o in a["outs"]]
    wq = torch.tensor([stats[n].weight for n in qn], dtype=torch.float64)
    wk = torch.tensor([stats[n].weight for n in kn], dtype=torch.float64)
    wq, wk = wq / wq.sum(), wk / wk.sum()
    # output tokens are the query tokens of their stream: to_out <- stream 0, to_add_out <- stream 1
    wo = [float(wq[min(i, len(wq) - 1)]) for i in range(len(on))]
    groups = []
    vo_pairs, qk_pairs = [], []
    for h in range(heads):
        rv = slice(h * hd_v, (h + 1) * hd_v)
        Gv = _weighted_gram(vn, kn, den, stats, rv, wk)
        Go = sum(w * den.get_submodule(n).weight.detach().double()[:, rv].T @ den.get_submodule(n).weight.detach().double()[:, rv]
                 for n, w in zip(on, wo))
        vo_pairs.append(spectral_pair(Go, Gv))
        if a["qk"]:
            rq = slice(h * hd_qk, (h + 1) * hd_qk)
            qk_pairs.append(spectral_pair(_weighted_gram(qn, qn, den, stats, rq, wq),
                                          _weighted_gram(kn, kn, den, stats, rq, wk)))

    def group(kind, pairs, hd, per_rank):
        energy = sum(tail_energy(p[3]) * float((p[3] ** 2).sum()) for p in pairs)
        total = sum(float((p[3] ** 2).sum()) for p in pairs)
        levels = list(range(hd, 0, -1))
        errors = [float(energy[r] / max(total, 1e-300)) for r in levels]
        return Group(f"{a['name']}:{kind}", kind, levels, errors, [r * per_rank for r in levels],
                     dict(a, pairs=pairs, hd=hd, q=qn, k=kn, v=vn, o=on))

    for kind, hd, per_rank in _attn_sizes(den, a):
        groups.append(group(kind, vo_pairs if kind == "vo" else qk_pairs, hd, per_rank))
    return groups


# --------------------------------------------------------------------------------------- allocation
def allocate(groups: list[Group], budget: int) -> int:
    """Greedy: lower the level of the group whose move costs the least error per parameter saved, until
    ``budget`` parameters are saved. Sets each group's ``choice``; returns the parameters saved."""
    saved = 0
    while saved < budget:
        best = None
        for g in groups:
            c = g.choice
            for lv in range(c + 1, len(g.levels)):
                dp = g.params[c] - g.params[lv]
                if dp <= 0:
                    continue
                ratio = (g.errors[lv] - g.errors[c]) / dp
                if best is None or ratio < best[0]:
                    best = (ratio, g, lv)
        if best is None:
            possible = sum(g.params[0] - g.params[-1] for g in groups)
            raise UsageError(f"the budget of {budget} parameters cannot be met: slimdiff can remove at most {possible} "
                             "here; lower --sparsity")
        _, g, lv = best
        saved += g.params[g.choice] - g.params[lv]
        g.choice = lv
    return saved


def allocate_uniform(groups: list[Group], budget: int) -> int:
    """``--allocation uniform`` for SlimDiff: every group gives the same share of its parameters. The largest common
    share s whose levels (each group at the first level removing at least s of its parameters) stay under the budget is
    found by bisection; then groups, the least cut and then the cheapest error per parameter first, go one level further
    until the budget is met
    (levels are discrete: an FFN moves in 1/16 of its width, a rank in 1/head_dim). Sets ``choice``; returns the
    parameters saved."""
    def levels_at(share: float) -> list[int]:
        out = []
        for g in groups:
            lv = next((i for i in range(len(g.levels)) if g.params[0] - g.params[i] >= share * g.params[0]),
                      len(g.levels) - 1)
            out.append(lv)
        return out

    def saved(lvs) -> int:
        return sum(g.params[0] - g.params[lv] for g, lv in zip(groups, lvs))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if saved(levels_at(mid)) < budget:
            lo = mid
        else:
            hi = mid
    for g, lv in zip(groups, levels_at(lo)):
        g.choice = lv
    total = saved([g.choice for g in groups])
    def next_step(g):  # the least-cut groups first, then the cheapest error per parameter
        nxt = min(g.choice + 1, len(g.levels) - 1)
        return (1 - g.params[g.choice] / g.params[0],
                (g.errors[nxt] - g.errors[g.choice]) / max(g.params[g.choice] - g.params[nxt], 1))

    for g in sorted(groups, key=next_step):
        if total >= budget:
            break
        if g.choice + 1 < len(g.levels):
            total += g.params[g.choice] - g.params[g.choice + 1]
            g.choice += 1
    if total < budget:
        raise UsageError(f"the budget of {budget} parameters cannot be met: slimdiff can remove at most {total} here; "
                         "lower --sparsity")
    return total


def removed_by_unit(report: dict) -> dict[str, int]:
    """Parameters a SlimDiff report removed per structured unit name: its attention's query-key and value-output
    groups together ("block.attn"), each FFN by its down projection: the budget per group that
    ``obslib.allocation.shares_for_params`` turns into heads and neurons for another method."""
    out: dict[str, int] = {}
    for name, r in report["ranks"].items():
        unit = name.split(":")[0]
        out[unit] = out.get(unit, 0) + int(r["params_removed"])
    return out


# ------------------------------------------------------------------------------------------ apply
def _replace(den, name, weight, bias, undo) -> None:
    undo.module(name)
    old = den.get_submodule(name)
    replace_module(den, name, linear_like(old, weight.to(old.weight.dtype), None if bias is None else bias.to(old.weight.dtype)))


def _project_rows(den, name, Ps, hd, undo) -> None:
    """Replace head h's rows of [W, b] by P_h [W, b] (P_h: r x hd) for every head."""
    lin = den.get_submodule(name)
    rows = [Ps[h] @ _aug(lin, slice(h * hd, (h + 1) * hd)) for h in range(len(Ps))]
    Wb = torch.cat(rows)
    check_finite("the slimmed weight", Wb)
    _replace(den, name, Wb[:, :-1], Wb[:, -1] if lin.bias is not None else None, undo)


def apply_group(den, g: Group, undo) -> dict:
    lv = g.levels[g.choice]
    if g.kind == "ffn":
        d = g.data
        keep = torch.sort(d["order"][:lv]).values
        W_new, err = nystrom_refit(d["W"], d["Ct"], keep, d["has_bias"])
        check_finite("the refitted down projection", W_new)
        _replace(den, d["down"], W_new[:, :lv], W_new[:, lv] if d["has_bias"] else None, undo)
        for up in d["ups"]:
            gated = den.get_submodule(up).out_features == 2 * d["h"]
            undo.module(up)
            keep_rows(den, up, torch.cat([keep, keep + d["h"]]) if gated else keep)
        return {"name": g.name, "kind": "ffn", "kept": lv, "of": d["h"], "rel_error": err}
    d = g.data
    factors = [rank_factors(p, lv) for p in d["pairs"]]
    if g.kind == "qk":
        for n in d["q"]:
            _project_rows(den, n, [f[0] for f in factors], d["hd"], undo)
        for n in d["k"]:
            _project_rows(den, n, [f[1] for f in factors], d["hd"], undo)
    else:
        for n in d["v"]:
            _project_rows(den, n, [f[1] for f in factors], d["hd"], undo)
        for n in d["o"]:
            lin = den.get_submodule(n)
            W = lin.weight.detach().double()
            Wn = torch.cat([W[:, h * d["hd"]:(h + 1) * d["hd"]] @ factors[h][0].T for h in range(len(factors))], 1)
            check_finite("the slimmed weight", Wn)
            _replace(den, n, Wn, None if lin.bias is None else lin.bias.detach(), undo)
    attn = d["attn"]
    if not isinstance(attn.processor, d["proc"]):
        undo.attrs(attn, ("processor",))
        attn.set_processor(d["proc"](attn.scale))
    return {"name": g.name, "kind": g.kind, "rank": lv, "head_dim": d["hd"], "rel_error": g.errors[g.choice]}


def project_attention(den, unit, qk_rank: int, vo_rank: int, undo, seed: int = 0) -> None:
    """SlimDiff's shapes on one heads unit without its calibration: per head, the query and key rows projected to
    ``qk_rank`` and the value rows and output columns to ``vo_rank`` by random orthonormal maps, with the reshaped
    processor. For benchmarks that time the shapes (``obslib.study.bench_speed``); the weights mean nothing."""
    from .surgery import head_layout

    heads, hd, _ = head_layout(den, unit)
    block = den.get_submodule(unit.block)
    attn = block.get_submodule(unit.group.attn)
    gen = torch.Generator().manual_seed(seed)

    def maps(r):
        return [torch.linalg.qr(torch.randn(hd, r, generator=gen, dtype=torch.float64))[0].T for _ in range(heads)]

    pqk, pvo = maps(qk_rank), maps(vo_rank)
    for q, k, v in _stream_triplets(block, unit.group):
        for name, P in ((q, pqk), (k, pqk), (v, pvo)):
            _project_rows(den, f"{unit.block}.{name}", P, hd, undo)
    for o in unit.group.outs:
        if has(block, o):
            lin = block.get_submodule(o)
            W = lin.weight.detach().double()
            Wn = torch.cat([W[:, h * hd:(h + 1) * hd] @ pvo[h].T for h in range(heads)], 1)
            _replace(den, f"{unit.block}.{o}", Wn, None if lin.bias is None else lin.bias.detach(), undo)
    undo.attrs(attn, ("processor",))
    attn.set_processor(reshaped_processor(attn)(attn.scale))


# ------------------------------------------------------------------------------------------ driver
def slimdiff_prune(den, cfg, steps: int, component: str, undo, block_ids: list[int], calibrate=None,
                   alphas=None) -> dict:
    """Calibrate once, score every group's levels, allocate the budget, slim in place; returns the report
    fields particular to SlimDiff (the driver in ``obslib.driver`` adds the common ones)."""
    from .packages import structured_units
    from .weighting import timestep_weights

    spec = spec_for(den)
    units = structured_units(den, spec, block_ids)
    notices: list[str] = []
    attns, ffns, layers = plan_groups(den, spec, units, notices)
    if not attns and not ffns:
        raise UsageError("slimdiff found nothing to slim in the targeted blocks")
    if calibrate is None:
        raise UsageError("method 'slimdiff' needs calibration data")
    alphas = alphas or timestep_weights(cfg.weighting, steps, cfg.alpha_min, cfg.alpha_max)
    targeted = sorted({n for a in attns for t in a["streams"] for n in (f"{a['block']}.{x}" for x in t)}
                      | {f"{a['block']}.{o}" for a in attns for o in a["outs"]}
                      | {n for f in ffns for n in f["ups"] + [f["down"]]})
    target_before = targeted_size(den, targeted, "parameters")
    share = cfg.param_budget if cfg.param_budget is not None else cfg.sparsity  # both mean the same here
    budget, possible = int(round(share * target_before)), max_removable(den, attns, ffns)
    if budget > possible:  # before the calibration, not after it
        flag = "--sparsity" if cfg.param_budget is None else "--param-budget"
        raise UsageError(f"{flag} {share}: the budget of {budget} parameters cannot be met; slimdiff can "
                         f"remove at most {possible} of the {target_before} here ({possible / target_before:.3f}); "
                         "lower --sparsity")
    t0 = time.perf_counter()
    calib = Calibration(den, layers, alphas, **calib_options(cfg))
    mb = sum(s.xtx.numel() * 4 for s in calib.stats.values()) / 2**20
    if cfg.progress:
        print(f"slimdiff: calibrating {len(layers)} layers once, statistics need {mb:.1f} MiB (float32)", file=sys.stderr)
    with calib:
        calibrate(calib, "calibrate (slimdiff)")
    stats = calib.stats
    check_stats(stats)
    t_cal = time.perf_counter() - t0
    t = time.perf_counter()
    groups = []
    for f in tqdm(ffns, desc="slimdiff FFN spectra", disable=not cfg.progress, leave=False):
        groups.append(_ffn_group(den, f, stats))
    for a in tqdm(attns, desc="slimdiff attention spectra", disable=not cfg.progress, leave=False):
        groups += _attn_groups(den, a, stats)
    (allocate_uniform if cfg.allocation_used == "uniform" else allocate)(groups, budget)
    layers_report = [apply_group(den, g, undo) for g in groups if g.choice > 0]
    t_solve = time.perf_counter() - t
    if cfg.progress:
        for n in notices:
            print(f"slimdiff: {n}", file=sys.stderr)
    target_after = targeted_size(den, targeted, "parameters")
    ranks = {g.name: {"kind": g.kind, "level": g.levels[g.choice], "full": g.levels[0],
                      "rel_error": g.errors[g.choice], "params_removed": g.params[0] - g.params[g.choice]}
             for g in groups}
    return {
        "sparsity_actual": 1 - target_after / target_before, "sparsity_counts": "parameters",
        "targeted_params_before": target_before, "targeted_params_after": target_after,
        "hessian_mb_per_package": [mb],
        "timings": {"calibration_s": t_cal, "solve_s": t_solve},
        "layers": layers_report, "ranks": ranks, "notices": notices,
    }
