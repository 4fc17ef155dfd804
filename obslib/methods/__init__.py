"""The pruning methods: one file per method, one registry line each.

Each file defines ``METHOD``, an ``obslib.methods.base.Method``: its solve functions (or whole-model driver) and the
fields from which ``Method`` answers every capability question once. Adding a method is a new file here and one
line in ``_REGISTRY``; the driver (``obslib.driver``) is the same for every method.
"""
from __future__ import annotations

from . import dsnot, flap, gradient_flow, l1_norm, magnitude, obs_diff, slimdiff, sparsegpt, wanda
from .base import PRIVATE, Method  # noqa: F401

_REGISTRY = (
    obs_diff,
    sparsegpt,
    magnitude,
    wanda,
    dsnot,
    l1_norm,
    flap,
    slimdiff,
    gradient_flow,
)
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _REGISTRY}

for _m in METHODS.values():
    for _f in _m.options:
        PRIVATE.setdefault(_f, []).append(_m.name)


def private_owners(field: str) -> list[str]:
    """The methods that name ``field`` among their private settings (``Method.options``); empty for shared ones."""
    return list(PRIVATE.get(field, []))
