"""Architecture layer maps as data.

An ``ArchSpec`` says, for one denoiser class, where its blocks are, which layers are targeted and how
they group into *basic units* (layers whose inputs do not depend on each other), and which structured
groups (attention heads, FFN neurons) exist. Layer names are relative to a block; a name that a block
lacks (the last SD3 block has no text output projection, SD3.5 blocks may lack ``attn2``) is skipped.
Nothing in the solvers or the driver branches on the architecture: they read these tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class HeadGroup:
    """Heads shared by the output projections ``outs``; ``inputs`` are the q/k/v-style projections whose
    output rows are grouped per head (deleted with the head). ``out_cols`` names the attribute (on the
    block) giving how many leading input columns of the outs belong to the heads; None = all columns
    (Flux single-stream blocks fuse attention and MLP into one ``proj_out``)."""

    attn: str
    outs: tuple[str, ...]
    inputs: tuple[str, ...]
    out_cols: str | None = None


@dataclass(frozen=True)
class NeuronGroup:
    """An FFN: ``ups`` produce the hidden neurons (rows), ``down`` consumes them (columns). GEGLU ups
    (twice as many rows as neurons) are recognised from their shapes. ``down_cols`` names the attribute
    (on the block) giving how many trailing input columns of ``down`` are the neurons; None = all."""

    ups: tuple[str, ...]
    down: str
    down_cols: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    name: str
    component: str  # pipeline attribute holding the denoiser
    blocks: tuple[str, ...]  # regexes over module names, in execution order
    units: tuple[tuple[str, ...], ...]  # basic units within a block, in execution order
    # (block regex, units) for blocks whose units differ from ``units`` (Flux's single-stream blocks)
    units_for: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = ()
    heads: tuple[HeadGroup, ...] = ()
    neurons: tuple[NeuronGroup, ...] = ()
    skip_structured_if: tuple[str, ...] = ()  # block attribute paths that, when truthy, skip the block
    # how a block's output becomes the next block's input, as (input keyword, output index or None for the
    # output itself); the other keywords (timestep embedding, rotary embeddings) are shared by all blocks.
    # Empty: the blocks do not run one after another (other layers in between) and cannot propagate.
    chain: tuple[tuple[str, int | None], ...] = ()
    notes: str = ""


_SD3_ATTN_IN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_MMDIT_UNITS = (
    _SD3_ATTN_IN + ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # attn2: SD3.5 dual attention
    ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0"),
    ("ff.net.0.proj", "ff_context.net.0.proj"),
    ("ff.net.2", "ff_context.net.2"),
)
_MMDIT_HEADS = (
    HeadGroup("attn", ("attn.to_out.0", "attn.to_add_out"), _SD3_ATTN_IN),
    HeadGroup("attn2", ("attn2.to_out.0",), ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
)
_MMDIT_CHAIN = (("encoder_hidden_states", 0), ("hidden_states", 1))  # blocks return (context, image)
_MMDIT_NEURONS = (NeuronGroup(("ff.net.0.proj",), "ff.net.2"), NeuronGroup(("ff_context.net.0.proj",), "ff_context.net.2"))

SD3 = ArchSpec(
    name="sd3", component="transformer", blocks=(r"transformer_blocks\.\d+",),
    units=_MMDIT_UNITS, heads=_MMDIT_HEADS, neurons=_MMDIT_NEURONS, skip_structured_if=("context_pre_only",),
    chain=_MMDIT_CHAIN,
    notes="SD3 / SD3.5 MMDiT (JointTransformerBlock); the paper's layer choice. SD3.5's attn2 is included.",
)

FLUX = ArchSpec(
    name="flux", component="transformer",
    blocks=(r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"),
    units=_MMDIT_UNITS,
    units_for=((r"single_transformer_blocks\.\d+", (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("proj_out",))),),
    heads=_MMDIT_HEADS + (HeadGroup("attn", ("proj_out",), ("attn.to_q", "attn.to_k", "attn.to_v"), out_cols="attn.inner_dim"),),
    neurons=_MMDIT_NEURONS + (NeuronGroup(("proj_mlp",), "proj_out", down_cols="mlp_hidden_dim"),),
    chain=_MMDIT_CHAIN,  # single-stream blocks take and return both streams too (diffusers >= 0.32)
    notes="Flux double-stream blocks as MMDiT; single-stream blocks fuse attention and MLP in proj_out "
          "(its leading attn.inner_dim columns are the heads, the trailing mlp_hidden_dim the neurons).",
)

_BASIC_UNITS = (
    ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    ("attn1.to_out.0",),
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("attn2.to_out.0",),
    ("ff.net.0.proj",),
    ("ff.net.2",),
)
_BASIC_HEADS = (
    HeadGroup("attn1", ("attn1.to_out.0",), ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    HeadGroup("attn2", ("attn2.to_out.0",), ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
)
_BASIC_NEURONS = (NeuronGroup(("ff.net.0.proj",), "ff.net.2"),)

DIT = ArchSpec(
    name="dit", component="transformer", blocks=(r"transformer_blocks\.\d+",),
    units=_BASIC_UNITS, heads=_BASIC_HEADS, neurons=_BASIC_NEURONS, chain=(("hidden_states", None),),
    notes="DiT and PixArt (BasicTransformerBlock: self-attention, cross-attention where present, FFN).",
)

UNET = ArchSpec(
    name="unet", component="unet",
    blocks=tuple(rf"{stage}\.(\d+\.)?(resnets\.\d+|attentions\.\d+\.transformer_blocks\.\d+)"
                 for stage in (r"down_blocks", r"mid_block", r"up_blocks")),
    units=_BASIC_UNITS + (("conv1",), ("conv2",)),
    heads=_BASIC_HEADS, neurons=_BASIC_NEURONS,
    notes="SD2.1 / SDXL UNet2DConditionModel: transformer blocks (self-, cross-attention, GEGLU FFN) and the "
          "ResNet convolutions (conv1/conv2, through unfolded inputs; unstructured and N:M only). The paper "
          "did not publish its UNet layer choice.",
)

ARCHS: dict[str, ArchSpec] = {
    "SD3Transformer2DModel": SD3,
    "FluxTransformer2DModel": FLUX,
    "DiTTransformer2DModel": DIT,
    "PixArtTransformer2DModel": DIT,
    "UNet2DConditionModel": UNET,
}


def spec_for(denoiser: nn.Module) -> ArchSpec:
    cls = type(denoiser).__name__
    if cls not in ARCHS:
        from .errors import UsageError

        raise UsageError(f"denoiser class {cls!r} has no layer map; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[cls]


def find_denoiser(pipe) -> tuple[str, nn.Module]:
    for name in dict.fromkeys(s.component for s in ARCHS.values()):
        m = getattr(pipe, name, None)
        if m is not None and type(m).__name__ in ARCHS:
            return name, m
    from .errors import UsageError

    raise UsageError(f"pipeline {type(pipe).__name__} has no supported denoiser; supported: {', '.join(sorted(ARCHS))}")


def iter_blocks(denoiser: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    """Blocks in execution order: pattern by pattern, module order within a pattern."""
    named = list(denoiser.named_modules())
    out = []
    for pattern in spec.blocks:
        rx = re.compile(pattern + "$")
        out += [(n, m) for n, m in named if rx.match(n)]
    return out


def has(module: nn.Module, path: str) -> bool:
    try:
        m = module.get_submodule(path)
    except AttributeError:
        return False
    return m is not None


def attr(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def attr_truthy(module: nn.Module, path: str) -> bool:
    return bool(attr(module, path))


def block_units(block_name: str, block: nn.Module, spec: ArchSpec) -> list[list[str]]:
    """Basic units of one block as lists of full layer names (absent layers skipped); a layer named by two
    units is an error in the table (it would be pruned twice)."""
    table = next((u for rx, u in spec.units_for if re.fullmatch(rx, block_name)), spec.units)
    units, seen = [], set()
    for unit in table:
        names = [f"{block_name}.{n}" for n in unit if has(block, n) and isinstance(block.get_submodule(n), (nn.Linear, nn.Conv2d))]
        if seen & set(names):
            raise ValueError(f"architecture table {spec.name!r}: {sorted(seen & set(names))[0]} is in two units")
        seen |= set(names)
        if names:
            units.append(names)
    return units
