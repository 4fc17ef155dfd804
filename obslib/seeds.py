"""Seeding: one noise seed per prompt, and the seeded token subsets of ``--calib-tokens``.

A prompt's noise comes from ``prompt_seed(seed, i)`` (``i``: its number in the whole prompt list), so it does
not depend on the batch it is sampled in, on the batch size or on the process that samples it. The run
cache of the study, checkpoints and reports carry ``SEEDING_VERSION``: nothing made under another seeding
is mixed in.
"""
from __future__ import annotations

import hashlib

import torch

SEEDING_VERSION = "per-prompt-1"


def prompt_seed(seed: int, index: int, *more: int) -> int:
    """The seed of prompt number ``index`` (0-based) in a run seeded ``seed`` (``more``: further numbers, e.g. a
    step, for streams derived from the prompt): a hash, not ``seed + index``, so runs with neighbouring seeds do
    not share noise between shifted prompts; below 2**63, so any ``torch.Generator`` accepts it."""
    key = "/".join(str(int(v)) for v in (seed, index, *more))
    digest = hashlib.blake2b(f"obslib/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prompt_generators(seed: int, indices, device="cpu") -> list:
    """One ``torch.Generator`` per prompt (``prompt_seed``), the list a diffusers pipeline takes as ``generator``."""
    return [torch.Generator(device=device).manual_seed(prompt_seed(seed, i)) for i in indices]


def token_subset(seed: int, prompt: int, half: int, step: int, length: int, n: int) -> torch.Tensor:
    """``n`` of ``length`` token positions (sorted), drawn for one image of one step: the image of prompt ``prompt``
    in CFG half ``half`` (0: unconditional, 1: conditional) at denoising step ``step``."""
    g = torch.Generator().manual_seed(prompt_seed(seed, prompt, half, step, length, 1))
    return torch.randperm(length, generator=g)[:n].sort().values
