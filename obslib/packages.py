"""Module packages: the basic units a prune solves together, and their split into K packages.

Basic units (per block, from the architecture table) are listed block by block and split into K contiguous
packages of near-equal size. The driver (``obslib.driver``: calibrate, solve, checkpoint, report) calibrates
package k through the model in which packages 1..k-1 are already pruned, so only its own Hessians are in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .archs import ArchSpec, attr_truthy, block_units, has, iter_blocks


@dataclass
class Unit:
    """A basic unit: layers pruned together from one calibration. ``kind`` is 'layers' (unstructured / N:M),
    'heads' or 'neurons' (structured); ``hessian_layers`` are the layers whose inputs are collected."""

    kind: str
    block: str
    block_index: int
    hessian_layers: list[str]
    group: object = None


def structured_units(denoiser: nn.Module, spec: ArchSpec, block_ids: list[int]) -> list[Unit]:
    units = []
    for bi, (bname, block) in enumerate(iter_blocks(denoiser, spec)):
        if bi not in block_ids or any(attr_truthy(block, p) for p in spec.skip_structured_if):
            continue
        for hg in spec.heads:
            outs = [f"{bname}.{o}" for o in hg.outs if has(block, o)]
            if outs and has(block, hg.attn):
                units.append(Unit("heads", bname, bi, outs, hg))
        for ng in spec.neurons:
            if has(block, ng.down):
                units.append(Unit("neurons", bname, bi, [f"{bname}.{ng.down}"], ng))
    return units


def layer_units(denoiser: nn.Module, spec: ArchSpec, block_ids: list[int]) -> list[Unit]:
    units = []
    for bi, (bname, block) in enumerate(iter_blocks(denoiser, spec)):
        if bi in block_ids:
            units += [Unit("layers", bname, bi, names) for names in block_units(bname, block, spec)]
    return units


def split_packages(units: list, k: int) -> list[list]:
    """K contiguous packages of near-equal size (the first ones one larger when it does not divide)."""
    k = max(1, min(k, len(units)))
    q, r = divmod(len(units), k)
    out, i = [], 0
    for j in range(k):
        n = q + (1 if j < r else 0)
        out.append(units[i:i + n])
        i += n
    return out




def package_layers(denoiser: nn.Module, package: list[Unit]) -> dict[str, nn.Module]:
    return {n: denoiser.get_submodule(n) for u in package for n in u.hessian_layers}
