"""What a pruning method is: its solve functions and its answers to the questions the rest of obslib asks.

A method supplies, per granularity, a function that turns a layer's weight and calibration statistics into pruned
weights — unstructured / N:M: ``(W, stats, sparsity, n, m, cfg) -> (W_hat, mask[, error])``; heads:
``(Ws, stats, head_dim, n_remove, cfg) -> (new Ws, removed, bias deltas)``; neurons: ``(W, stats, n_remove, cfg) ->
(W_out, removed, bias delta)`` — or a whole-model ``driver`` that replaces the per-unit driver. Every whole-model
driver has one signature, ``driver(run: WholeModelRun) -> dict``: ``run`` carries what the per-unit driver would
have used, and the driver returns the report fields particular to it. The capability questions (does it
calibrate, train, remove whole heads, which patterns and allocations, what it checkpoints, which settings it
ignores, which weighting it really uses) are answered here, once, from the fields below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ALLOCATIONS = ("uniform", "global")  # how a budget is spread over layers / units (PruneConfig.allocation)
# field -> the methods that name it among their private settings (``Method.options``); filled once by the registry
# (``obslib.methods``) as it is imported
PRIVATE: dict[str, list[str]] = {}


@dataclass(frozen=True)
class WholeModelRun:
    """What a whole-model driver gets: the denoiser (pruned in place), the checked config, the sampling steps, the
    pipeline component's name, the rollback record, the targeted blocks; the calibration runner (or None), training
    batches (or None), timestep weights (or None) and per-unit removal shares of a parameter budget or unit map (or
    None)."""

    den: Any
    cfg: Any
    steps: int
    component: str
    undo: Any
    block_ids: list[int]
    calibrate: Callable | None = None
    train_batches: Any = None
    alphas: list[float] | None = None
    shares: dict | None = None


@dataclass(frozen=True)
class Method:
    name: str
    description: str = ""
    unstructured: Callable | None = None
    heads: Callable | None = None
    neurons: Callable | None = None
    driver: Callable | None = None  # a whole-model driver replacing the per-unit one (SlimDiff, gradient flow)
    needs_calibration: bool = True
    needs_training: bool = False  # trains the denoiser on its own loss (obslib.prune builds the batches)
    forced_weighting: str | None = None  # e.g. SparseGPT: uniform
    patterns: tuple[str, ...] | None = None  # the patterns it supports (None: decided by the functions above)
    ignores: tuple[str, ...] = ()  # PruneConfig fields it does not use (the CLI says so when they are set)
    # PruneConfig fields only it (and the methods naming them too) reads: its private settings; every other method
    # ignores them, and ``obslib prune --help`` lists them under its name
    options: tuple[str, ...] = ()
    allocation: str = "uniform"  # its allocation when PruneConfig.allocation is None

    # ------------------------------------------------------------------ the questions, each answered once
    @property
    def whole_model(self) -> bool:
        """It prunes the whole model itself (its ``driver``) instead of unit by unit."""
        return self.driver is not None

    @property
    def trains(self) -> bool:
        return self.needs_training

    def calibrates(self, measure_error: bool = False) -> bool:
        """It runs the calibration sampler: its solution reads calibration statistics, or the per-unit driver
        measures each layer's error (``measure_error``) on them."""
        return self.needs_calibration or (measure_error and not self.whole_model)

    @property
    def solves_hessian(self) -> bool:
        """It solves from per-layer Hessians in the package driver (what --allocation global and --refit need)."""
        return self.needs_calibration and not self.whole_model

    @property
    def refits(self) -> bool:
        """--refit applies: it calibrates a Hessian and prunes single weights."""
        return self.needs_calibration and self.unstructured is not None

    @property
    def removes_heads(self) -> bool:
        """Structured: it removes whole attention heads (so head rows must divide evenly)."""
        return self.heads is not None or self.needs_training

    def supports(self, pattern: str) -> bool:
        if self.patterns is not None:
            return pattern in self.patterns
        return (self.unstructured if pattern != "structured" else self.heads or self.neurons) is not None

    def allocations(self) -> tuple[str, ...]:
        """The allocations it accepts: global needs per-layer Hessians or its own allocator."""
        return ALLOCATIONS if (self.solves_hessian or self.whole_model and not self.trains) else ("uniform",)

    @property
    def checkpoint_kind(self) -> str | None:
        """Which checkpoints it writes: the package driver's, gradient flow's training state, or none."""
        if self.trains:
            return "gradient-flow"
        return None if self.whole_model else "packages"

    def weighting(self, configured: str) -> str | None:
        """The timestep weighting it really uses: None if it ignores weighting, its forced one, else ``configured``."""
        return None if "weighting" in self.ignores else self.forced_weighting or configured

    def ignored(self, field: str) -> bool:
        """It does not read ``field``: it says so, or the field is another method's private setting."""
        return field in self.ignores or (field not in self.options and bool(PRIVATE.get(field)))

    def why_weighting_ignored(self) -> str | None:
        """Why its result does not depend on the timestep weighting, or None when it does."""
        if self.ignored("weighting"):
            return "it trains on its own loss and reads no Hessian"
        if self.forced_weighting:
            return f"it always weighs the steps {self.forced_weighting}"
        if not self.needs_calibration:
            return "it reads no calibration statistics"
        return None
