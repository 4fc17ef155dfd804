"""Model surgery: every in-place edit of a denoiser and its rollback.

``Undo`` keeps what ``prune_model`` changes (a CPU copy of each weight, each replaced module, each head-count
attribute) so that a failed prune puts the model back exactly. The edits: replacing a module, slicing a
linear layer's rows or columns, removing attention heads and FFN neurons physically, setting head counts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .archs import attr, has
from .hessian import weight_matrix
from .obs import check_finite


class Undo:
    """What ``prune_model`` changes, kept so that ``rollback()`` puts the denoiser back exactly: a CPU copy
    of each weight changed in place, each module replaced by a smaller one, each head-count attribute."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self._weights: dict[str, tuple] = {}
        self._modules: list[tuple] = []
        self._attrs: list[tuple] = []
        self._params: list[tuple] = []

    def weight(self, name: str) -> None:
        if name not in self._weights:
            m = self.root.get_submodule(name)
            copy = [m, m.weight.detach().to("cpu", copy=True)]
            copy.append(None if getattr(m, "bias", None) is None else m.bias.detach().to("cpu", copy=True))
            self._weights[name] = tuple(copy)

    def module(self, name: str) -> None:
        parent, _, leaf = name.rpartition(".")
        owner = self.root.get_submodule(parent) if parent else self.root
        self._modules.append((owner, leaf, getattr(owner, leaf)))

    def attrs(self, obj, names) -> None:
        self._attrs.append((obj, {n: getattr(obj, n) for n in names if hasattr(obj, n)}))

    def parameters(self, name: str) -> None:
        """Every parameter of a module (trained in place), as CPU copies."""
        for p in self.root.get_submodule(name).parameters():
            self._params.append((p, p.detach().to("cpu", copy=True)))

    def rollback(self) -> None:
        with torch.no_grad():
            for owner, leaf, mod in reversed(self._modules):
                setattr(owner, leaf, mod)
            for obj, saved in reversed(self._attrs):
                for k, v in saved.items():
                    setattr(obj, k, v)
            for p, saved in reversed(self._params):
                p.data.copy_(saved.to(p.device))
            for m, w, b in self._weights.values():
                m.weight.data.copy_(w.to(m.weight.device))
                if b is not None:
                    m.bias.data.copy_(b.to(m.bias.device))
        self._weights.clear(), self._modules.clear(), self._attrs.clear(), self._params.clear()


class NoUndo(Undo):
    def __init__(self):
        super().__init__(None)

    def weight(self, name): pass

    def module(self, name): pass

    def attrs(self, obj, names): pass

    def parameters(self, name): pass


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def keep_rows(root: nn.Module, name: str, keep: torch.Tensor) -> None:
    m = root.get_submodule(name)
    replace_module(root, name, linear_like(m, m.weight.data[keep], None if m.bias is None else m.bias.data[keep]))


def keep_cols(root: nn.Module, name: str, keep: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    m = root.get_submodule(name)
    w = (m.weight.data if weight is None else weight.to(m.weight.dtype))[:, keep]
    replace_module(root, name, linear_like(m, w, None if m.bias is None else m.bias.data))


def kept_index(n: int, removed: list[int], group: int = 1) -> torch.Tensor:
    gone = {c for r in removed for c in range(r * group, (r + 1) * group)}
    return torch.tensor([i for i in range(n * group) if i not in gone], dtype=torch.long)


def set_heads(attn: nn.Module, heads: int) -> None:
    head_dim = attn.inner_dim // attn.heads if getattr(attn, "inner_dim", None) else None
    attn.heads = heads
    if head_dim is not None:
        attn.inner_dim = heads * head_dim
    if hasattr(attn, "inner_kv_dim") and head_dim is not None:
        attn.inner_kv_dim = heads * head_dim


def head_layout(den, unit) -> tuple[int, int, int]:
    """(heads, head_dim, hi) of a heads unit: the out projections' leading ``hi`` columns are the heads."""
    block = den.get_submodule(unit.block)
    g = unit.group
    heads = block.get_submodule(g.attn).heads
    cols = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[1]
    hi = attr(block, g.out_cols) if g.out_cols else cols
    return heads, hi // heads, hi


def neuron_layout(den, unit) -> tuple[int, int]:
    """(inner, lo) of a neurons unit: the down projection's columns lo.. are its ``inner`` neurons. A fused down
    projection (``down_cols``: Flux's single-stream ``proj_out`` reads attention and MLP outputs) has as many neuron
    columns as its up projection has rows (fused blocks' MLPs are not gated), which stays true after neurons are
    removed and after a pruned model is reloaded; the block attribute ``down_cols`` names keeps the width it was
    built with, so it only checks the layout of an unpruned block."""
    block = den.get_submodule(unit.block)
    cols = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[1]
    if not unit.group.down_cols:
        return cols, 0
    inner = block.get_submodule(unit.group.ups[0]).out_features
    built = attr(block, unit.group.down_cols)
    if inner > built:
        raise ValueError(f"{unit.block}.{unit.group.ups[0]} has {inner} rows, more than the block's "
                         f"{unit.group.down_cols} = {built}: not the fused layout the architecture table describes")
    return inner, cols - inner


def unit_name(unit) -> str:
    """A structured unit's name: its attention module ("block.attn") or its down projection."""
    return f"{unit.block}.{unit.group.attn}" if unit.kind == "heads" else unit.hessian_layers[0]


def group_params(den, unit) -> tuple[int, int]:
    """(groups, parameters per group) of a structured unit: what removing one head or neuron takes away (its rows of
    q/k/v or of the up projections, biases included, and its columns of the output / down projections)."""
    block = den.get_submodule(unit.block)
    g = unit.group
    if unit.kind == "heads":
        heads, head_dim, _ = head_layout(den, unit)
        per = sum(head_dim * (block.get_submodule(r).in_features + (block.get_submodule(r).bias is not None))
                  for r in g.inputs if has(block, r))
        per += sum(head_dim * weight_matrix(den.get_submodule(n)).shape[0] for n in unit.hessian_layers)
        return heads, per
    inner, _ = neuron_layout(den, unit)
    per = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[0]
    for up in g.ups:
        if has(block, up):
            lin = block.get_submodule(up)
            per += (2 if lin.out_features == 2 * inner else 1) * (lin.in_features + (lin.bias is not None))
    return inner, per


def n_remove(n: int, sparsity: float) -> int:
    """Groups removed from a unit of ``n`` heads or neurons (at least one is always kept)."""
    return min(n - 1, round(sparsity * n))


def add_bias(module, delta) -> None:
    """Bias compensation (FLAP): only where the layer has a bias."""
    if delta is not None and module.bias is not None:
        module.bias.data.add_(delta.to(module.bias.dtype))


def remove_heads(den, unit, removed: list[int], undo, new=None, biases=None) -> None:
    """Physically remove heads: their columns of the out projections (whose head columns are first replaced by
    ``new`` when given, e.g. OBS-compensated), their rows of q/k/v; the head count follows."""
    block = den.get_submodule(unit.block)
    g = unit.group
    attn = block.get_submodule(g.attn)
    heads, head_dim, hi = head_layout(den, unit)
    cols = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[1]
    keep = torch.cat([kept_index(heads, removed, head_dim), torch.arange(hi, cols)])
    for i, name in enumerate(unit.hessian_layers):
        full = weight_matrix(den.get_submodule(name))
        if new is not None:
            check_finite("the solution", new[i])
            full = full.clone()
            full[:, :hi] = new[i].to(full.dtype)
        undo.module(name)
        keep_cols(den, name, keep, full)
        add_bias(den.get_submodule(name), None if biases is None else biases[i])
    for rel in g.inputs:
        if has(block, rel):
            undo.module(f"{unit.block}.{rel}")
            keep_rows(den, f"{unit.block}.{rel}", keep[keep < hi])
    undo.attrs(attn, ("heads", "inner_dim", "inner_kv_dim"))
    set_heads(attn, heads - len(removed))


def remove_neurons(den, unit, removed: list[int], undo, new=None, bias=None) -> None:
    """Physically remove FFN neurons: their columns of the down projection (whose neuron columns are first
    replaced by ``new`` when given) and their rows of the up projection(s) (GEGLU: both halves)."""
    block = den.get_submodule(unit.block)
    name = unit.hessian_layers[0]
    inner, lo = neuron_layout(den, unit)
    full = weight_matrix(den.get_submodule(name))
    if new is not None:
        check_finite("the solution", new)
        full = full.clone()
        full[:, lo:] = new.to(full.dtype)
    keep_local = kept_index(inner, removed)
    undo.module(name)
    keep_cols(den, name, torch.cat([torch.arange(lo), lo + keep_local]), full)
    add_bias(den.get_submodule(name), bias)
    for up in unit.group.ups:
        gated = block.get_submodule(up).out_features == 2 * inner  # GEGLU: value and gate halves
        undo.module(f"{unit.block}.{up}")
        keep_rows(den, f"{unit.block}.{up}", torch.cat([keep_local, keep_local + inner]) if gated else keep_local)


def targeted_layers(den, spec, units, structured) -> list[str]:
    if not structured:
        return [n for u in units for n in u.hessian_layers]
    names = []
    for u in units:
        block = den.get_submodule(u.block)
        g = u.group
        rel = (g.outs + g.inputs) if u.kind == "heads" else (g.ups + (g.down,))
        names += [f"{u.block}.{r}" for r in rel if has(block, r)]
    return names


COUNTS = {  # what a report's sparsity_actual counts over the targeted layers
    "nonzero weights": lambda m: int((m.weight != 0).sum()),  # unstructured and N:M: zeros, shapes unchanged
    "weights": lambda m: m.weight.numel(),  # structured: removed rows and columns
    "parameters": lambda m: sum(p.numel() for p in m.parameters()),  # weights and biases (SlimDiff's budget)
}


def targeted_size(den, names, counts: str) -> int:
    """The size of the targeted layers as ``counts`` (a key of COUNTS) defines it: the one definition behind
    every report's ``sparsity_actual`` = 1 - size after / size before, with ``sparsity_counts`` naming it."""
    return sum(COUNTS[counts](den.get_submodule(n)) for n in names)
