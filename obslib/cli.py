"""Command line: ``obslib prune`` (its flags, up-front checks and closing line), ``obslib evaluate``,
``obslib train-default-model``.

Bad input is reported as one line on stderr with exit code 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import time

import torch

from .archs import find_denoiser
from . import owned
from .checkpoint import CheckpointDir, PackageCheckpoint, config_fingerprint
from .config import CALIBRATIONS, PATTERNS, PruneConfig
from .errors import SolverError, Terminated, UsageError
from .io import (check_device, check_output_dir, check_pipeline_dir, ignored_pickles, load_pipeline, save_pruned,
                 say_note, tree_bytes)
from .methods import METHODS
from .driver import prune
from .sampling import default_calibration_prompts, read_prompt_file
from .weighting import SCHEMES, alpha_range


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value such as -1e-5 or -inf is a (bad) number, not an unknown option: let the range check name it
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):  # one line, exit 2 (argparse prints usage otherwise)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="obslib", description="OBS-Diff pruning study tools")
    p.add_argument("--version", action="version", version=f"obslib {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from . import evaluate as _evaluate

    _evaluate.add_cli(sub)
    add_prune_cli(sub)
    t = sub.add_parser("train-default-model", help="train the embedded shapes-sd3 model (resumable)")
    t.set_defaults(func=lambda a: __import__("obslib.shapes.train", fromlist=["main"]).main(a.rest))
    t.add_argument("rest", nargs=argparse.REMAINDER)
    return p


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


def add_prune_cli(sub) -> None:
    d = PruneConfig()  # the defaults the help states are the library's
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
    g.add_argument("--method", default=d.method, help=f"one of: {', '.join(METHODS)} (default: {d.method})")
    g.add_argument("--pattern", default=d.pattern,
                   help=f"one of: {', '.join(PATTERNS)}; slimdiff and gradient-flow need structured (default: {d.pattern})")
    g.add_argument("--sparsity", type=float, default=d.sparsity,
                   help="share removed from the targeted layers, in [0, 1); N:M needs N/M; structured: share of heads "
                        f"and FFN neurons per block (slimdiff: of their parameters) (default: {d.sparsity})")
    g.add_argument("--head-sparsity", type=float, default=None, metavar="S",
                   help="structured: the share of each block's attention heads to remove (default: --sparsity)")
    g.add_argument("--neuron-sparsity", type=float, default=None, metavar="S",
                   help="structured: the share of each block's FFN neurons to remove (default: --sparsity)")
    g.add_argument("--param-budget", type=float, default=None, metavar="B",
                   help="structured: remove this share of the targeted layers' parameters (weights and biases), in [0, 1), "
                        "whatever the method, so methods can be asked for the same size (uniform: heads at "
                        "--head-sparsity or B per block, FFN neurons make up the rest; global: see --allocation)")
    g.add_argument("--head-saliency", default=d.head_saliency,
                   help=f"structured OBS head cost: exact or diag (default: {d.head_saliency})")
    g.add_argument("--allocation", default=d.allocation,
                   help="uniform: every layer (structured: every block) gives the same share; global: the budget goes "
                        "where removing costs least by OBS relative to each layer's output — unstructured: per-layer "
                        "sparsities; structured: every head and neuron ranked by cost per parameter saved, each package "
                        "meeting --param-budget (else --sparsity) of its parameters (default: the method's own; "
                        "slimdiff: global, the others: uniform)")
    g.add_argument("--refit", action="store_true",
                   help="after the solve, refit the kept weights to the least-squares optimum on the fixed mask "
                        "(masked conjugate gradients, --refit-iterations of them); unstructured and N:M, methods with a "
                        "Hessian")
    g.add_argument("--refit-iterations", type=int, default=None, metavar="N",
                   help=f"conjugate-gradient iterations of --refit (default: {REFIT_DEFAULT})")
    g.add_argument("--solver-dtype", default=d.solver_dtype, choices=("float32", "float64"),
                   help=f"OBS solver precision; float64 is used per layer where float32 fails (default: {d.solver_dtype})")
    c = p.add_argument_group("calibration")
    x = c.add_mutually_exclusive_group()
    x.add_argument("--num-prompts", type=int,
                   help=f"the first N of the embedded model's training prompts (default: {DEFAULT_NUM_PROMPTS}; other "
                        "models need --prompts)")
    x.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (UTF-8)")
    c.add_argument("--steps", type=int, help="sampling steps per calibration run (default: the model's own, else 25)")
    c.add_argument("--guidance", type=float, help="CFG scale of calibration runs (default: the model's own, else 7.0)")
    c.add_argument("--weighting", default=None,
                   help=f"timestep weights, one of: {', '.join(SCHEMES)}; sensitivity measures them with a short probe "
                        f"before the first package (default: {d.weighting})")
    c.add_argument("--alpha-ratio", type=float, default=None, metavar="R",
                   help="strength of the weighting: alpha at the scheme's strong end / alpha at its weak end, in 1e-06 "
                        f"to 1e+06; below 1 reverses it (default: {d.alpha_max / d.alpha_min:g}, the paper's 1.2 / 0.8)")
    c.add_argument("--packages", type=int, default=None,
                   help=f"K module packages, each calibrated through the already-pruned model (default: {d.packages})")
    c.add_argument("--calibration", default=None, choices=CALIBRATIONS,
                   help="resample: full sampling through the partly pruned model for every package (the paper's); "
                        "propagate: dense sampling once, then each package replays the recorded inputs through its "
                        f"own blocks only, so the cost barely grows with --packages (default: {d.calibration})")
    c.add_argument("--record-ram-mb", type=float, default=None, metavar="MIB",
                   help="propagate: RAM the recorded block inputs may take before they go to disk beside --out "
                        "(default: half of the free memory)")
    c.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="a seeded random subset of N tokens per image and step goes into the Hessians (the rest are "
                        "skipped: the accumulation, which dominates at 1024x1024, costs N / tokens of the full one; see "
                        "results/scale.md for the error it adds) (default: all)")
    c.add_argument("--seed", type=int, default=d.seed,
                   help=f"calibration seed; prompt i's noise comes from it and i (default: {d.seed})")
    c.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"prompts per calibration (or training) batch (default: {d.batch_size})")
    c.add_argument("--report-error", action="store_true",
                   help="calibration-free methods (magnitude, l1-norm) calibrate anyway to report each layer's error")
    t = p.add_argument_group("training (gradient-flow)")
    t.add_argument("--iterations", type=int, default=None, help=f"training iterations (default: {d.iterations})")
    t.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default: {d.lr:g})")
    t.add_argument("--train-data", metavar="DIR", default=None,
                   help="images + metadata.jsonl (file_name, text) (default: the embedded model's shapes world)")
    t.add_argument("--gradient-criterion", choices=("raise", "lower"), default=d.gradient_criterion,
                   help="prune the groups whose removal raises (the paper's rule) or lowers the gradient norm "
                        f"(default: {d.gradient_criterion})")
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


REFIT_DEFAULT = 20  # CG iterations of --refit without a number
DEFAULT_NUM_PROMPTS = 100  # the embedded model's calibration set without --num-prompts
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cli_prune(a) -> None:
    """``obslib prune``: every flag and path is checked before the model is loaded, then prune and save.
    Notes for flags the method ignores come only once the command is known to be valid."""
    d = PruneConfig()  # the library's defaults for the flags left out
    if a.dtype not in DTYPES:
        raise UsageError(f"--dtype {a.dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    if a.calib_tokens is not None and a.calib_tokens < 1:
        raise UsageError(f"--calib-tokens {a.calib_tokens}: must be a positive number of tokens per image and step "
                         "(allowed: 1 or more; leave it out for all tokens)")
    if a.num_prompts is not None and a.num_prompts < 1:
        raise UsageError(f"--num-prompts {a.num_prompts} must be >= 1")
    for flag, v in (("--checkpoint-dir", a.checkpoint_dir), ("--prompts", a.prompts), ("--train-data", a.train_data),
                    ("--out", a.out), ("MODEL_DIR", a.model_dir)):
        if v is not None and not v.strip():
            raise UsageError(f"{flag} {v!r}: expected a path (an empty one names no file)")
    if a.refit_iterations is not None and a.refit_iterations < 1:
        raise UsageError(f"--refit-iterations {a.refit_iterations}: must be at least 1 (allowed: 1 to 100000)")
    refit = (a.refit_iterations or REFIT_DEFAULT) if a.refit else 0
    real = os.path.realpath(a.out) if isinstance(a.out, str) and a.out.strip() else None
    ckdir = a.checkpoint_dir or (real and os.path.join(os.path.dirname(real), f".obslib-ckpt-{os.path.basename(real)}"))
    extra_cfg = {}
    if a.iterations is not None:
        extra_cfg["iterations"] = a.iterations
    if a.lr is not None:
        extra_cfg["lr"] = a.lr
    if a.alpha_ratio is not None:
        extra_cfg["alpha_min"], extra_cfg["alpha_max"] = alpha_range(a.alpha_ratio)
    cfg = PruneConfig(method=a.method, pattern=a.pattern, sparsity=a.sparsity, weighting=a.weighting or d.weighting,
                      train_data=a.train_data, checkpoint_dir=ckdir, resume=a.resume, **extra_cfg,
                      gradient_criterion=a.gradient_criterion,
                      packages=d.packages if a.packages is None else a.packages, steps=a.steps, guidance=a.guidance, seed=a.seed, batch_size=a.batch_size,
                      block_range=tuple(a.block_range) if a.block_range else None, head_saliency=a.head_saliency,
                      solver_dtype=a.solver_dtype, calibration=a.calibration or d.calibration,
                      record_ram_mb=a.record_ram_mb, progress=not a.quiet, restore_on_failure=False,
                      measure_error=a.report_error, refit_iterations=refit, allocation=a.allocation, head_sparsity=a.head_sparsity,
                      neuron_sparsity=a.neuron_sparsity, param_budget=a.param_budget,
                      calib_tokens=a.calib_tokens).validate()  # every flag, before any path is looked at
    meth = METHODS[a.method]
    check_pipeline_dir(a.model_dir)
    check_device(a.device)
    world = _world()
    rank0 = world <= 1 or int(os.environ.get("RANK", "0") or 0) == 0
    # the paths' relations first (no lock file is ever put inside the model or --out), then the locks, then the rest
    check_output_dir(a.out, [a.model_dir], a.overwrite, clean=False, verify_existing=False, note=None)
    if ckdir and meth.checkpoint_kind is not None:
        CheckpointDir(ckdir, meth.checkpoint_kind).check_place(protect=[a.model_dir], out=a.out)
    with contextlib.ExitStack() as locks:
        if rank0:  # one run per --out and checkpoint directory (rank 0 writes them under torchrun)
            locks.enter_context(owned.RunLock(a.out, "--out"))
            if ckdir and meth.checkpoint_kind is not None:
                locks.enter_context(owned.RunLock(ckdir, "--checkpoint-dir"))
        _prune_locked(a, cfg, meth, ckdir, world, rank0, quiet_notes=a.quiet or not rank0)


def _prune_locked(a, cfg, meth, ckdir, world: int, rank0: bool, quiet_notes: bool) -> None:
    """The rest of ``obslib prune`` once this process owns --out and the checkpoint directory."""
    from . import distributed

    # everything about --out and the checkpoints is settled before the (long) work starts
    check_output_dir(a.out, [a.model_dir], a.overwrite, need_bytes=tree_bytes(a.model_dir),
                     note=None if quiet_notes else say_note, clean=rank0, verify_existing=rank0)
    training = meth.trains
    if training:
        if a.train_data is not None:
            from .gradflow import ImageFolder

            ImageFolder(a.train_data, 1, 1, 0)  # a folder that cannot be read is refused now, not after loading
    else:
        cfg = cfg.with_prompts(read_prompt_file(a.prompts) if a.prompts is not None
                               else default_calibration_prompts(a.model_dir, a.num_prompts or DEFAULT_NUM_PROMPTS))
    if world > 1 and not training and meth.needs_calibration and len(cfg.prompts) < world:
        raise UsageError(f"torchrun started {world} processes but there are only {len(cfg.prompts)} calibration prompts; "
                         f"every process samples at least one (allowed: 1 to {len(cfg.prompts)} processes, or more "
                         "prompts)")
    kind = meth.checkpoint_kind
    command = "obslib " + shlex.join(getattr(a, "argv", None) or sys.argv[1:])
    resume_cmd = command if a.resume else f"{command} --resume"
    ck = None
    if kind is not None:
        ck = CheckpointDir(ckdir, kind, fingerprint=config_fingerprint(cfg))
        ck.check(protect=[a.model_dir], out=a.out)
        if kind == "packages":
            PackageCheckpoint(ckdir, config_fingerprint(cfg)).check_config(a.resume, command)
        elif ck.entries() and not a.resume:
            raise UsageError(f"{ckdir!r} holds the checkpoint of an interrupted run; continue it: {resume_cmd}; "
                             "or delete that directory to start over")
    if not quiet_notes:  # the command is valid: now say what it ignores
        notes = []
        for flag, field_ in (("--packages", "packages"), ("--calibration", "calibration")):
            if getattr(a, field_) is not None and meth.ignored(field_):
                notes.append(f"{flag} is ignored by {a.method} (one calibration pass, one global allocation)")
        if a.weighting is not None or a.alpha_ratio is not None:
            flags = " / ".join(f for f, v in (("--weighting", a.weighting), ("--alpha-ratio", a.alpha_ratio))
                               if v is not None)
            why = meth.why_weighting_ignored()
            if why:
                notes.append(f"{flags} is ignored by {a.method} ({why})")
            elif a.alpha_ratio is not None and cfg.weighting in ("uniform", "sensitivity"):
                notes.append(f"--alpha-ratio is ignored with --weighting {cfg.weighting} ("
                             + ("every step weighs the same)" if cfg.weighting == "uniform"
                                else "the probe measures the weights)"))
        calibrates = meth.calibrates(a.report_error)
        if a.calib_tokens is not None and not calibrates:
            notes.append(f"--calib-tokens is ignored: {a.method} needs no calibration (add --report-error to calibrate "
                         "for the layer errors)")
        if a.refit_iterations is not None and not a.refit:
            notes.append("--refit-iterations is ignored without --refit")
        given = [f for f, v in (("--iterations", a.iterations), ("--lr", a.lr), ("--train-data", a.train_data))
                 if v is not None]
        if given and not training:
            notes.append(f"{', '.join(given)} only apply to methods that train (gradient-flow); ignored")
        if a.calibration == "propagate" and not calibrates and not meth.ignored("calibration"):
            notes.append(f"--calibration propagate is ignored: {a.method} needs no calibration (add --report-error "
                         "to calibrate for the layer errors)")
        if a.record_ram_mb is not None and (cfg.calibration != "propagate" or not calibrates
                                            or meth.ignored("calibration")):
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
    saved_before = len(ck.entries()) if ck is not None else 0
    with _checkpoint_said(ck, saved_before, resume_cmd, a.out, rank0):
        pipe = load_pipeline(a.model_dir, device=distributed.rank_device(a.device), dtype=DTYPES[a.dtype],
                             progress=a.verbose and rank0)
        t_load = time.perf_counter() - t0
        report = prune(pipe, cfg)
        if not rank0:
            return
        t = time.perf_counter()
        report["command"] = command  # the model card quotes it
        save_pruned(pipe, report, a.out, a.model_dir, overwrite=a.overwrite, flag="--out", notes=False)
        t_save = time.perf_counter() - t
        if ck is not None:
            ck.remove()  # the run is complete: its checkpoints (obslib's files only) are no longer needed
        if not a.quiet:
            print(closing_line(a.out, report, pipe, t_load, t_save, time.perf_counter() - t0))


@contextlib.contextmanager
def _checkpoint_said(ck, saved_before: int, resume_cmd: str, out: str, rank0: bool = True):
    """However the run ends before its output is complete (an error, Ctrl-C, SIGTERM, a full disk), the one line
    it ends with says where the checkpoint is and the command that continues it; with no checkpoint, that
    nothing was written. Under torchrun rank 0 says it (the other ranks write nothing)."""
    from .io import COMPLETED

    COMPLETED.discard(os.path.realpath(out))  # an earlier run in this process to the same --out is not this one
    try:
        yield
    except BaseException as e:
        if isinstance(e, (SystemExit, GeneratorExit)) or not rank0:
            if isinstance(e, KeyboardInterrupt):
                e.said = True
            raise
        if os.path.realpath(out) in COMPLETED:  # interrupted just after the swap: the output is complete
            if ck is not None:
                ck.remove()
            if isinstance(e, KeyboardInterrupt):
                e.said = True
                print(f"obslib: {_stopped(e)} after {out} was written (it is complete)", file=sys.stderr)
            raise
        n = len(ck.entries()) if ck is not None else 0
        if n == 0 and ck is not None:
            ck.remove_if_empty()
        same_again = isinstance(e, UsageError) and ("diverged" in str(e) or "the pruned weights of" in str(e))
        if n == 0:
            where = "nothing was written"
        elif same_again:
            where = (f"the checkpoint in {ck.path} holds these settings' steps, which would give the same result; "
                     "delete that directory before running with other settings")
        else:
            where = f"{n} finished step(s) are checkpointed in {ck.path}; continue with: {resume_cmd}"
        if isinstance(e, (UsageError, SolverError)):
            if n == 0 or (n == saved_before and not same_again and "no space left" not in str(e)):
                raise
            raise type(e)(f"{e} ({where})") from None
        if isinstance(e, KeyboardInterrupt):
            e.said = True
            print(f"obslib: {_stopped(e)}; {where}", file=sys.stderr)
            raise
        if owned.is_disk_full(e):
            path = getattr(e, "filename", None) or (ck.path if ck is not None else "the output")
            raise UsageError(f"{owned.disk_full(path)} ({where})") from None
        if n:
            print(f"obslib: {where}", file=sys.stderr)
        raise


def _stopped(e) -> str:
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


def _world() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


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
    fl = report.get("flops_per_image") or {}
    if fl.get("pruned"):
        what += f"; denoiser FLOPs per image {fl['pruned'] / 1e9:.3g} G ({fl['ratio']:.1%} of dense)"
    return (f"wrote {out}: {what}; {wall:.1f} s wall (load {t_load:.1f} s, prune {report['timings']['total_s']:.1f} s, "
            f"save {t_save:.1f} s)")


def _shown_on_this_rank(e) -> bool:
    """Under torchrun an error every rank meets alike (the checks before the work, ranks that disagree) is printed
    by rank 0 alone, so the refusal reads as one line; one rank's own failure is printed by that rank."""
    if _world() <= 1 or int(os.environ.get("RANK", "0") or 0) == 0:
        return True
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):  # a check before the work: every rank meets it alike
        time.sleep(1.0)  # let rank 0 print its line before torchrun, seeing this rank exit, stops the others
        return False
    return not getattr(e, "same_on_every_rank", False)  # (inside a process group no rank may linger)


def _on_sigterm(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _precheck(argv: list[str]) -> None:
    """Mistakes argparse would report without the value: ``--refit 30`` (a plain switch now), and a value that
    starts with '-' (``--pruned-steps -1-2``), which argparse takes for an option."""
    for i, tok in enumerate(argv[:-1]):
        nxt = argv[i + 1]
        if tok == "--refit" and re.fullmatch(r"[-+]?\d+", nxt):
            raise UsageError(f"--refit takes no value (got {nxt!r}); give the iterations as --refit-iterations {nxt}")
    for i, tok in enumerate(argv[:-1]):
        nxt = argv[i + 1]
        if tok in VALUE_FLAGS and nxt.startswith("-") and len(nxt) > 1 and not re.fullmatch(
                r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-(inf|infinity|nan)", nxt, re.IGNORECASE) \
                and not nxt.startswith("--"):
            raise UsageError(f"{tok} {nxt!r}: a value that starts with '-' is read as an option; write {tok}={nxt}")


VALUE_FLAGS = ("--pruned-steps", "--prompts", "--out", "--checkpoint-dir", "--train-data", "--reference",
               "--real-images", "--clip-model")


def main(argv=None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    prev, installed = signal.getsignal(signal.SIGTERM), False
    try:  # SIGTERM (a scheduler, timeout) ends the run the way Ctrl-C does: checkpoint kept, one line
        signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    except ValueError:  # not the main thread
        pass
    try:
        _precheck(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # the command as typed: an interrupted run's closing line repeats it with --resume
        args.func(args)
    except (UsageError, SolverError) as e:
        if _shown_on_this_rank(e):
            print(f"obslib: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated): one line, unless the run said it already
        said = getattr(e, "said", False) or getattr(e.__context__, "said", False)
        if not said and argv[:1] == ["prune"] and (_world() <= 1 or int(os.environ.get("RANK", "0") or 0) == 0):
            print(f"obslib: {_stopped(e)}; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
