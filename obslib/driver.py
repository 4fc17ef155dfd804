"""The pruning driver: ``prune(pipe, config) -> report`` and ``prune_model(denoiser, calibrate, config)``.

The one driver for every method and granularity: resolve the denoiser's layer map, form basic units and K
packages, calibrate each package through the already-pruned model (``obslib.sampling``, or replays in
``obslib.propagate``), solve each unit with the chosen method (``obslib.methods``), write the solution
(``obslib.surgery``), checkpoint, and report per-layer sparsity and reconstruction error.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .archs import find_denoiser, has, iter_blocks, spec_for
from .config import PruneConfig
from .seeds import SEEDING_VERSION
from .errors import SolverError, UsageError
from .hessian import Calibration, calib_options, check_stats, unique_mb, weight_matrix
from .manifest import with_manifest
from .methods import METHODS
from .methods.base import WholeModelRun
from .owned import RunLock
from .obs import check_finite, output_energy, reconstruction_error
from .packages import layer_units, package_layers, split_packages, structured_units
from .sampling import CalibrationRunner, call_kwargs, sampling_defaults
from .surgery import (NoUndo, Undo, group_params, head_layout, n_remove, neuron_layout, remove_heads, remove_neurons,
                      targeted_layers, targeted_size, unit_name)
from .weighting import MEASURED, timestep_weights


def prune(pipe, config: PruneConfig) -> dict:
    """Prune the pipeline's denoiser in place; returns the report (see README for its keys).

    Bad input raises ``UsageError`` before anything changes. If the prune fails or is interrupted later
    (a layer that cannot be solved, Ctrl-C), the denoiser is put back exactly as it was
    (``restore_on_failure``, the default; it keeps a CPU copy of each layer before changing it), so the
    same pipeline can be pruned again with a corrected config. ``config`` is checked once and never changed."""
    if not hasattr(pipe, "components") or not hasattr(pipe, "config"):
        raise UsageError(f"pipe must be a diffusers pipeline (obslib.load_pipeline(path)), got {type(pipe).__name__}")
    if not isinstance(config, PruneConfig):
        raise UsageError(f"config must be an obslib.PruneConfig, got {type(config).__name__}")
    cfg = _checked(config)
    method = METHODS[cfg.method]
    calibrates = method.calibrates(cfg.measure_error)
    if cfg.prompts is None and calibrates:
        raise UsageError("no calibration prompts given (PruneConfig.prompts: a list of strings)")
    from .checkpoint import CheckpointDir, config_fingerprint

    kind = method.checkpoint_kind if cfg.checkpoint_dir is not None else None
    with contextlib.ExitStack() as held:
        if kind is not None:  # one run per checkpoint directory; a path that could lose a user's files is refused
            from . import distributed

            if not distributed.active() or distributed.dist.get_rank() == 0:  # rank 0 writes the checkpoints
                held.enter_context(RunLock(cfg.checkpoint_dir, "checkpoint_dir"))
            source = getattr(pipe, "name_or_path", None)
            CheckpointDir(cfg.checkpoint_dir, kind, "checkpoint_dir", config_fingerprint(cfg)).check(
                protect=[source] if source else [])
        return _prune(pipe, cfg, method, calibrates)


def _prune(pipe, cfg: PruneConfig, method, calibrates: bool) -> dict:
    defaults = sampling_defaults(pipe)
    steps = cfg.steps or defaults["num_inference_steps"]
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"]
    comp, den = find_denoiser(pipe)
    dctx = None
    from . import distributed

    if distributed.active():  # torchrun / an initialised process group: see obslib/distributed.py
        if method.whole_model:
            raise UsageError(f"method {cfg.method!r} runs in one process; start it without torchrun")
        dctx = distributed.Context()
        dctx.check_agreement({k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_dir")}, den)
    undo = Undo(den) if cfg.restore_on_failure else None
    msl = call_kwargs(defaults)
    flops = _count_flops(pipe, steps, guidance, cfg, msl) if cfg.count_flops else None
    try:
        calibrate = None
        if calibrates:
            runner = CalibrationRunner(pipe, cfg.prompts, steps, guidance, cfg.seed, cfg.batch_size, msl, cfg.progress)
            if dctx is not None:
                if len(cfg.prompts) < dctx.size:
                    raise UsageError(f"{dctx.size} processes but only {len(cfg.prompts)} calibration prompts; every "
                                     f"process samples at least one prompt (allowed: 1 to {len(cfg.prompts)} processes, "
                                     "or more prompts)")
                runner.keep(dctx.shard(len(cfg.prompts)))  # prompt i to rank i mod N, with prompt i's own seed
            calibrate = runner.run
        alphas, probe = None, None
        if method.weighting(cfg.weighting) == MEASURED and method.needs_calibration:
            alphas, probe = _sensitivity(pipe, den, cfg, steps, guidance, defaults, dctx)
        train_batches = None
        if method.trains:
            from .gradflow import training_batches

            train_batches = training_batches(pipe, cfg, defaults)
        report = prune_model(den, calibrate, cfg, steps, component=comp, undo=undo, train_batches=train_batches,
                             calibration_runs=len(runner.batches) if calibrate is not None else None, dist_ctx=dctx,
                             alphas=alphas)
        check_finite_result(den, cfg)
    except BaseException:
        if undo is not None:
            undo.rollback()
        raise
    report.update(num_calibration_prompts=len(cfg.prompts) if calibrates else 0, guidance=guidance)
    if flops is not None:
        report["flops_per_image"] = _count_flops(pipe, steps, guidance, cfg, msl, flops)
    if probe is not None:  # the probe ran before prune_model's clock started: count it in the total
        report["sensitivity"] = probe
        report["timings"]["sensitivity_probe_s"] = probe["seconds"]
        report["timings"]["total_s"] += probe["seconds"]
    return report


def check_finite_result(den, cfg) -> None:
    """No output obslib's own loader would refuse: NaN or infinite pruned weights are one line naming the layers."""
    bad = [n for n, p in den.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        hint = f" (gradient-flow training diverged: lower --lr, now {cfg.lr:g})" if cfg.method == "gradient-flow" else ""
        raise UsageError(f"the pruned weights of {len(bad)} parameter(s) are NaN or infinite ({', '.join(bad[:3])}{more})"
                         f"{hint}; no output was written")


def _count_flops(pipe, steps, guidance, cfg, msl, before: dict | None = None) -> dict:
    """The denoiser's FLOPs per image (obslib.flops): ``{"dense": ...}`` before the prune; with ``before``, the same
    inputs counted again and the pruned count and ratio added. A pipeline the counter cannot run gets a note."""
    from .flops import flops_per_image

    if before is not None and "call" not in before:
        return {k: v for k, v in before.items() if k != "call"}
    try:
        if before is None:
            f, call = flops_per_image(pipe, steps, guidance, (cfg.prompts or ["an image"])[0], msl)
            return {"dense": f, "call": call}
        f, _ = flops_per_image(pipe, steps, guidance, call=before["call"])
    except (RuntimeError, TypeError, ValueError, AttributeError, UsageError) as e:
        return {"dense": None, "pruned": None, "note": f"not counted ({type(e).__name__}: {str(e)[:120]})"}
    return {"dense": before["dense"], "pruned": f, "ratio": f / max(before["dense"], 1), "steps": steps,
            "counts": "denoiser FLOPs per image over all steps (CFG batch included), torch.utils.flop_counter"}


def _sensitivity(pipe, den, cfg, steps, guidance, defaults, dctx) -> tuple[list[float], dict]:
    """The ``sensitivity`` weighting's probe (obslib.sensitivity) on the first calibration prompts; under
    torch.distributed every rank runs it and rank 0's weights are used by all."""
    from .sensitivity import measure

    msl = call_kwargs(defaults)
    runner = CalibrationRunner(pipe, cfg.prompts[:cfg.sensitivity_prompts], steps, guidance, cfg.seed, cfg.batch_size,
                               msl, False)
    ids = _block_ids(len(iter_blocks(den, spec_for(den))), cfg)
    probe = measure(runner, den, steps, ids, cfg)
    if dctx is not None:
        a = dctx.broadcast(torch.tensor(probe["alphas"], dtype=torch.float64), 0)
        probe["alphas"] = [float(x) for x in a.cpu()]
    if cfg.progress:
        print(f"sensitivity weighting: probe of {probe['probe_runs']} runs x {probe['probe_prompts']} prompts took "
              f"{probe['seconds']:.1f} s; alpha from {min(probe['alphas']):.3g} to {max(probe['alphas']):.3g}",
              file=sys.stderr)
    return probe["alphas"], probe


def _checked(cfg: PruneConfig) -> PruneConfig:
    """``cfg`` checked (a copy; once per prune: a config ``PruneConfig.validate`` returned is taken as it is)."""
    return cfg if getattr(cfg, "_validated", False) else cfg.validate()


def prune_model(den, calibrate, cfg: PruneConfig, steps: int, component: str = "transformer",
                undo: Undo | None = None, train_batches=None, calibration_runs: int | None = None,
                dist_ctx=None, alphas: list[float] | None = None) -> dict:
    """Prune a denoiser in place. ``calibrate(calibration, desc)`` must run ``steps`` denoiser calls per
    sampling run over the calibration data, calling ``calibration.begin_run()/end_run()`` around each run
    (``CalibrationRunner.run`` does this with a real pipeline); None for calibration-free methods.
    ``undo`` records every change for a rollback (``prune`` rolls back on failure). With
    ``cfg.calibration == "propagate"`` ``calibrate`` runs once (dense, recording) and ``calibration_runs``
    (the number of sampling runs it makes) sizes the record. ``dist_ctx`` (an ``obslib.distributed.Context``)
    all-reduces each package's statistics and spreads its layer solves over the ranks. ``alphas``: measured
    timestep weights (the ``sensitivity`` weighting's probe, which ``prune`` runs); else from ``cfg.weighting``."""
    cfg = _checked(cfg)
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
    if cfg.packages > len(units) and not method.ignored("packages"):
        raise UsageError(f"packages K={cfg.packages} exceeds the {len(units)} basic units of this model for pattern "
                         f"{cfg.pattern!r}; allowed: 1 to {len(units)}")
    for bi in ids:
        _block_sparsity(cfg, bi, n_blocks)  # a block sparsity list of the wrong length fails before any work
    undo = undo or NoUndo()
    weighting = method.weighting(cfg.weighting)
    if alphas is not None and len(alphas) != steps:
        raise UsageError(f"{len(alphas)} timestep weights given for {steps} sampling steps")
    if weighting is not None and alphas is None:
        if weighting == MEASURED and not method.needs_calibration:  # its solution never reads H: any weights do
            alphas = [1.0] * steps
        else:
            alphas = timestep_weights(weighting, steps, cfg.alpha_min, cfg.alpha_max)
    targeted = targeted_layers(den, spec, units, structured)
    for name in targeted:  # a broken model is refused before anything changes
        try:
            check_finite("its weight", den.get_submodule(name).weight.detach())
        except SolverError as e:
            raise SolverError(f"layer {name}: {e}") from None
    shares = _structured_shares(den, spec, units, cfg, method) if structured else None
    if structured and method.removes_heads:
        _check_head_rows(den, units, cfg, n_blocks, shares)
    params_before = sum(p.numel() for p in den.parameters())
    t0 = time.perf_counter()
    if method.whole_model:  # it reports its own layers, timings and extras (obslib.methods.base: one signature)
        targeted_before = targeted_size(den, sorted(set(targeted)), "parameters") if structured else None
        part = method.driver(WholeModelRun(den, cfg, steps, component, undo, ids, calibrate=calibrate,
                                           train_batches=train_batches, alphas=alphas, shares=shares))
        report = _report_frame(cfg, weighting, steps, ids, params_before, den, component)
        report["timestep_weights"] = alphas
        report["params_removed"] = params_before - report["params_after"]
        if structured:
            report.update(targeted_params_before=targeted_before,
                          targeted_params_after=targeted_size(den, sorted(set(targeted)), "parameters"))
        report.update(part, packages=part.get("packages", 1))
        report["timings"]["total_s"] = time.perf_counter() - t0
        return with_manifest(report, den, component)
    packages = split_packages(units, cfg.packages)
    prop = None
    if cfg.calibration == "propagate" and calibrate is not None:
        from .propagate import Propagation

        spill = os.path.dirname(os.path.abspath(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
        named = list(iter_blocks(den, spec))
        prop = Propagation([b for _, b in named], spec.chain, calibrate, alphas,
                           calibration_runs or 1, None if cfg.record_ram_mb is None else int(cfg.record_ram_mb * 2**20),
                           spill, progress=cfg.progress, calib_options=calib_options(cfg),
                           block_names=[n for n, _ in named])
    plan = PackagePlan(den=den, cfg=cfg, method=method, spec=spec, units=units, packages=packages, steps=steps,
                       ids=ids, n_blocks=n_blocks, targeted=targeted, alphas=alphas, weighting=weighting,
                       component=component, shares=shares)
    try:
        return run_packages(plan, PackageIO(calibrate=calibrate, prop=prop, undo=undo, dctx=dist_ctx), params_before, t0)
    finally:
        if prop is not None:
            prop.close()


def _replay_plan(den, spec, packages, pi: int, structured: bool) -> tuple[set, set]:
    """For package ``pi``'s propagate replay: (the layers this or a later package changes: everything else in
    a block is final and memoized; the layers whose outputs its Hessians cannot read: those of later
    packages, since a unit never reads a later unit's output, and, when the package is one basic unit, its
    own, since no layer of a unit reads another's)."""
    later = {n for p in packages[pi + 1:] for n in targeted_layers(den, spec, p, structured)}
    changing = later | set(targeted_layers(den, spec, packages[pi], structured))
    own = set(package_layers(den, packages[pi])) if len(packages[pi]) == 1 else set()
    return changing, later | own


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


def _unit_sparsity(cfg: PruneConfig, unit, n_blocks: int, shares: dict | None = None) -> float:
    """The share removed from one unit: its entry in ``shares`` (``_structured_shares``), else the block's sparsity,
    or the head / neuron sparsity of a structured unit."""
    if shares and unit.kind != "layers" and unit_name(unit) in shares:
        return shares[unit_name(unit)]
    return cfg.group_sparsity(unit.kind, _block_sparsity(cfg, unit.block_index, n_blocks))


def _structured_shares(den, spec, units, cfg, method) -> dict | None:
    """Per structured unit (by name), the share to remove when the config says more than one share for all: a
    parameter budget split uniformly (``allocation.uniform_shares``), then the entries of ``cfg.unit_sparsity``.
    None when neither is set (or the allocation is global: decided per package from its Hessians)."""
    names = {unit_name(u) for u in units}
    if cfg.unit_sparsity is not None:
        unknown = sorted(set(cfg.unit_sparsity) - names)
        if unknown:
            raise UsageError(f"unit sparsity names {unknown[0]!r}, which is not a pruned unit here; allowed: "
                             f"{', '.join(sorted(names)[:4])}{', ...' if len(names) > 4 else ''}")
    shares = None
    if (cfg.param_budget is not None and cfg.allocation_used == "uniform"
            and method.removes_heads):
        from .allocation import uniform_shares

        total = targeted_size(den, sorted(set(targeted_layers(den, spec, units, True))), "parameters")
        h, n = uniform_shares(den, units, cfg.param_budget, total, cfg.head_sparsity)
        shares = {unit_name(u): h if u.kind == "heads" else n for u in units}
    if cfg.unit_sparsity is not None:
        shares = {**(shares or {}), **cfg.unit_sparsity}
    return shares


def _global_shares(den, spec, package, stats, cfg) -> dict[str, float]:
    """``--allocation global``: per layer (unstructured) or per structured unit, the share this package removes."""
    from .allocation import package_sparsities, structured_counts

    if cfg.pattern != "structured":
        return package_sparsities(den, [n for u in package for n in u.hessian_layers], stats, cfg.sparsity, cfg.percdamp)
    budget = cfg.param_budget if cfg.param_budget is not None else cfg.sparsity
    size = targeted_size(den, sorted(set(targeted_layers(den, spec, package, True))), "parameters")
    counts = structured_counts(den, package, stats, budget * size, cfg.percdamp)
    return {unit_name(u): counts[unit_name(u)] / group_params(den, u)[0] for u in package}


def _check_head_rows(den, units, cfg, n_blocks, shares=None) -> None:
    """Removing a head takes head_dim rows from each of q, k, v: refuse (before any work) a block whose
    projections no longer have heads x head_dim rows (a SlimDiff output, whose query/key rank was reduced)."""
    anywhere = cfg.allocation_used == "global"  # any block may lose heads
    for u in units:
        if u.kind != "heads" or (not anywhere and n_remove(head_layout(den, u)[0],
                                                           _unit_sparsity(cfg, u, n_blocks, shares)) == 0):
            continue
        block = den.get_submodule(u.block)
        hi = head_layout(den, u)[2]
        for rel in u.group.inputs:
            if has(block, rel) and weight_matrix(block.get_submodule(rel)).shape[0] != hi:
                rows = weight_matrix(block.get_submodule(rel)).shape[0]
                raise UsageError(f"{u.block}.{rel} has {rows} rows, not heads x head_dim = {hi} (its rank was reduced, "
                                 "e.g. by slimdiff), so whole heads cannot be removed from it; prune the original model")


@dataclass
class PackagePlan:
    """What the package driver fixes before its first package: the model, the checked config and method, the
    units split into packages, the blocks, the timestep weights and (structured) the share per unit."""

    den: torch.nn.Module
    cfg: PruneConfig
    method: object
    spec: object
    units: list
    packages: list
    steps: int
    ids: list
    n_blocks: int
    targeted: list
    alphas: list | None
    weighting: str | None
    component: str
    shares: dict | None = None  # structured: a share per unit name (``_structured_shares``)

    @property
    def structured(self) -> bool:
        return self.cfg.pattern == "structured"

    def targeted_in(self, package) -> list[str]:
        return targeted_layers(self.den, self.spec, package, self.structured)


@dataclass
class PackageProgress:
    """What the package driver carries from package to package (and a checkpoint saves): the next package, the
    layers' report entries, each package's Hessian memory, the time spent calibrating and solving."""

    next: int = 0
    layers: list = field(default_factory=list)
    package_mb: list = field(default_factory=list)
    calibration_s: float = 0.0
    solve_s: float = 0.0
    sent_per_package: list = field(default_factory=list)  # bytes each package's all-reduce sent (torch.distributed)

    def saved(self) -> dict:
        return {"next": self.next, "layers": self.layers, "package_mb": self.package_mb,
                "calibration_s": self.calibration_s, "solve_s": self.solve_s}


@dataclass
class PackageIO:
    """Where the package driver's calibration comes from and what it may change: the calibration runner (None for
    calibration-free methods), the propagate record (or None), the rollback record, the distributed context (or
    None)."""

    calibrate: object
    prop: object
    undo: Undo
    dctx: object = None


def run_packages(plan: PackagePlan, io: PackageIO, params_before: int, t0: float) -> dict:
    """The package driver in its four stages, package after package: calibrate (resample, or the propagate replay),
    solve (the method on each unit), checkpoint; then report."""
    before = (targeted_size(plan.den, plan.targeted, "weights"),
              targeted_size(plan.den, sorted(set(plan.targeted)), "parameters"))
    ck, progress = _resume(plan, io)
    bar = tqdm(plan.packages, desc=f"{plan.cfg.method} packages", disable=not plan.cfg.progress, initial=progress.next)
    for pi, package in enumerate(bar):
        if pi < progress.next:
            continue
        sent0 = io.dctx.sent if io.dctx is not None else 0
        stats = {}
        if io.calibrate is not None:
            t = time.perf_counter()
            stats = _calibrate_package(plan, io, pi, progress, bar)
            progress.calibration_s += time.perf_counter() - t
        t = time.perf_counter()
        progress.layers += _solve_package(plan, io, package, stats)
        progress.solve_s += time.perf_counter() - t
        del stats
        if io.dctx is not None:
            progress.sent_per_package.append(io.dctx.sent - sent0)
        progress.next = pi + 1
        if ck is not None and (io.dctx is None or io.dctx.rank == 0):
            _checkpoint_package(plan, ck, pi, package, progress)
    return _package_report(plan, io, progress, before, params_before, t0)


def _resume(plan: PackagePlan, io: PackageIO) -> tuple[object, PackageProgress]:
    """The checkpoint of a resumable run (``cfg.checkpoint_dir``) and the progress it restores (each finished
    package re-applied; every entry checked before any work), or (None, a fresh start)."""
    cfg, den = plan.cfg, plan.den
    progress = PackageProgress()
    if not cfg.checkpoint_dir:
        return None, progress
    from .checkpoint import PackageCheckpoint, fingerprint

    ck = PackageCheckpoint(cfg.checkpoint_dir, fingerprint(cfg, plan.units, plan.steps))
    expected = [(plan.targeted_in(p), [f"{u.block}.{u.group.attn}" for u in p if u.kind == "heads"])
                for p in plan.packages]
    loaded = ck.load(den, expected, cfg.resume)
    if io.prop is not None and loaded:  # the dense record, before pruned packages return
        t = time.perf_counter()
        io.prop.first(den, min(u.block_index for u in plan.packages[0]), {})
        progress.calibration_s += time.perf_counter() - t
    state = ck.restore(den, io.undo, loaded)
    if state is not None:
        progress = PackageProgress(state["next"], state["layers"], state["package_mb"], state["calibration_s"],
                                   state["solve_s"], progress.sent_per_package)
    return ck, progress


def _calibrate_package(plan: PackagePlan, io: PackageIO, pi: int, progress: PackageProgress, bar) -> dict:
    """Package ``pi``'s statistics through the already-pruned model: a full calibration run (resample), or the
    propagate record's first pass / replay; all-reduced under torch.distributed and checked."""
    den, package, n = plan.den, plan.packages[pi], len(plan.packages)
    layers = package_layers(den, package)
    mb = sum(weight_matrix(m).shape[1] ** 2 * 4 for m in layers.values()) / 2**20
    if plan.cfg.progress:
        bar.write(f"package {pi + 1}/{n}: {len(layers)} layers, Hessians need {mb:.1f} MiB (float32)")
    desc = f"calibrate package {pi + 1}/{n}"
    b0, b1 = min(u.block_index for u in package), max(u.block_index for u in package)
    if io.prop is None:
        calib = Calibration(den, layers, plan.alphas, **calib_options(plan.cfg))
        with calib:
            io.calibrate(calib, desc)
        stats = calib.stats
    elif io.prop.record is None:
        stats = io.prop.first(den, b0, layers)
    else:
        stats = io.prop.package(b0, b1, layers, desc,
                                *_replay_plan(den, plan.spec, plan.packages, pi, plan.structured))
    if io.dctx is not None:
        io.dctx.allreduce_stats(stats)
    check_stats(stats)
    progress.package_mb.append(unique_mb(stats))  # layers reading one input share one accumulator
    return stats


def _solve_package(plan: PackagePlan, io: PackageIO, package, stats: dict) -> list[dict]:
    """Solve and write every unit of one package; the layers' report entries. ``--allocation global`` first decides
    this package's per-layer / per-unit shares from its Hessians (``obslib.allocation``)."""
    den, cfg, method = plan.den, plan.cfg, plan.method
    per = _global_shares(den, plan.spec, package, stats, cfg) if cfg.allocation_used == "global" and stats else None
    if io.dctx is not None and not plan.structured:
        return _solve_spread(plan, io, package, stats, per)
    out = []
    for unit in package:
        if plan.structured:
            s = per[unit_name(unit)] if per is not None else _unit_sparsity(cfg, unit, plan.n_blocks, plan.shares)
            out += _solve_structured(den, unit, stats, s, cfg, method, io.undo)
        else:
            s = per if per is not None else _unit_sparsity(cfg, unit, plan.n_blocks)
            out += _solve_layers(den, unit, stats, s, cfg, method, io.undo)
    return out


def _checkpoint_package(plan: PackagePlan, ck, pi: int, package, progress: PackageProgress) -> None:
    """Save package ``pi``'s layers (and its attentions' head counts) with the progress so far."""
    heads = {f"{u.block}.{u.group.attn}": plan.den.get_submodule(f"{u.block}.{u.group.attn}").heads
             for u in package if u.kind == "heads"}
    ck.save(pi, plan.den, plan.targeted_in(package), heads, progress.saved())


def _package_report(plan: PackagePlan, io: PackageIO, progress: PackageProgress, before: tuple[int, int],
                    params_before: int, t0: float) -> dict:
    """The package driver's report: achieved sparsity, packages, calibration mode and its replay counters, the
    distributed traffic, per-layer entries, removed heads / neurons and parameters, timings; with its manifest."""
    den, cfg, structured, prop, dctx, layers = plan.den, plan.cfg, plan.structured, io.prop, io.dctx, progress.layers
    counts = "weights" if structured else "nonzero weights"
    target_before, params_targeted_before = before
    target_after = targeted_size(den, plan.targeted, counts)
    report = _report_frame(cfg, plan.weighting, plan.steps, plan.ids, params_before, den, plan.component)
    report.update(sparsity_actual=1 - target_after / target_before, sparsity_counts=counts, packages=len(plan.packages),
                  calibration=None if io.calibrate is None else cfg.calibration,
                  replay_block_calls=None if prop is None else prop.block_runs,
                  replay_memo=None if prop is None or prop.memo is None else
                  {"hits": prop.memo.hits, "attention_hits": prop.memo.attention_hits,
                   "peak_mb": prop.memo.peak / 2**20, "not_kept": prop.memo.skipped},
                  distributed=None if dctx is None else {"world_size": dctx.size, "backend": dctx.backend,
                                                         "bytes_sent_per_package": progress.sent_per_package},
                  hessian_mb_per_package=progress.package_mb, layers=layers, timestep_weights=plan.alphas,
                  heads_removed=sum(e.get("heads_removed", 0) for e in layers) if structured else None,
                  neurons_removed=sum(len(e.get("removed_neurons", ())) for e in layers) if structured else None,
                  params_removed=params_before - sum(p.numel() for p in den.parameters()),
                  targeted_params_before=params_targeted_before if structured else None,
                  targeted_params_after=targeted_size(den, sorted(set(plan.targeted)), "parameters") if structured
                  else None,
                  timings={"calibration_s": progress.calibration_s, "solve_s": progress.solve_s,
                           "total_s": time.perf_counter() - t0})
    return with_manifest(report, den, component=plan.component)


def _report_frame(cfg, weighting, steps, ids, params_before, den, component) -> dict:
    """The keys every method's report has (methods fill sparsity_actual, packages, timings, layers)."""
    return {
        "method": cfg.method, "pattern": cfg.pattern, "sparsity_target": cfg.sparsity, "sparsity_actual": None,
        "weighting": weighting, "packages": None, "steps": steps, "seed": cfg.seed, "seeding": SEEDING_VERSION,
        "component": component, "blocks": ids, "calib_tokens": cfg.calib_tokens,
        "params_before": params_before, "params_after": sum(p.numel() for p in den.parameters()),
        "allocation": cfg.allocation_used, "param_budget": cfg.param_budget,
        "hessian_mb_per_package": [], "timings": {}, "layers": [],
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"},
    }


def _solve_layers(den, unit, stats, sparsity, cfg, method, undo) -> list[dict]:
    """Solve and write the unit's layers; ``sparsity`` is one share, or a share per layer name (global allocation)."""
    return [_write_solution(den, name, *_solve_one(den, name, stats, sparsity[name] if isinstance(sparsity, dict)
                                                   else sparsity, cfg, method), undo) for name in unit.hessian_layers]


def _write_solution(den, name, W_hat, err, undo) -> dict:
    """Write one layer's solution (kept for a rollback) and return its report entry."""
    mod = den.get_submodule(name)
    undo.weight(name)
    mod.weight.data.copy_(W_hat.to(mod.weight.dtype).reshape(mod.weight.shape))
    return {"name": name, "sparsity": float((mod.weight == 0).float().mean()), "rel_error": err}


def _solve_spread(plan: PackagePlan, io: PackageIO, package, stats, per=None) -> list[dict]:
    """Unstructured / N:M over torch.distributed: each rank solves the layers it owns, then every solution is
    broadcast from its owner, in package order (layers are independent given their H)."""
    den, cfg, method, undo, n_blocks, dctx = plan.den, plan.cfg, plan.method, io.undo, plan.n_blocks, io.dctx
    jobs = [(unit, name) for unit in package for name in unit.hessian_layers]
    mats = [weight_matrix(den.get_submodule(name)) for _, name in jobs]
    owners = dctx.assign([float(w.shape[0]) * w.shape[1] ** 2 for w in mats])
    mine, error = {}, None
    for (unit, name), owner in zip(jobs, owners):
        if owner == dctx.rank and error is None:
            try:
                s = per[name] if per is not None else _block_sparsity(cfg, unit.block_index, n_blocks)
                mine[name] = _solve_one(den, name, stats, s, cfg, method)
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
        out.append(_write_solution(den, name, w_hat, None if math.isnan(e) else e, undo))
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
    if cfg.refit_iterations and name in stats:  # the least-squares optimum on the solver's mask (obslib.refit)
        from .refit import refit

        W_hat, info = refit(W, W_hat, solved[1], stats[name].H, cfg.refit_iterations, cfg.percdamp,
                            torch.float64 if cfg.solver_dtype == "float64" else torch.float32)
        # measured like the solver's own error (damped H over the output energy), so the two compare
        return W_hat, info["error_after"] / max(output_energy(W, stats[name].H), 1e-300)
    if name not in stats:
        err = None
    elif len(solved) == 3:  # the solver's own accumulated error (damped H): no second pass over W and H
        err = solved[2] / max(output_energy(W, stats[name].H), 1e-300)
    else:
        err = reconstruction_error(W, W_hat, stats[name].H)
    return W_hat, err


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
        out[0]["heads_removed"] = len(removed)  # once per attention, not per output projection
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
        out.append({"name": name, "sparsity": k / inner, "rel_error": err, "removed_neurons": sorted(removed)})
    return out
