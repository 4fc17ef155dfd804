"""The paired bootstrap: a difference of means with its interval and p-value, for outcomes paired by seed and prompt.

``bootstrap_test(a, b)`` takes two (seeds, prompts) arrays whose columns are the same prompts; each replicate draws
the seeds with replacement, then the prompts within every drawn seed (the same indices for a and b). The interval's
ends are order statistics of the replicates chosen so that ``p < 1 − level`` exactly when the interval excludes
zero. ``obslib evaluate`` uses it for its CLIP-score differences; the study's comparisons (``obslib.study.compare``)
build their verdicts on it.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 4000
LEVEL = 0.95


def bootstrap_test(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL, over_seeds: bool = True) -> dict:
    """Mean of a − b over (seed, prompt) pairs with its interval and two-sided p from one set of replicates.

    ``a``, ``b``: arrays of shape (seeds, prompts) with the same prompt in the same column. A replicate draws the
    seeds with replacement (``over_seeds``; with one seed, or ``over_seeds=False``, every seed is kept once), then
    the prompts of every drawn seed with replacement, the same indices for a and b, and averages the differences.
    ``lo``/``hi`` are the k-th smallest and k-th largest replicate, k = n_boot·(1 − level)/2, so that
    ``p < 1 − level`` exactly when the interval excludes zero. A constant shift c gives (c, c, c) with p = 0
    (p = 1 when c = 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired outcomes must be two equal (seeds, prompts) arrays; got {a.shape} and {b.shape}")
    d = a - b
    if not np.isfinite(d).all():
        raise ValueError("paired outcomes contain NaN or infinite values")
    k = n_boot * (1 - level) / 2
    if k < 1 or abs(k - round(k)) > 1e-9:
        raise ValueError(f"n_boot·(1 − level)/2 must be a whole number ≥ 1; got n_boot={n_boot}, level={level}")
    k = int(round(k))
    n_seeds, n_prompts = d.shape
    diff = float(d.mean())
    if np.all(d == d.flat[0]):
        return {"diff": diff, "lo": diff, "hi": diff, "p": 1.0 if diff == 0 else 0.0}
    rng = np.random.default_rng(seed)
    if over_seeds and n_seeds > 1:
        rows = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        cols = rng.integers(0, n_prompts, size=(n_boot, n_seeds, n_prompts))
        boot = d[rows[:, :, None], cols].mean(axis=(1, 2))
    else:  # prompts within each seed only (the draw the study used before seeds were resampled)
        idx = rng.integers(0, n_prompts, size=(n_boot, n_seeds, n_prompts))
        boot = np.take_along_axis(np.broadcast_to(d, (n_boot, n_seeds, n_prompts)), idx, axis=2).mean(axis=(1, 2))
    boot = np.sort(boot)
    below, above = int(np.sum(boot <= 0)), int(np.sum(boot >= 0))
    return {"diff": diff, "lo": float(boot[k - 1]), "hi": float(boot[n_boot - k]),
            "p": min(1.0, 2 * min(below, above) / n_boot)}


def paired_bootstrap(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
                     over_seeds: bool = True) -> tuple[float, float, float]:
    """(difference, lo, hi) of ``bootstrap_test``."""
    r = bootstrap_test(a, b, n_boot=n_boot, seed=seed, level=level, over_seeds=over_seeds)
    return r["diff"], r["lo"], r["hi"]
