"""Timestep weighting schemes alpha_t for the timestep-aware Hessian H = sum_t alpha_t X_t X_t^T.

t = 1 is the first sampling step (pure noise), t = T the last. Every scheme maps (T, alpha_min,
alpha_max) to a length-T list; the decreasing schemes start at alpha_max and end at alpha_min.
``log-decrease`` is the paper's choice; ``exp-decrease`` and ``cosine`` are ours.
"""
from __future__ import annotations

import math

from .errors import UsageError

EXP_GAMMA = 3.0


def _s(t: int, T: int) -> float:
    """Position of step t in [0, 1] (0 = first step)."""
    return 0.0 if T == 1 else (t - 1) / (T - 1)


def _log_decrease(t: int, T: int) -> float:
    return 1.0 if T == 1 else math.log(T - t + 1) / math.log(T)


def _exp_decrease(t: int, T: int) -> float:
    return (math.exp(-EXP_GAMMA * _s(t, T)) - math.exp(-EXP_GAMMA)) / (1 - math.exp(-EXP_GAMMA))


# Each shape maps (t, T) to [0, 1]; alpha_t = alpha_min + (alpha_max - alpha_min) * shape.
_SHAPES = {
    "linear-decrease": lambda t, T: 1.0 - _s(t, T),
    "linear-increase": lambda t, T: _s(t, T),
    "log-decrease": _log_decrease,
    "log-increase": lambda t, T: _log_decrease(T - t + 1, T),
    "exp-decrease": _exp_decrease,
    "cosine": lambda t, T: 0.5 * (1.0 + math.cos(math.pi * _s(t, T))),
}
SCHEMES = ("uniform",) + tuple(_SHAPES)


def timestep_weights(scheme: str, T: int, alpha_min: float = 0.8, alpha_max: float = 1.2) -> list[float]:
    """alpha_1..alpha_T for a scheme (see module docstring)."""
    if scheme not in SCHEMES:
        raise UsageError(f"weighting {scheme!r} is unknown; allowed: {', '.join(SCHEMES)}")
    if T < 1:
        raise UsageError(f"number of steps {T} must be >= 1")
    if not 0 < alpha_min <= alpha_max:
        raise UsageError(f"alpha_min={alpha_min}, alpha_max={alpha_max}: need 0 < alpha_min <= alpha_max")
    if scheme == "uniform":
        return [1.0] * T
    f = _SHAPES[scheme]
    return [alpha_min + (alpha_max - alpha_min) * f(t, T) for t in range(1, T + 1)]
