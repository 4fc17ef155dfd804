"""Timestep weighting schemes alpha_t for the timestep-aware Hessian H = sum_t alpha_t X_t X_t^T.

t = 1 is the first sampling step (pure noise), t = T the last. Every shaped scheme maps (T, alpha_min,
alpha_max) to a length-T list, alpha_t = alpha_min + (alpha_max - alpha_min) * shape(t) with shape in [0, 1];
the decreasing schemes start at alpha_max and end at alpha_min. ``log-decrease`` is the paper's choice;
``exp-decrease`` and ``cosine`` are ours; ``first-half`` / ``second-half`` put alpha_max on one half of the
trajectory and alpha_min on the other (with a large ratio: "only that half"). The ratio alpha_max / alpha_min is
the scheme's strength (the paper's 1.2 / 0.8 = 1.5); ``alpha_range(ratio)`` gives the pair with mean 1.

``sensitivity`` is not a formula: its alpha_t are measured while pruning (``obslib.sensitivity``), so
``timestep_weights`` refuses it.
"""
from __future__ import annotations

import math

from .errors import UsageError

EXP_GAMMA = 3.0
MAX_RATIO = 1e6  # alpha_max / alpha_min (and its inverse) at most this


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
    "first-half": lambda t, T: 1.0 if t <= (T + 1) // 2 else 0.0,
    "second-half": lambda t, T: 0.0 if t <= (T + 1) // 2 else 1.0,
}
FORMULA_SCHEMES = ("uniform",) + tuple(_SHAPES)
MEASURED = "sensitivity"
SCHEMES = FORMULA_SCHEMES + (MEASURED,)
PAPER_SCHEMES = ("uniform", "linear-decrease", "linear-increase", "log-decrease", "log-increase")
ABLATION_SCHEMES = PAPER_SCHEMES + ("exp-decrease", "cosine")  # notebook 04: the paper's five and our two


def alpha_range(ratio: float) -> tuple[float, float]:
    """(alpha_min, alpha_max) with alpha_max / alpha_min = ratio and mean 1 (ratio 1.5 gives the paper's 0.8, 1.2);
    a ratio below 1 reverses the scheme (a decreasing shape then increases)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or not 1 / MAX_RATIO <= ratio <= MAX_RATIO:
        raise UsageError(f"alpha ratio {ratio!r} is outside the allowed 1e-06 to 1e+06 (alpha at the scheme's strong "
                         "end / alpha at its weak end; the paper's is 1.5)")
    return 2.0 / (1.0 + ratio), 2.0 * ratio / (1.0 + ratio)


def timestep_weights(scheme: str, T: int, alpha_min: float = 0.8, alpha_max: float = 1.2) -> list[float]:
    """alpha_1..alpha_T for a scheme (see module docstring)."""
    if scheme == MEASURED:
        raise UsageError("weighting 'sensitivity' is measured while pruning (obslib.prune runs its probe); it has no "
                         "formula to evaluate here")
    if scheme not in SCHEMES:
        raise UsageError(f"weighting {scheme!r} is unknown; allowed: {', '.join(SCHEMES)}")
    if T < 1:
        raise UsageError(f"number of steps {T} must be >= 1")
    if not (alpha_min > 0 and alpha_max > 0 and 1 / MAX_RATIO <= alpha_max / alpha_min <= MAX_RATIO):
        raise UsageError(f"alpha_min={alpha_min}, alpha_max={alpha_max}: need both > 0 and a ratio alpha_max / "
                         "alpha_min between 1e-06 and 1e+06")
    if scheme == "uniform":
        return [1.0] * T
    f = _SHAPES[scheme]
    return [alpha_min + (alpha_max - alpha_min) * f(t, T) for t in range(1, T + 1)]
