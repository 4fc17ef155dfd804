"""``obslib.prune(pipe, config) -> report`` and the ``obslib prune`` command.

The one driver for every method and granularity: resolve the denoiser's layer map, form basic units
and K packages, calibrate each package through the already-pruned model, solve each unit with the
chosen method, and report per-layer sparsity and reconstruction error.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .archs import attr, find_denoiser, has, iter_blocks, spec_for
from .hessian import Calibration, check_stats, weight_matrix
from .io import WRITTEN_BY, UsageError, check_pipeline_dir, load_pipeline, save_pipeline
from .obs import SolverError, check_finite, output_energy, reconstruction_error
from .packages import CalibrationRunner, layer_units, package_layers, split_packages, structured_units
from .structured import (head_counts, keep_cols, keep_rows, kept_index, linear_shapes, make_manifest, set_heads)
from .weighting import SCHEMES, timestep_weights

PATTERNS = ("unstructured", "2:4", "4:8", "structured")
DEFAULTS_FILE = "obslib_defaults.json"
GENERIC_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 7.0}  # the paper's calibration settings


@dataclass
class PruneConfig:
    method: str = "obs-diff"
    pattern: str = "unstructured"
    sparsity: float = 0.5
    weighting: str = "log-decrease"
    alpha_min: float = 0.8
    alpha_max: float = 1.2
    packages: int = 4
    calibration: str = "resample"  # resample: full sampling per package (the paper's); propagate: sample once
    record_ram_mb: float | None = None  # propagate: RAM for the recorded block inputs (None: half of what is free)
    prompts: list[str] | None = None
    steps: int | None = None  # default: the model's sampling default
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 16
    blocksize: int = 128
    percdamp: float = 0.01
    solver_dtype: str = "float32"  # OBS solver precision; float64 is used per layer where float32 fails
    block_range: tuple[int, int] | None = None  # [start, end) block indices; default all
    block_sparsity: list[float] | None = None  # one ratio per block (overrides sparsity)
    exclude_first_last: bool = True  # structured only (the paper skips the first and last block)
    head_saliency: str = "exact"  # or "diag" (the public code's approximation)
    neuron_batch: int = 16
    measure_error: bool = True  # calibrate even for calibration-free methods, to report rel_error
    progress: bool = True
    restore_on_failure: bool = True  # keep the targeted layers' originals so a failed prune changes nothing
    # methods that train (gradient-flow): iterations, learning rate, data, resumable checkpoints
    iterations: int = 100
    lr: float = 1e-5
    train_data: str | None = None  # a folder of images + metadata.jsonl (diffusers text-to-image convention)
    checkpoint_dir: str | None = None  # resumable runs: a checkpoint after each package / 25 training iterations
    resume: bool = False
    gradient_criterion: str = "raise"  # gradient-flow: prune what raises ("raise", the paper's) or lowers the grad norm
    extra: dict = field(default_factory=dict)

    @property
    def nm(self) -> tuple[int, int]:
        if self.pattern in ("2:4", "4:8"):
            n, m = map(int, self.pattern.split(":"))
            return n, m
        return 0, 0

    def validate(self) -> None:
        """Check every field's type and range; raises ``UsageError`` (a ValueError) naming the bad value."""
        from .methods import METHODS

        _check_types(self)
        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r} is unknown; allowed: {', '.join(METHODS)}")
        if self.pattern not in PATTERNS:
            raise UsageError(f"pattern {self.pattern!r} is unknown; allowed: {', '.join(PATTERNS)}")
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"sparsity {self.sparsity} is outside [0, 1)")
        n, m = self.nm
        if m and abs(self.sparsity - n / m) > 1e-9:
            raise UsageError(f"sparsity {self.sparsity} does not match pattern {self.pattern} (needs {n / m})")
        if self.weighting not in SCHEMES:
            raise UsageError(f"weighting {self.weighting!r} is unknown; allowed: {', '.join(SCHEMES)}")
        if not 1e-6 <= self.alpha_min <= self.alpha_max <= 1e6:
            raise UsageError(f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}: need 1e-6 <= alpha_min <= "
                             "alpha_max <= 1e6")
        if self.packages < 1:
            raise UsageError(f"packages K={self.packages} must be an integer >= 1")
        if self.calibration not in CALIBRATIONS:
            raise UsageError(f"calibration {self.calibration!r} is unknown; allowed: {', '.join(CALIBRATIONS)}")
        if self.record_ram_mb is not None and not 0 <= self.record_ram_mb <= 2**40:
            raise UsageError(f"record RAM {self.record_ram_mb:g} MiB is outside the allowed 0 to {2**40} MiB")
        if self.steps is not None and not 1 <= self.steps <= 10_000:
            raise UsageError(f"steps {self.steps} must be an integer in [1, 10000]")
        if self.guidance is not None and not 0 <= self.guidance <= 1000:
            raise UsageError(f"guidance {self.guidance} must be a number in [0, 1000]")
        if not 0 <= self.seed < MAX_SEED:
            raise UsageError(f"seed {self.seed} must be an integer in [0, 2**63 - 2**32)")
        if self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size} must be >= 1")
        if self.blocksize < 1 or (m and self.blocksize % m):
            raise UsageError(f"blocksize {self.blocksize} must be a positive multiple of M={m or 1}")
        if self.solver_dtype not in ("float32", "float64"):
            raise UsageError(f"solver dtype {self.solver_dtype!r} is unknown; allowed: float32, float64")
        if not 0 <= self.percdamp <= 10:
            raise UsageError(f"percdamp {self.percdamp} must be in [0, 10]")
        if not 1 <= self.iterations <= 10_000_000:
            raise UsageError(f"iterations {self.iterations} must be an integer in [1, 10000000]")
        if not 0 < self.lr <= 1:
            raise UsageError(f"learning rate {self.lr} must be in (0, 1]")
        if self.gradient_criterion not in ("raise", "lower"):
            raise UsageError(f"gradient criterion {self.gradient_criterion!r} is unknown; allowed: raise, lower")
        if self.neuron_batch < 1:
            raise UsageError(f"neuron batch {self.neuron_batch} must be >= 1")
        if self.prompts is not None:
            if len(self.prompts) == 0:
                raise UsageError("the calibration prompt list is empty")
            if any(not p.strip() for p in self.prompts):
                raise UsageError("the calibration prompt list holds an empty prompt")
        if self.head_saliency not in ("exact", "diag"):
            raise UsageError(f"head saliency {self.head_saliency!r} is unknown; allowed: exact, diag")
        if self.block_range is not None and (len(self.block_range) != 2 or self.block_range[0] >= self.block_range[1]
                                             or self.block_range[0] < 0):
            raise UsageError(f"block range {self.block_range} must be (start, end) with 0 <= start < end")
        if self.block_sparsity is not None and any(not 0 <= s < 1 for s in self.block_sparsity):
            raise UsageError(f"block sparsity list {self.block_sparsity} has values outside [0, 1)")
        meth = METHODS[self.method]
        fn = meth.unstructured if self.pattern != "structured" else meth.heads or meth.neurons
        if meth.patterns is not None:
            fn = meth.driver if self.pattern in meth.patterns else None
        if fn is None:
            raise UsageError(f"method {self.method!r} does not support pattern {self.pattern!r}")


CALIBRATIONS = ("resample", "propagate")
MAX_SEED = 2**63 - 2**32  # the seed plus a batch index must still fit torch.Generator.manual_seed

# Field -> (kind, allows None). Kinds: real (int or float, finite, not bool), int (not bool), str, bool, ...
_FIELD_TYPES = {
    "method": ("str", False), "pattern": ("str", False), "sparsity": ("real", False), "weighting": ("str", False),
    "alpha_min": ("real", False), "alpha_max": ("real", False), "packages": ("int", False),
    "calibration": ("str", False), "record_ram_mb": ("real", True),
    "prompts": ("str-list", True), "steps": ("int", True), "guidance": ("real", True), "seed": ("int", False),
    "batch_size": ("int", False), "blocksize": ("int", False), "percdamp": ("real", False),
    "solver_dtype": ("str", False),
    "block_range": ("int-list", True), "block_sparsity": ("real-list", True), "exclude_first_last": ("bool", False),
    "head_saliency": ("str", False), "neuron_batch": ("int", False), "measure_error": ("bool", False),
    "progress": ("bool", False), "restore_on_failure": ("bool", False), "extra": ("dict", False),
    "iterations": ("int", False), "lr": ("real", False), "train_data": ("str", True), "checkpoint_dir": ("str", True),
    "resume": ("bool", False), "gradient_criterion": ("str", False),
}
_KIND_WORDS = {"real": "a finite number", "int": "an integer", "str": "a string", "bool": "True or False",
               "dict": "a dict", "str-list": "a list of strings", "int-list": "a list of integers",
               "real-list": "a list of finite numbers"}


def _is(kind: str, v) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if kind == "real":
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict":
        return isinstance(v, dict)
    item = kind.split("-")[0]
    return isinstance(v, (list, tuple)) and all(_is(item, x) for x in v)


def _plain(kind: str, v):
    """numpy / torch scalars and tuples as the plain Python values the report's JSON needs."""
    if kind in ("int", "real"):
        return int(v) if kind == "int" else float(v)
    if kind.endswith("-list"):
        return [_plain(kind.split("-")[0], x) if kind != "str-list" else x for x in v]
    return v


def _check_types(cfg) -> None:
    for name, (kind, nullable) in _FIELD_TYPES.items():
        v = getattr(cfg, name)
        if v is None and nullable:
            continue
        if not _is(kind, v):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise UsageError(f"{name}={shown} ({type(v).__name__}): expected {_KIND_WORDS[kind]}"
                             + (" or None" if nullable else ""))
        setattr(cfg, name, _plain(kind, v))


def sampling_defaults(pipe) -> dict:
    """The model's own sampling defaults (obslib_defaults.json in its directory) or the paper's."""
    if not hasattr(pipe, "config") or not hasattr(pipe, "components"):
        raise UsageError(f"pipe must be a diffusers pipeline (obslib.load_pipeline(path)), got {type(pipe).__name__}")
    path = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    f = os.path.join(path, DEFAULTS_FILE) if path else None
    if not (f and os.path.exists(f)):
        return dict(GENERIC_SAMPLING)
    try:
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, ValueError) as e:
        raise UsageError(f"{f!r} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    d = {**GENERIC_SAMPLING, **d} if isinstance(d, dict) else None
    msl = d.get("max_sequence_length", 256) if d else None
    if d is None or not _is("int", d["num_inference_steps"]) or not _is("real", d["guidance_scale"]) \
            or not 1 <= d["num_inference_steps"] <= 10_000 or not 0 <= d["guidance_scale"] <= 1000 \
            or not _is("int", msl) or not 1 <= msl <= 4096:
        raise UsageError(f"{f!r} must hold num_inference_steps (integer in [1, 10000]), guidance_scale (number in "
                         "[0, 1000]) and optionally max_sequence_length (integer in [1, 4096])")
    return d


def _block_ids(n_blocks: int, cfg: PruneConfig) -> list[int]:
    lo, hi = cfg.block_range or (0, n_blocks)
    if not (0 <= lo < hi <= n_blocks):
        raise UsageError(f"block range {cfg.block_range} is outside [0, {n_blocks})")
    ids = list(range(lo, hi))
    if cfg.pattern == "structured" and cfg.exclude_first_last:
        ids = [i for i in ids if i not in (0, n_blocks - 1)]
    return ids


def _block_sparsity(cfg: PruneConfig, bi: int, n_blocks: int) -> float:
    if cfg.block_sparsity is None:
        return cfg.sparsity
    if len(cfg.block_sparsity) != n_blocks:
        raise UsageError(f"block sparsity list has {len(cfg.block_sparsity)} entries; the model has {n_blocks} blocks")
    return cfg.block_sparsity[bi]


def prune(pipe, config: PruneConfig) -> dict:
    """Prune the pipeline's denoiser in place; returns the report (see README for its keys).

    Bad input raises ``UsageError`` before anything changes. If the prune fails or is interrupted later
    (a layer that cannot be solved, Ctrl-C), the denoiser is put back exactly as it was
    (``restore_on_failure``, the default; it keeps a CPU copy of each layer before changing it), so the
    same pipeline can be pruned again with a corrected config."""
    from .methods import METHODS

    cfg = config
    if not hasattr(pipe, "components") or not hasattr(pipe, "config"):
        raise UsageError(f"pipe must be a diffusers pipeline (obslib.load_pipeline(path)), got {type(pipe).__name__}")
    if not isinstance(cfg, PruneConfig):
        raise UsageError(f"config must be an obslib.PruneConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.prompts is None:
        raise UsageError("no calibration prompts given (PruneConfig.prompts: a list of strings)")
    if cfg.checkpoint_dir is not None:  # a path that could lose a user's files is refused before any work
        from .checkpoint import CheckpointDir, kind_for

        kind = kind_for(METHODS[cfg.method])
        if kind is not None:
            source = getattr(pipe, "name_or_path", None)
            CheckpointDir(cfg.checkpoint_dir, kind, "checkpoint_dir").check(protect=[source] if source else [])
    defaults = sampling_defaults(pipe)
    steps = cfg.steps or defaults["num_inference_steps"]
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"]
    comp, den = find_denoiser(pipe)
    dctx = None
    from . import distributed

    if distributed.active():  # torchrun / an initialised process group: see obslib/distributed.py
        if METHODS[cfg.method].driver is not None:
            raise UsageError(f"method {cfg.method!r} runs in one process; start it without torchrun")
        dctx = distributed.Context()
        dctx.check_agreement({k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_dir")}, den)
    undo = Undo(den) if cfg.restore_on_failure else None
    try:
        calibrate = None
        if METHODS[cfg.method].needs_calibration or (cfg.measure_error and METHODS[cfg.method].driver is None):
            msl = {k: v for k, v in defaults.items() if k == "max_sequence_length"}
            runner = CalibrationRunner(pipe, cfg.prompts, steps, guidance, cfg.seed, cfg.batch_size, msl, cfg.progress)
            if dctx is not None:
                if len(runner.batches) < dctx.size:
                    raise UsageError(f"{dctx.size} processes but only {len(runner.batches)} calibration batches of "
                                     f"{cfg.batch_size} prompts; give each process at least one (more prompts or a "
                                     "smaller --batch-size)")
                runner.keep(dctx.shard(len(runner.batches)))
            calibrate = runner.run
        train_batches = None
        if METHODS[cfg.method].needs_training:
            from .gradflow import training_batches

            train_batches = training_batches(pipe, cfg, defaults)
        report = prune_model(den, calibrate, cfg, steps, component=comp, undo=undo, train_batches=train_batches,
                             calibration_runs=len(runner.batches) if calibrate is not None else None, dist_ctx=dctx)
    except BaseException:
        if undo is not None:
            undo.rollback()
        raise
    report.update(num_calibration_prompts=len(cfg.prompts), guidance=guidance)
    return report


class Undo:
    """What ``prune_model`` changes, kept so that ``rollback()`` puts the denoiser back exactly: a CPU copy
    of each weight changed in place, each module replaced by a smaller one, each head-count attribute."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self._weights: dict[str, tuple] = {}
        self._modules: list[tuple] = []
        self._attrs: list[tuple] = []
        self._params: list[tuple] = []

    def weight(self, name: str) -> None:
        if name not in self._weights:
            m = self.root.get_submodule(name)
            copy = [m, m.weight.detach().to("cpu", copy=True)]
            copy.append(None if getattr(m, "bias", None) is None else m.bias.detach().to("cpu", copy=True))
            self._weights[name] = tuple(copy)

    def module(self, name: str) -> None:
        parent, _, leaf = name.rpartition(".")
        owner = self.root.get_submodule(parent) if parent else self.root
        self._modules.append((owner, leaf, getattr(owner, leaf)))

    def attrs(self, obj, names) -> None:
        self._attrs.append((obj, {n: getattr(obj, n) for n in names if hasattr(obj, n)}))

    def parameters(self, name: str) -> None:
        """Every parameter of a module (trained in place), as CPU copies."""
        for p in self.root.get_submodule(name).parameters():
            self._params.append((p, p.detach().to("cpu", copy=True)))

    def rollback(self) -> None:
        with torch.no_grad():
            for owner, leaf, mod in reversed(self._modules):
                setattr(owner, leaf, mod)
            for obj, saved in reversed(self._attrs):
                for k, v in saved.items():
                    setattr(obj, k, v)
            for p, saved in reversed(self._params):
                p.data.copy_(saved.to(p.device))
            for m, w, b in self._weights.values():
                m.weight.data.copy_(w.to(m.weight.device))
                if b is not None:
                    m.bias.data.copy_(b.to(m.bias.device))
        self._weights.clear(), self._modules.clear(), self._attrs.clear(), self._params.clear()


class _NoUndo(Undo):
    def __init__(self):
        super().__init__(None)

    def weight(self, name): pass

    def module(self, name): pass

    def attrs(self, obj, names): pass

    def parameters(self, name): pass


def collect_stats(pipe, layer_names: list[str], prompts: list[str], steps: int | None = None,
                  weighting: str = "log-decrease", guidance: float | None = None, seed: int = 0,
                  batch_size: int = 16, progress: bool = False) -> dict:
    """Timestep-weighted input statistics (H, mean, per-step energy) of named denoiser layers."""
    defaults = sampling_defaults(pipe)
    steps = steps or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if guidance is None else guidance
    _, den = find_denoiser(pipe)
    calib = Calibration(den, {n: den.get_submodule(n) for n in layer_names}, timestep_weights(weighting, steps))
    msl = {k: v for k, v in defaults.items() if k == "max_sequence_length"}
    runner = CalibrationRunner(pipe, prompts, steps, guidance, seed, batch_size, msl, progress)
    with calib:
        runner.run(calib)
    return calib.stats


def prune_model(den, calibrate, cfg: PruneConfig, steps: int, component: str = "transformer",
                undo: Undo | None = None, train_batches=None, calibration_runs: int | None = None,
                dist_ctx=None) -> dict:
    """Prune a denoiser in place. ``calibrate(calibration, desc)`` must run ``steps`` denoiser calls per
    sampling run over the calibration data, calling ``calibration.begin_run()/end_run()`` around each run
    (``CalibrationRunner.run`` does this with a real pipeline); None for calibration-free methods.
    ``undo`` records every change for a rollback (``prune`` rolls back on failure). With
    ``cfg.calibration == "propagate"`` ``calibrate`` runs once (dense, recording) and ``calibration_runs``
    (the number of sampling runs it makes) sizes the record. ``dist_ctx`` (an ``obslib.distributed.Context``)
    all-reduces each package's statistics and spreads its layer solves over the ranks."""
    from .methods import METHODS

    cfg.validate()
    method = METHODS[cfg.method]
    spec = spec_for(den)
    n_blocks = len(iter_blocks(den, spec))
    ids = _block_ids(n_blocks, cfg)
    structured = cfg.pattern == "structured"
    units = structured_units(den, spec, ids) if structured else layer_units(den, spec, ids)
    if not units:
        raise UsageError(f"no prunable layers in block range {cfg.block_range}")
    if method.needs_calibration and calibrate is None:
        raise UsageError(f"method {cfg.method!r} needs calibration data")
    if cfg.packages > len(units) and "packages" not in method.ignores:
        raise UsageError(f"packages K={cfg.packages} exceeds the {len(units)} basic units of this model for pattern "
                         f"{cfg.pattern!r}; allowed: 1 to {len(units)}")
    for bi in ids:
        _block_sparsity(cfg, bi, n_blocks)  # a block sparsity list of the wrong length fails before any work
    undo = undo or _NoUndo()
    weighting = None if "weighting" in method.ignores else method.forced_weighting or cfg.weighting
    targeted = _targeted_layers(den, spec, units, structured)
    for name in targeted:  # a broken model is refused before anything changes
        try:
            check_finite("its weight", den.get_submodule(name).weight.detach())
        except SolverError as e:
            raise SolverError(f"layer {name}: {e}") from None
    if structured and (method.heads is not None or method.needs_training):  # methods that remove whole heads
        _check_head_rows(den, units, cfg, n_blocks)
    params_before = sum(p.numel() for p in den.parameters())
    t0 = time.perf_counter()
    if method.driver is not None:  # a whole-model method: it reports its own layers, timings and extras
        part = method.driver(den, cfg, steps, component, undo, ids, calibrate=calibrate, train_batches=train_batches)
        report = _report_frame(cfg, weighting, steps, ids, params_before, den, component)
        report.update(part, packages=part.get("packages", 1))
        report["timings"]["total_s"] = time.perf_counter() - t0
        return _with_manifest(report, den, component)
    packages = split_packages(units, cfg.packages)
    alphas = timestep_weights(weighting, steps, cfg.alpha_min, cfg.alpha_max)
    prop = None
    if cfg.calibration == "propagate" and calibrate is not None:
        from .propagate import Propagation

        spill = os.path.dirname(os.path.abspath(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
        prop = Propagation([b for _, b in iter_blocks(den, spec)], spec.chain, calibrate, alphas,
                           calibration_runs or 1, None if cfg.record_ram_mb is None else int(cfg.record_ram_mb * 2**20),
                           spill, progress=cfg.progress)
    try:
        return _package_loop(den, cfg, method, spec, units, packages, calibrate, prop, alphas, steps, ids, n_blocks,
                             structured, targeted, params_before, weighting, component, undo, t0, dist_ctx)
    finally:
        if prop is not None:
            prop.close()


def _check_head_rows(den, units, cfg, n_blocks) -> None:
    """Removing a head takes head_dim rows from each of q, k, v: refuse (before any work) a block whose
    projections no longer have heads x head_dim rows (a SlimDiff output, whose query/key rank was reduced)."""
    for u in units:
        if u.kind != "heads" or n_remove(head_layout(den, u)[0], _block_sparsity(cfg, u.block_index, n_blocks)) == 0:
            continue
        block = den.get_submodule(u.block)
        hi = head_layout(den, u)[2]
        for rel in u.group.inputs:
            if has(block, rel) and weight_matrix(block.get_submodule(rel)).shape[0] != hi:
                rows = weight_matrix(block.get_submodule(rel)).shape[0]
                raise UsageError(f"{u.block}.{rel} has {rows} rows, not heads x head_dim = {hi} (its rank was reduced, "
                                 "e.g. by slimdiff), so whole heads cannot be removed from it; prune the original model")


def _package_loop(den, cfg, method, spec, units, packages, calibrate, prop, alphas, steps, ids, n_blocks, structured,
                  targeted, params_before, weighting, component, undo, t0, dctx=None) -> dict:
    """Calibrate (resample or propagate), solve and checkpoint package after package."""
    target_before = sum(den.get_submodule(n).weight.numel() for n in targeted)
    t_cal = t_solve = 0.0
    layers_report = []
    package_mb = []
    ck, start = None, 0
    if cfg.checkpoint_dir:  # resumable: each finished package is saved; a resumed run re-applies them
        from .checkpoint import PackageCheckpoint, fingerprint

        ck = PackageCheckpoint(cfg.checkpoint_dir, fingerprint(cfg, units, steps))
        expected = [(_targeted_layers(den, spec, p, structured),
                     [f"{u.block}.{u.group.attn}" for u in p if u.kind == "heads"]) for p in packages]
        loaded = ck.load(den, expected, cfg.resume)  # every entry checked before any work
        if prop is not None and loaded:  # the dense record, before pruned packages return
            t = time.perf_counter()
            prop.first(den, min(u.block_index for u in packages[0]), {})
            t_cal += time.perf_counter() - t
        state = ck.restore(den, undo, loaded)
        if state is not None:
            start, layers_report, package_mb = state["next"], state["layers"], state["package_mb"]
            t_cal, t_solve = state["calibration_s"], state["solve_s"]
    bar = tqdm(packages, desc=f"{cfg.method} packages", disable=not cfg.progress, initial=start)
    sent_per_package = []
    for pi, package in enumerate(bar):
        if pi < start:
            continue
        sent0 = dctx.sent if dctx is not None else 0
        stats = {}
        if calibrate is not None:
            t = time.perf_counter()
            layers = package_layers(den, package)
            mb = sum(weight_matrix(m).shape[1] ** 2 * 4 for m in layers.values()) / 2**20
            package_mb.append(mb)
            if cfg.progress:
                bar.write(f"package {pi + 1}/{len(packages)}: {len(layers)} layers, Hessians need {mb:.1f} MiB (float32)")
            desc = f"calibrate package {pi + 1}/{len(packages)}"
            b0, b1 = min(u.block_index for u in package), max(u.block_index for u in package)
            if prop is None:
                calib = Calibration(den, layers, alphas)
                with calib:
                    calibrate(calib, desc)
                stats = calib.stats
            elif prop.record is None:
                stats = prop.first(den, b0, layers)
            else:
                stats = prop.package(b0, b1, layers, desc)
            if dctx is not None:
                dctx.allreduce_stats(stats)
            check_stats(stats)
            t_cal += time.perf_counter() - t
        t = time.perf_counter()
        if dctx is not None and not structured:
            layers_report += _solve_spread(den, package, stats, cfg, method, undo, n_blocks, dctx)
        else:
            for unit in package:
                s = _block_sparsity(cfg, unit.block_index, n_blocks)
                solve = _solve_structured if structured else _solve_layers
                layers_report += solve(den, unit, stats, s, cfg, method, undo)
        t_solve += time.perf_counter() - t
        del stats
        if dctx is not None:
            sent_per_package.append(dctx.sent - sent0)
        if ck is not None and (dctx is None or dctx.rank == 0):
            heads = {f"{u.block}.{u.group.attn}": den.get_submodule(f"{u.block}.{u.group.attn}").heads
                     for u in package if u.kind == "heads"}
            ck.save(pi, den, _targeted_layers(den, spec, package, structured), heads,
                    {"next": pi + 1, "layers": layers_report, "package_mb": package_mb, "calibration_s": t_cal,
                     "solve_s": t_solve})

    target_after = sum(_nonzero_or_size(den.get_submodule(n), structured) for n in targeted)
    report = _report_frame(cfg, weighting, steps, ids, params_before, den, component)
    report.update(sparsity_actual=1 - target_after / target_before, packages=len(packages),
                  calibration=None if calibrate is None else cfg.calibration,
                  replay_block_calls=None if prop is None else prop.block_runs,
                  distributed=None if dctx is None else {"world_size": dctx.size, "backend": dctx.backend,
                                                         "bytes_sent_per_package": sent_per_package},
                  hessian_mb_per_package=package_mb, layers=layers_report,
                  timings={"calibration_s": t_cal, "solve_s": t_solve, "total_s": time.perf_counter() - t0})
    return _with_manifest(report, den, component)


def _report_frame(cfg, weighting, steps, ids, params_before, den, component) -> dict:
    """The keys every method's report has (methods fill sparsity_actual, packages, timings, layers)."""
    return {
        "method": cfg.method, "pattern": cfg.pattern, "sparsity_target": cfg.sparsity, "sparsity_actual": None,
        "weighting": weighting, "packages": None, "steps": steps, "seed": cfg.seed, "blocks": ids,
        "params_before": params_before, "params_after": sum(p.numel() for p in den.parameters()),
        "hessian_mb_per_package": [], "timings": {}, "layers": [],
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"},
    }


def _with_manifest(report: dict, den, component: str) -> dict:
    manifest = make_manifest(component, den, *_config_reference(den))
    if manifest["linear_shapes"] or manifest["heads"] or manifest.get("attention"):
        report["manifest"] = manifest  # shapes differ from the config (now or from an earlier prune)
    return report


def _config_reference(den) -> tuple[dict, dict]:
    """Layer shapes and head counts of the denoiser as its config builds it (on the meta device: no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        ref = type(den).from_config(den.config)
    return linear_shapes(ref), head_counts(ref)


def _nonzero_or_size(m, structured: bool) -> int:
    return m.weight.numel() if structured else int((m.weight != 0).sum())


def _targeted_layers(den, spec, units, structured) -> list[str]:
    if not structured:
        return [n for u in units for n in u.hessian_layers]
    names = []
    for u in units:
        block = den.get_submodule(u.block)
        g = u.group
        rel = (g.outs + g.inputs) if u.kind == "heads" else (g.ups + (g.down,))
        names += [f"{u.block}.{r}" for r in rel if has(block, r)]
    return names


def _solve_layers(den, unit, stats, sparsity, cfg, method, undo) -> list[dict]:
    return [_apply(den, name, *_solve_one(den, name, stats, sparsity, cfg, method), undo) for name in unit.hessian_layers]


def _apply(den, name, W_hat, err, undo) -> dict:
    """Write one layer's solution (kept for a rollback) and return its report entry."""
    mod = den.get_submodule(name)
    undo.weight(name)
    mod.weight.data.copy_(W_hat.to(mod.weight.dtype).reshape(mod.weight.shape))
    return {"name": name, "sparsity": float((mod.weight == 0).float().mean()), "rel_error": err}


def _solve_spread(den, package, stats, cfg, method, undo, n_blocks, dctx) -> list[dict]:
    """Unstructured / N:M over torch.distributed: each rank solves the layers it owns, then every solution is
    broadcast from its owner, in package order (layers are independent given their H)."""
    jobs = [(unit, name) for unit in package for name in unit.hessian_layers]
    mats = [weight_matrix(den.get_submodule(name)) for _, name in jobs]
    owners = dctx.assign([float(w.shape[0]) * w.shape[1] ** 2 for w in mats])
    mine, error = {}, None
    for (unit, name), owner in zip(jobs, owners):
        if owner == dctx.rank and error is None:
            try:
                mine[name] = _solve_one(den, name, stats, _block_sparsity(cfg, unit.block_index, n_blocks), cfg, method)
            except SolverError as e:
                error = e
    if dctx.any_failed(error is not None):  # no rank waits on a broadcast that will never come
        raise error or SolverError(f"another process (of {dctx.size}) could not solve a layer; see its message")
    out = []
    for (unit, name), owner, W in zip(jobs, owners, mats):
        dtype = den.get_submodule(name).weight.dtype
        w_hat, err = mine.get(name, (torch.empty(W.shape, dtype=dtype, device=W.device), None))
        w_hat = dctx.broadcast(w_hat.to(dtype), owner)
        e = float(dctx.broadcast(torch.tensor([float("nan") if err is None else err], dtype=torch.float64), owner))
        out.append(_apply(den, name, w_hat, None if math.isnan(e) else e, undo))
    return out


def _solve_one(den, name, stats, sparsity, cfg, method) -> tuple[torch.Tensor, float | None]:
    """One layer's solution (not applied) and its relative output error."""
    n, m = cfg.nm
    W = weight_matrix(den.get_submodule(name))
    try:
        solved = method.unstructured(W, stats.get(name), sparsity, n, m, cfg)
        W_hat = solved[0]
        check_finite("the solution", W_hat)
    except SolverError as e:
        raise SolverError(f"layer {name}: {e}") from None
    if name not in stats:
        err = None
    elif len(solved) == 3:  # the solver's own accumulated error (damped H): no second pass over W and H
        err = solved[2] / max(output_energy(W, stats[name].H), 1e-300)
    else:
        err = reconstruction_error(W, W_hat, stats[name].H)
    return W_hat, err


def _add_bias(module, delta) -> None:
    """Bias compensation (FLAP): only where the layer has a bias."""
    if delta is not None and module.bias is not None:
        module.bias.data.add_(delta.to(module.bias.dtype))


class _Slice:
    """Statistics restricted to input columns [lo, hi) (fused projections)."""

    def __init__(self, stats, lo, hi):
        self.H, self.mean, self.var = stats.H[lo:hi, lo:hi], stats.mean[lo:hi], stats.var[lo:hi]


def _sliced(stats, name, lo, hi, from_end: bool):
    st = stats.get(name)
    if st is None:
        return None
    n = st.H.shape[0]
    if from_end:  # trailing columns: same count in H (original layout) and in the current weight
        width = hi - lo
        lo, hi = n - width, n
    return st if (lo, hi) == (0, n) else _Slice(st, lo, hi)


def _solve_structured(den, unit, stats, sparsity, cfg, method, undo) -> list[dict]:
    try:
        return _solve_group(den, unit, stats, sparsity, cfg, method, undo)
    except SolverError as e:
        raise SolverError(f"layer {', '.join(unit.hessian_layers)}: {e}") from None


def head_layout(den, unit) -> tuple[int, int, int]:
    """(heads, head_dim, hi) of a heads unit: the out projections' leading ``hi`` columns are the heads."""
    block = den.get_submodule(unit.block)
    g = unit.group
    heads = block.get_submodule(g.attn).heads
    cols = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[1]
    hi = attr(block, g.out_cols) if g.out_cols else cols
    return heads, hi // heads, hi


def neuron_layout(den, unit) -> tuple[int, int]:
    """(inner, lo) of a neurons unit: the down projection's columns lo.. are its ``inner`` neurons."""
    block = den.get_submodule(unit.block)
    cols = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[1]
    inner = attr(block, unit.group.down_cols) if unit.group.down_cols else cols
    return inner, cols - inner


def n_remove(n: int, sparsity: float) -> int:
    """Groups removed from a unit of ``n`` heads or neurons (at least one is always kept)."""
    return min(n - 1, round(sparsity * n))


def remove_heads(den, unit, removed: list[int], undo, new=None, biases=None) -> None:
    """Physically remove heads: their columns of the out projections (whose head columns are first replaced by
    ``new`` when given, e.g. OBS-compensated), their rows of q/k/v; the head count follows."""
    block = den.get_submodule(unit.block)
    g = unit.group
    attn = block.get_submodule(g.attn)
    heads, head_dim, hi = head_layout(den, unit)
    cols = weight_matrix(den.get_submodule(unit.hessian_layers[0])).shape[1]
    keep = torch.cat([kept_index(heads, removed, head_dim), torch.arange(hi, cols)])
    for i, name in enumerate(unit.hessian_layers):
        full = weight_matrix(den.get_submodule(name))
        if new is not None:
            check_finite("the solution", new[i])
            full = full.clone()
            full[:, :hi] = new[i].to(full.dtype)
        undo.module(name)
        keep_cols(den, name, keep, full)
        _add_bias(den.get_submodule(name), None if biases is None else biases[i])
    for rel in g.inputs:
        if has(block, rel):
            undo.module(f"{unit.block}.{rel}")
            keep_rows(den, f"{unit.block}.{rel}", keep[keep < hi])
    undo.attrs(attn, ("heads", "inner_dim", "inner_kv_dim"))
    set_heads(attn, heads - len(removed))


def remove_neurons(den, unit, removed: list[int], undo, new=None, bias=None) -> None:
    """Physically remove FFN neurons: their columns of the down projection (whose neuron columns are first
    replaced by ``new`` when given) and their rows of the up projection(s) (GEGLU: both halves)."""
    block = den.get_submodule(unit.block)
    name = unit.hessian_layers[0]
    inner, lo = neuron_layout(den, unit)
    full = weight_matrix(den.get_submodule(name))
    if new is not None:
        check_finite("the solution", new)
        full = full.clone()
        full[:, lo:] = new.to(full.dtype)
    keep_local = kept_index(inner, removed)
    undo.module(name)
    keep_cols(den, name, torch.cat([torch.arange(lo), lo + keep_local]), full)
    _add_bias(den.get_submodule(name), bias)
    for up in unit.group.ups:
        gated = block.get_submodule(up).out_features == 2 * inner  # GEGLU: value and gate halves
        undo.module(f"{unit.block}.{up}")
        keep_rows(den, f"{unit.block}.{up}", torch.cat([keep_local, keep_local + inner]) if gated else keep_local)


def _solve_group(den, unit, stats, sparsity, cfg, method, undo) -> list[dict]:
    out = []
    if unit.kind == "heads":
        heads, head_dim, hi = head_layout(den, unit)
        k = n_remove(heads, sparsity)
        if k == 0:
            return []
        Ws = [weight_matrix(den.get_submodule(n))[:, :hi] for n in unit.hessian_layers]
        sts = [_sliced(stats, n, 0, hi, False) for n in unit.hessian_layers]
        new, removed, biases = method.heads(Ws, sts, head_dim, k, cfg)
        for name, W, Wn, st in zip(unit.hessian_layers, Ws, new, sts):
            err = reconstruction_error(W, Wn, st.H) if st is not None else None
            out.append({"name": name, "sparsity": len(removed) / heads, "rel_error": err, "removed_heads": removed})
        remove_heads(den, unit, removed, undo, new, biases)
    else:
        name = unit.hessian_layers[0]
        inner, lo = neuron_layout(den, unit)
        k = n_remove(inner, sparsity)
        if k == 0:
            return []
        W = weight_matrix(den.get_submodule(name))[:, lo:]
        st = _sliced(stats, name, lo, lo + inner, True)
        Wn, removed, bias = method.neurons(W, st, k, cfg)
        err = reconstruction_error(W, Wn, st.H) if st is not None else None
        remove_neurons(den, unit, removed, undo, Wn, bias)
        out.append({"name": name, "sparsity": k / inner, "rel_error": err, "removed_neurons": len(removed)})
    return out


# ---------------------------------------------------------------------------------------------------
# Command line

def read_prompt_file(path: str) -> list[str]:
    """One prompt per line from a UTF-8 text file (blank lines skipped)."""
    if not os.path.exists(path):
        raise UsageError(f"prompt file {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path!r} is not a regular file (a directory, FIFO or device); expected a text "
                         "file, one prompt per line")
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 2**20 + 1)
    except OSError as e:
        raise UsageError(f"prompt file {path!r} cannot be read ({e.strerror or e})") from None
    if len(data) > 64 * 2**20:
        raise UsageError(f"prompt file {path!r} is larger than 64 MiB; expected one prompt per line")
    if b"\0" in data:
        raise UsageError(f"prompt file {path!r} is binary (it holds NUL bytes); expected UTF-8 text, one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path!r} is empty (need one prompt per line)")
    return prompts


def default_calibration_prompts(model_dir: str, n: int) -> list[str]:
    """The embedded model's own training prompts; other models must pass --prompts FILE."""
    f = os.path.join(model_dir, DEFAULTS_FILE)
    try:
        meta = json.load(open(f, encoding="utf-8")) if os.path.exists(f) else {}
    except (OSError, ValueError) as e:
        raise UsageError(f"{f!r} is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict) or meta.get("calibration_prompts") != "shapes-train":
        raise UsageError(f"{model_dir!r} has no default calibration set; pass --prompts FILE (one prompt per line)")
    from .shapes import prompts

    available = len(prompts("train"))
    if not 1 <= n <= available:
        raise UsageError(f"--num-prompts {n}: the shapes world's training split has {available} prompts; "
                         f"allowed: 1 to {available}")
    return prompts("train", n)


PRUNE_EPILOG = """examples:
  obslib prune models/shapes-sd3 --sparsity 0.5 --num-prompts 16 --out out/obs50
  obslib prune models/shapes-sd3 --pattern 2:4 --sparsity 0.5 --method wanda --out out/wanda24
  obslib prune models/shapes-sd3 --method slimdiff --pattern structured --sparsity 0.2 --out out/slim20
  obslib prune /models/sd3.5-large --prompts calib.txt --steps 25 --guidance 7 --device cuda --dtype bfloat16 \\
      --out /models/sd35-obs50
  obslib prune models/shapes-sd3 --packages 24 --calibration propagate --out out/obs50-prop
  torchrun --standalone --nproc-per-node 4 -m obslib prune /models/sd3-medium --prompts calib.txt --device cuda \\
      --out /models/sd3m-obs50        (calibration sharded over 4 GPUs, nccl; gloo on CPU)
an interrupted run continues with the same command plus --resume."""


def add_cli(sub) -> None:
    import argparse

    from .methods import METHODS

    p = sub.add_parser("prune", help="prune a diffusers pipeline directory", epilog=PRUNE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prune the denoiser of a local diffusers pipeline and write a complete pipeline "
                                   "directory with pruning_report.json. Bad input is one line on stderr, exit code 2.")
    m = p.add_argument_group("model")
    m.add_argument("model_dir", help="a local diffusers pipeline directory (safetensors weights)")
    m.add_argument("--device", default="cpu", help="where the pipeline runs: cpu, cuda, cuda:N (default: cpu)")
    m.add_argument("--dtype", default="float32",
                   help="weights' dtype: float32, float16 or bfloat16; Hessians stay float32 (default: float32)")
    m.add_argument("--block-range", type=int, nargs=2, metavar=("START", "END"),
                   help="prune blocks START..END-1 only (default: every block)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="obs-diff", help=f"one of: {', '.join(METHODS)} (default: obs-diff)")
    g.add_argument("--pattern", default="unstructured",
                   help=f"one of: {', '.join(PATTERNS)}; slimdiff and gradient-flow need structured (default: unstructured)")
    g.add_argument("--sparsity", type=float, default=0.5,
                   help="share removed from the targeted layers, in [0, 1); N:M needs N/M; structured: share of heads "
                        "and FFN neurons per block (slimdiff: of their parameters) (default: 0.5)")
    g.add_argument("--head-saliency", default="exact", help="structured OBS head cost: exact or diag (default: exact)")
    g.add_argument("--solver-dtype", default="float32", choices=("float32", "float64"),
                   help="OBS solver precision; float64 is used per layer where float32 fails (default: float32)")
    c = p.add_argument_group("calibration")
    x = c.add_mutually_exclusive_group()
    x.add_argument("--num-prompts", type=int,
                   help="the first N of the embedded model's training prompts (default: 100; other models need --prompts)")
    x.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (UTF-8)")
    c.add_argument("--steps", type=int, help="sampling steps per calibration run (default: the model's own, else 25)")
    c.add_argument("--guidance", type=float, help="CFG scale of calibration runs (default: the model's own, else 7.0)")
    c.add_argument("--weighting", default="log-decrease",
                   help=f"timestep weights, one of: {', '.join(SCHEMES)} (default: log-decrease)")
    c.add_argument("--packages", type=int, default=None,
                   help="K module packages, each calibrated through the already-pruned model (default: 4)")
    c.add_argument("--calibration", default=None, choices=CALIBRATIONS,
                   help="resample: full sampling through the partly pruned model for every package (the paper's); "
                        "propagate: dense sampling once, then each package replays the recorded inputs through its "
                        "own blocks only, so the cost barely grows with --packages (default: resample)")
    c.add_argument("--record-ram-mb", type=float, default=None, metavar="MIB",
                   help="propagate: RAM the recorded block inputs may take before they go to disk beside --out "
                        "(default: half of the free memory)")
    c.add_argument("--seed", type=int, default=0, help="calibration seed (default: 0)")
    c.add_argument("--batch-size", type=int, default=16, help="prompts per calibration (or training) batch (default: 16)")
    c.add_argument("--report-error", action="store_true",
                   help="calibration-free methods (magnitude, l1-norm) calibrate anyway to report each layer's error")
    t = p.add_argument_group("training (gradient-flow)")
    t.add_argument("--iterations", type=int, default=None, help="training iterations (default: 100)")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-5)")
    t.add_argument("--train-data", metavar="DIR", default=None,
                   help="images + metadata.jsonl (file_name, text) (default: the embedded model's shapes world)")
    t.add_argument("--gradient-criterion", choices=("raise", "lower"), default="raise",
                   help="prune the groups whose removal raises (the paper's rule) or lowers the gradient norm "
                        "(default: raise)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="the new pipeline directory (never the model's, never inside or above it)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier obslib output (never anything else)")
    o.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="checkpoints after each package / 25 training iterations (default: .obslib-ckpt-OUT beside "
                        "--out; removed after success)")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    o.add_argument("--quiet", action="store_true", help="no progress bars, notes or closing line")
    o.add_argument("--verbose", action="store_true", help="show the libraries' own loading bars and warnings")
    p.set_defaults(func=_cli_prune)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cli_prune(a) -> None:
    """``obslib prune``: every flag and path is checked before the model is loaded, then prune and save.
    Notes for flags the method ignores come only once the command is known to be valid."""
    from . import distributed
    from .checkpoint import CheckpointDir, PackageCheckpoint, config_fingerprint, kind_for
    from .io import _tree_bytes, check_device, check_output_dir, ignored_pickles
    from .methods import METHODS
    from .obs import SolverError

    if a.dtype not in DTYPES:
        raise UsageError(f"--dtype {a.dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    if a.num_prompts is not None and a.num_prompts < 1:
        raise UsageError(f"--num-prompts {a.num_prompts} must be >= 1")
    real = os.path.realpath(a.out) if isinstance(a.out, str) and a.out.strip() else None
    ckdir = a.checkpoint_dir or (real and os.path.join(os.path.dirname(real), f".obslib-ckpt-{os.path.basename(real)}"))
    extra_cfg = {}
    if a.iterations is not None:
        extra_cfg["iterations"] = a.iterations
    if a.lr is not None:
        extra_cfg["lr"] = a.lr
    cfg = PruneConfig(method=a.method, pattern=a.pattern, sparsity=a.sparsity, weighting=a.weighting,
                      train_data=a.train_data, checkpoint_dir=ckdir, resume=a.resume, **extra_cfg,
                      gradient_criterion=a.gradient_criterion,
                      packages=4 if a.packages is None else a.packages, steps=a.steps, guidance=a.guidance, seed=a.seed, batch_size=a.batch_size,
                      block_range=tuple(a.block_range) if a.block_range else None, head_saliency=a.head_saliency,
                      solver_dtype=a.solver_dtype, calibration=a.calibration or "resample",
                      record_ram_mb=a.record_ram_mb, progress=not a.quiet, prompts=["(validated)"], restore_on_failure=False,
                      measure_error=a.report_error)
    cfg.validate()
    meth = METHODS[a.method]
    check_pipeline_dir(a.model_dir)
    check_device(a.device)
    # everything about --out and the checkpoints is settled before the (long) work starts
    check_output_dir(a.out, [a.model_dir], a.overwrite, need_bytes=_tree_bytes(a.model_dir))
    training = meth.needs_training
    if training:
        if a.train_data is not None:
            from .gradflow import ImageFolder

            ImageFolder(a.train_data, 1, 1, 0)  # a folder that cannot be read is refused now, not after loading
        cfg.prompts = ["(training batches)"]
    else:
        cfg.prompts = (read_prompt_file(a.prompts) if a.prompts is not None
                       else default_calibration_prompts(a.model_dir, a.num_prompts or 100))
    kind = kind_for(meth)
    command = "obslib " + shlex.join(getattr(a, "argv", None) or sys.argv[1:])
    resume_cmd = command if a.resume else f"{command} --resume"
    ck = None
    if kind is not None:
        ck = CheckpointDir(ckdir, kind)
        ck.check(protect=[a.model_dir], out=a.out)
        if kind == "packages":
            PackageCheckpoint(ckdir, config_fingerprint(cfg)).check_config(a.resume, command)
        elif ck.entries() and not a.resume:
            raise UsageError(f"{ckdir!r} holds the checkpoint of an interrupted run; continue it: {resume_cmd}; "
                             "or delete that directory to start over")
    if not a.quiet:  # the command is valid: now say what it ignores
        notes = []
        for flag, field_ in (("--packages", "packages"), ("--calibration", "calibration")):
            if getattr(a, field_) is not None and field_ in meth.ignores:
                notes.append(f"{flag} is ignored by {a.method} (one calibration pass, one global allocation)")
        given = [f for f, v in (("--iterations", a.iterations), ("--lr", a.lr), ("--train-data", a.train_data))
                 if v is not None]
        if given and not training:
            notes.append(f"{', '.join(given)} only apply to methods that train (gradient-flow); ignored")
        calibrates = meth.needs_calibration or (a.report_error and meth.driver is None)
        if a.calibration == "propagate" and not calibrates and "calibration" not in meth.ignores:
            notes.append(f"--calibration propagate is ignored: {a.method} needs no calibration (add --report-error "
                         "to calibrate for the layer errors)")
        if a.record_ram_mb is not None and (cfg.calibration != "propagate" or not calibrates
                                            or "calibration" in meth.ignores):
            notes.append("--record-ram-mb only applies to --calibration propagate; ignored")
        if kind is None and (a.checkpoint_dir is not None or a.resume):
            notes.append(f"{a.method} runs in one step and writes no checkpoints; --checkpoint-dir / --resume ignored")
        notes += [f"{f} is a pickle file; obslib loads the safetensors beside it and never opens it"
                  for f in ignored_pickles(a.model_dir)[:3]]
        for n in notes:
            print(f"obslib: note: {n}", file=sys.stderr)

    distributed.init_from_env(a.device)  # under torchrun: one process group, rank 0 writes (obslib/distributed.py)
    rank0 = not distributed.active() or distributed.dist.get_rank() == 0
    cfg.progress = cfg.progress and rank0
    t0 = time.perf_counter()
    pipe = load_pipeline(a.model_dir, device=distributed.rank_device(a.device), dtype=DTYPES[a.dtype],
                         progress=a.verbose and rank0)
    t_load = time.perf_counter() - t0
    saved_before = len(ck.entries()) if ck is not None else 0
    try:
        report = prune(pipe, cfg)
    except BaseException as e:
        if ck is None or not rank0:
            raise
        n = len(ck.entries())
        if n == 0:
            ck.remove_if_empty()
            raise
        where = f"{n} finished step(s) are checkpointed in {ck.path}; continue with: {resume_cmd}"
        if isinstance(e, (UsageError, SolverError)) and n > saved_before:
            raise type(e)(f"{e} ({where})") from None
        if isinstance(e, KeyboardInterrupt):
            print(f"obslib: interrupted; {where}", file=sys.stderr)
        elif not isinstance(e, (UsageError, SolverError)):
            print(f"obslib: {where}", file=sys.stderr)
        raise
    if not rank0:
        return
    t = time.perf_counter()
    save_pruned(pipe, report, a.out, a.model_dir, overwrite=a.overwrite, flag="--out")
    t_save = time.perf_counter() - t
    if ck is not None:
        ck.remove()  # the run is complete: its checkpoints (obslib's files only) are no longer needed
    if not a.quiet:
        print(closing_line(a.out, report, pipe, t_load, t_save, time.perf_counter() - t0))


def closing_line(out: str, report: dict, pipe, t_load: float, t_save: float, wall: float) -> str:
    """What was written, in words: sparsity of the targeted layers and of the whole denoiser, zeros versus
    removed parameters, and the wall time with loading and saving."""
    _, den = find_denoiser(pipe)
    total = sum(p.numel() for p in den.parameters())
    zeros = sum(int((p == 0).sum()) for p in den.parameters())
    before, after = report["params_before"], report["params_after"]
    if after < before:
        what = (f"removed {before - after:,} of the denoiser's {before:,} parameters ({1 - after / before:.1%}; "
                f"{report['sparsity_actual']:.1%} of the targeted layers)")
    else:
        what = (f"{report['sparsity_actual']:.1%} of the targeted layers' weights are zero = {zeros / total:.1%} of "
                f"the denoiser's {total:,} parameters (zeros: the parameter count is unchanged)")
    return (f"wrote {out}: {what}; {wall:.1f} s wall (load {t_load:.1f} s, prune {report['timings']['total_s']:.1f} s, "
            f"save {t_save:.1f} s)")


def save_pruned(pipe, report: dict, out: str, model_dir: str | None = None, overwrite: bool = False,
                flag: str = "out") -> None:
    """Write the pruned pipeline, its report and (when shapes changed) its manifest atomically.

    The same rules as the command line: ``out`` may not be, contain or lie inside the model directory
    (``model_dir``, default the directory the pipeline was loaded from); an existing non-empty ``out`` is
    replaced only with ``overwrite=True`` and only if obslib wrote it. The model's ``obslib_defaults.json``
    (sampling defaults) is carried over."""
    if not isinstance(report, dict) or "method" not in report:
        raise UsageError("report must be the dict returned by obslib.prune")
    if not hasattr(pipe, "save_pretrained") or not hasattr(pipe, "components"):
        raise UsageError(f"pipe must be a diffusers pipeline, got {type(pipe).__name__}")
    if model_dir is not None and not isinstance(model_dir, (str, os.PathLike)):
        raise UsageError(f"model_dir={model_dir!r}: expected a directory path or None")
    if not isinstance(overwrite, bool):
        raise UsageError(f"overwrite={overwrite!r}: expected True or False")
    source = os.fspath(model_dir) if model_dir is not None else getattr(pipe, "name_or_path", None)
    extra = {"pruning_report.json": {"written_by": WRITTEN_BY, "obslib_version": _version(),
                                     **{k: v for k, v in report.items() if k != "manifest"}}}
    src = os.path.join(source, DEFAULTS_FILE) if source else None
    if src and os.path.exists(src):
        try:
            with open(src, encoding="utf-8") as f:
                extra[DEFAULTS_FILE] = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{src!r} cannot be carried over: {' '.join(str(e).split())[:120]}") from None
    save_pipeline(pipe, out, manifest=report.get("manifest"), extra_json=extra,
                  protect=[source] if source else [], overwrite=overwrite, flag=flag)


def _version() -> str:
    from . import __version__

    return __version__
