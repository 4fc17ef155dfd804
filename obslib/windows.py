"""Windows of sampling steps, and a switch that runs another denoiser inside one window.

``StepSwitch(denoiser, other, window, steps)`` is a context manager: while it is open, every call of
``denoiser`` at a step inside ``window`` (1-based; step 1 is the first, pure-noise step) runs ``other`` instead,
with the same arguments, and every other call runs ``denoiser`` itself. Steps are counted from the calls, modulo
``steps``: ``calls_per_step`` calls per step — one with the first-order samplers the study uses when
classifier-free guidance doubles the batch, two under FluxPipeline's true CFG (the prompt's call, then the negative
prompt's; ``obslib.sampling.calls_per_step``). With ``other`` a pruned copy this samples "pruned only in this window":
the direct test of where a pruning error hurts (``obslib.study.timesteps``), and the probe of the ``sensitivity``
weighting (``obslib.sensitivity``). A window covering every step gives ``other``'s images, an empty one
``denoiser``'s, bit for bit.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from .errors import UsageError


def equal_windows(steps: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous windows (first, last), 1-based and inclusive, covering steps 1..``steps`` with sizes differing
    by at most one (the earlier windows take the extra steps)."""
    if not 1 <= n <= steps:
        raise UsageError(f"{n} windows cannot split {steps} steps; allowed: 1 to {steps}")
    size, rest = divmod(steps, n)
    out, start = [], 1
    for i in range(n):
        end = start + size + (i < rest) - 1
        out.append((start, end))
        start = end + 1
    return out


def halves(steps: int) -> list[tuple[int, int]]:
    """The first and the second half of the trajectory (the first takes the middle step when ``steps`` is odd)."""
    if steps < 2:
        raise UsageError(f"{steps} step(s) have no halves; need at least 2")
    mid = (steps + 1) // 2
    return [(1, mid), (mid + 1, steps)]


def window_steps(window, steps: int) -> frozenset[int]:
    """The steps of a window given as (first, last) inclusive or as any iterable of 1-based steps; a step outside
    1..``steps`` is refused."""
    if isinstance(window, tuple) and len(window) == 2 and all(isinstance(x, int) for x in window):
        first, last = window
        if not 1 <= first <= last <= steps:
            raise UsageError(f"window {window} is outside the trajectory's steps 1..{steps} (need 1 <= first <= last "
                             f"<= {steps})")
        return frozenset(range(first, last + 1))
    chosen = frozenset(int(s) for s in window)
    bad = sorted(s for s in chosen if not 1 <= s <= steps)
    if bad:
        raise UsageError(f"window steps {bad[:5]} are outside the trajectory's steps 1..{steps}")
    return chosen


class StepSwitch:
    """Run ``other`` in place of ``denoiser`` at the steps of ``window`` (see the module docstring)."""

    def __init__(self, denoiser: nn.Module, other: nn.Module, window: Iterable[int] | tuple[int, int], steps: int,
                 calls_per_step: int = 1):
        if not isinstance(steps, int) or steps < 1:
            raise UsageError(f"steps {steps!r} must be an integer >= 1")
        self.denoiser, self.other, self.steps = denoiser, other, steps
        self.calls_per_step = int(calls_per_step)  # 2 under FluxPipeline's true CFG (obslib.sampling.calls_per_step)
        self.window = window_steps(window, steps)
        self.calls = 0
        self._own = None

    @property
    def step(self) -> int:
        """The 1-based step of the next call."""
        return (self.calls // self.calls_per_step) % self.steps + 1

    def _forward(self, *args, **kwargs):
        step = self.step
        self.calls += 1
        if step in self.window:
            return self.other(*args, **kwargs)
        return self._own(*args, **kwargs)

    def __enter__(self):
        if "forward" in vars(self.denoiser):
            raise RuntimeError("the denoiser's forward is already replaced (a StepSwitch is open on it)")
        self._own = self.denoiser.forward
        self.calls = 0
        self.denoiser.forward = self._forward
        return self

    def __exit__(self, exc_type, exc, tb):
        del self.denoiser.forward  # back to the class's forward
        per_run = self.steps * self.calls_per_step
        if exc_type is None and self.calls % per_run:
            raise RuntimeError(f"the denoiser was called {self.calls} times, not a multiple of {self.steps} steps x "
                               f"{self.calls_per_step} call(s): a sampler with more than one call per step (e.g. "
                               "Heun) cannot be switched by step")
        return False
