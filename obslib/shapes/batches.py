"""Seeded batches of the shapes world: the stream the embedded model trains on, and gradient flow's on that model.

Batch ``i`` of seed ``s`` draws its scenes from ``random.Random(s * BATCH_SEED_STRIDE + i)``; step ``i`` of a run
seeded ``s`` draws its noise from a generator seeded ``s * NOISE_SEED_STRIDE + i``.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .world import render_batch, splits

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


BATCH_SEED_STRIDE = 1_000_003  # batch i of seed s draws from random.Random(s * stride + i)
NOISE_SEED_STRIDE = 7919  # step i of seed s draws its noise from torch's generator seeded s * stride + i

class TrainBatches:
    """Endless seeded stream of (captions, images) from the training split."""

    def __init__(self, seed: int, batch: int, p_single: float = 0.4, scenes=None, free: bool = False):
        scenes = splits()["train"] if scenes is None else scenes
        self.by_count = {1: [s for s in scenes if len(s.objects) == 1], 2: [s for s in scenes if len(s.objects) == 2]}
        self.batch, self.p_single, self.seed, self.free = batch, p_single, seed, free

    def get(self, step: int):
        rng = random.Random(self.seed * BATCH_SEED_STRIDE + step)
        scenes = [self.by_count[1 if rng.random() < self.p_single else 2] for _ in range(self.batch)]
        scenes = [pool[rng.randrange(len(pool))] for pool in scenes]
        seeds = [rng.randrange(2**31) for _ in scenes]
        return [s.caption() for s in scenes], _to_tensor(render_batch(scenes, seeds, free=self.free))
