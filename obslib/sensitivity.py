"""The ``sensitivity`` weighting: alpha_t from the measured harm of an error made at step t.

The paper argues for decreasing weights from error accumulation (an error at an early, noisy step travels
through every later step). This weighting measures that instead of assuming it, inside the prune, before the
first package:

1. a *probe error*: a copy of the denoiser whose targeted layers are magnitude-pruned at the prune's sparsity
   (its N:M pattern if it has one; structured prunes use unstructured magnitude at the same share), the
   cheapest error of the size the prune will make;
2. the first ``sensitivity_prompts`` calibration prompts are sampled to latents once as they are, then once per
   window of steps (``sensitivity_windows`` equal windows) with the probe error active only in that window
   (``obslib.windows.StepSwitch``), with the calibration seed;
3. harm(window) = mean over prompts of ||z_window - z||^2 / ||z||^2 on the final latents; every step of a window
   gets harm(window) / its length; alpha_t = that harm divided by its mean (mean 1), floored at 1e-6 of the
   largest so every step still counts a little. No harm anywhere gives uniform weights.

Cost: (windows + 1) sampling runs of ``sensitivity_prompts`` prompts, and one extra copy of the denoiser while it
runs; both are reported (``report["sensitivity"]``).
"""
from __future__ import annotations

import copy
import time

import torch

from .archs import spec_for
from .baselines import magnitude_prune
from .hessian import weight_matrix
from .packages import layer_units
from .windows import StepSwitch, equal_windows

FLOOR = 1e-6  # the smallest alpha_t, relative to the largest


def probe_error(den: torch.nn.Module, block_ids: list[int], sparsity: float, n: int, m: int, cfg) -> torch.nn.Module:
    """A copy of ``den`` with the targeted layers of ``block_ids`` magnitude-pruned (see the module docstring)."""
    other = copy.deepcopy(den)
    other.eval()
    for unit in layer_units(other, spec_for(other), block_ids):
        for name in unit.hessian_layers:
            mod = other.get_submodule(name)
            W_hat = magnitude_prune(weight_matrix(mod), None, sparsity, n, m, cfg)[0]
            mod.weight.data.copy_(W_hat.to(mod.weight.dtype).reshape(mod.weight.shape))
    return other


def alphas_from_harm(harm_per_step: list[float]) -> list[float]:
    """alpha_t proportional to the harm, mean 1, floored at FLOOR of the largest; uniform when nothing harms."""
    h = torch.tensor(harm_per_step, dtype=torch.float64).clamp_min(0)
    if not bool(torch.isfinite(h).all()) or float(h.max()) <= 0:
        return [1.0] * len(harm_per_step)
    h = h.clamp_min(FLOOR * float(h.max()))
    return (h / h.mean()).tolist()


def _relative_change(z: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float(((a.float() - b.float()) ** 2).flatten(1).sum(1).div(b.float().pow(2).flatten(1).sum(1)
                                                                          .clamp_min(1e-30)).sum())
              for a, b in zip(z, ref))
    return num / sum(b.shape[0] for b in ref)


def measure(runner, den: torch.nn.Module, steps: int, block_ids: list[int], cfg) -> dict:
    """Run the probe (``runner``: an ``obslib.sampling.CalibrationRunner`` over the probe prompts) and return
    {"alphas", "harm_per_step", "windows", "harm_per_window", "probe_prompts", "probe_runs", "seconds"}."""
    t0 = time.perf_counter()
    n, m = cfg.nm
    sparsity = cfg.sparsity if cfg.block_sparsity is None else max(cfg.block_sparsity)
    windows = equal_windows(steps, min(cfg.sensitivity_windows, steps))
    other = probe_error(den, block_ids, sparsity, n, m, cfg)
    try:
        ref = runner.run(None, "sensitivity probe: reference", latents=True)
        harm_w = []
        for w in windows:
            with StepSwitch(den, other, w, steps, runner.calls_per_step):
                z = runner.run(None, f"sensitivity probe: error in steps {w[0]}-{w[1]}", latents=True)
            harm_w.append(_relative_change(z, ref))
    finally:
        del other
    per_step = [h / (w[1] - w[0] + 1) for h, w in zip(harm_w, windows) for _ in range(w[0], w[1] + 1)]
    return {"alphas": alphas_from_harm(per_step), "harm_per_step": per_step, "windows": [list(w) for w in windows],
            "harm_per_window": harm_w, "probe_prompts": sum(len(b) for b in runner.batches),
            "probe_runs": len(windows) + 1, "probe_error": "magnitude" + (f" {n}:{m}" if n else f" {sparsity:.0%}"),
            "seconds": time.perf_counter() - t0}
