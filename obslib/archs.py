"""Architecture layer maps as data.

An ``ArchSpec`` says, for one denoiser class, where its blocks are, which layers are targeted and how
they group into *basic units* (layers whose inputs do not depend on each other), and which structured
groups (attention heads, FFN neurons) exist. Layer names are relative to a block; a name that a block
lacks (the last SD3 block has no text output projection, SD3.5 blocks may lack ``attn2``) is skipped.
Nothing in the solvers or the driver branches on the architecture: they read these tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class HeadGroup:
    """Heads shared by the output projections ``outs``; ``inputs`` are the q/k/v-style projections whose
    output rows are grouped per head (deleted with the head)."""

    attn: str
    outs: tuple[str, ...]
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class NeuronGroup:
    """An FFN: ``ups`` produce the hidden neurons (rows), ``down`` consumes them (columns).
    ``gated`` ups (GEGLU) hold two halves per neuron."""

    ups: tuple[str, ...]
    down: str
    gated: bool = False


@dataclass(frozen=True)
class ArchSpec:
    name: str
    component: str  # pipeline attribute holding the denoiser
    blocks: tuple[str, ...]  # ModuleList attributes holding the blocks, in execution order
    units: tuple[tuple[str, ...], ...]  # basic units within a block, in execution order
    heads: tuple[HeadGroup, ...] = ()
    neurons: tuple[NeuronGroup, ...] = ()
    skip_structured_if: tuple[str, ...] = ()  # block-relative attribute paths that, when truthy, skip the block
    notes: str = ""
    extra: dict = field(default_factory=dict)


_SD3_ATTN_IN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

SD3 = ArchSpec(
    name="sd3",
    component="transformer",
    blocks=("transformer_blocks",),
    units=(
        _SD3_ATTN_IN + ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # attn2: SD3.5 dual attention
        ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0"),
        ("ff.net.0.proj", "ff_context.net.0.proj"),
        ("ff.net.2", "ff_context.net.2"),
    ),
    heads=(
        HeadGroup("attn", ("attn.to_out.0", "attn.to_add_out"), _SD3_ATTN_IN),
        HeadGroup("attn2", ("attn2.to_out.0",), ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ),
    neurons=(NeuronGroup(("ff.net.0.proj",), "ff.net.2"), NeuronGroup(("ff_context.net.0.proj",), "ff_context.net.2")),
    skip_structured_if=("context_pre_only",),
    notes="SD3 / SD3.5 MMDiT (JointTransformerBlock); the paper's layer choice (brief §1.5).",
)

ARCHS: dict[str, ArchSpec] = {"SD3Transformer2DModel": SD3}


def spec_for(denoiser: nn.Module) -> ArchSpec:
    cls = type(denoiser).__name__
    if cls not in ARCHS:
        from .io import UsageError

        raise UsageError(f"denoiser class {cls!r} has no layer map; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[cls]


def find_denoiser(pipe) -> tuple[str, nn.Module]:
    for name, spec in ((s.component, s) for s in ARCHS.values()):
        m = getattr(pipe, name, None)
        if m is not None and type(m).__name__ in ARCHS:
            return name, m
    from .io import UsageError

    raise UsageError(f"pipeline {type(pipe).__name__} has no supported denoiser; supported: {', '.join(sorted(ARCHS))}")


def iter_blocks(denoiser: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    out = []
    for attr in spec.blocks:
        mods = denoiser.get_submodule(attr)
        out += [(f"{attr}.{i}", b) for i, b in enumerate(mods)]
    return out


def has(module: nn.Module, path: str) -> bool:
    try:
        m = module.get_submodule(path)
    except AttributeError:
        return False
    return m is not None


def attr_truthy(module: nn.Module, path: str) -> bool:
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return bool(obj)


def block_units(block_name: str, block: nn.Module, spec: ArchSpec) -> list[list[str]]:
    """Basic units of one block as lists of full layer names (absent layers skipped)."""
    units = []
    for unit in spec.units:
        names = [f"{block_name}.{n}" for n in unit if has(block, n) and isinstance(block.get_submodule(n), (nn.Linear, nn.Conv2d))]
        if names:
            units.append(names)
    return units
