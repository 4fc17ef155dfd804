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
from .config import ALPHA, PruneConfig
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


GROUPS = {"model": "model", "method": "method", "structured": "structured (heads and FFN neurons)",
          "weighting": "timestep weighting", "calibration": "calibration", "solver": "solver", "output": "output"}
_TYPES = {"int": int, "real": float, "str": str, "int-list": int}


def add_config_flags(p, groups: dict) -> None:
    """One flag per ``PruneConfig`` field that has one (``config.option_flag``), generated from the field's metadata:
    its kind (type), help, choices and default (stated in the help; the flag's own default is None, so a flag left
    out takes the library's default and the notes can tell a given flag from an omitted one). Bounds and choices
    are checked once, by ``PruneConfig.validate``. A setting only some methods read goes under their names."""
    from dataclasses import MISSING, fields

    from .config import option_choices, option_flag
    from .methods import private_owners

    for f in fields(PruneConfig):
        flag = option_flag(f)
        if flag is None:
            continue
        md = f.metadata
        owners = private_owners(f.name)
        title = f"{', '.join(owners)} only" if owners else GROUPS[md["group"]]
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        kw = {"dest": f.name, "default": None}
        help_ = md["help"]
        choices = option_choices(f)
        if choices:
            help_ += f"; one of: {', '.join(choices)}"
        if not md["fingerprint"]:
            help_ += "; run control: the result does not depend on it"
        if md["kind"] == "bool":
            kw["action"] = "store_true"
        else:
            kw["type"] = _TYPES[md["kind"]]
            if isinstance(md["metavar"], tuple):
                kw["nargs"] = len(md["metavar"])
            if md["metavar"]:
                kw["metavar"] = md["metavar"]
            default = md["default_help"] or (f.default if f.default is not MISSING else None)
            help_ += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
        groups[title].add_argument(flag, help=help_, **kw)


def add_prune_cli(sub) -> None:
    d = PruneConfig()  # the defaults the help states are the library's
    p = sub.add_parser("prune", help="prune a diffusers pipeline directory", epilog=PRUNE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prune the denoiser of a local diffusers pipeline and write a complete pipeline "
                                   "directory with pruning_report.json. Bad input is one line on stderr, exit code 2.")
    groups = {GROUPS[k]: p.add_argument_group(GROUPS[k]) for k in GROUPS}
    m, g, c, o = (groups[GROUPS[k]] for k in ("model", "method", "calibration", "output"))
    # the flags that are not one setting each (a file of prompts, a ratio of two weights, a switch, where it runs)
    m.add_argument("model_dir", help="a local diffusers pipeline directory (safetensors weights)")
    m.add_argument("--device", default="cpu", help="where the pipeline runs: cpu, cuda, cuda:N (default: cpu)")
    m.add_argument("--dtype", default="float32",
                   help="weights' dtype: float32, float16 or bfloat16; Hessians stay float32 (default: float32)")
    g.add_argument("--refit", action="store_true",
                   help="after the solve, refit the kept weights to the least-squares optimum on the fixed mask "
                        "(masked conjugate gradients, --refit-iterations of them); unstructured and N:M, methods with a "
                        "Hessian")
    g.add_argument("--refit-iterations", type=int, default=None, metavar="N",
                   help=f"conjugate-gradient iterations of --refit (default: {REFIT_DEFAULT})")
    x = c.add_mutually_exclusive_group()
    x.add_argument("--num-prompts", type=int,
                   help=f"the first N of the embedded model's training prompts (default: {DEFAULT_NUM_PROMPTS}; other "
                        "models need --prompts)")
    x.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (UTF-8)")
    groups[GROUPS["weighting"]].add_argument(
        "--alpha-ratio", type=float, default=None, metavar="R",
        help=f"strength of the weighting: alpha at the scheme's strong end / alpha at its weak end, in {ALPHA}; below 1 "
             f"reverses it (default: {d.alpha_max / d.alpha_min:g}, the paper's 1.2 / 0.8)")
    c.add_argument("--report-error", action="store_true",
                   help="calibration-free methods (magnitude, l1-norm) calibrate anyway to report each layer's error")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="the new pipeline directory (never the model's, never inside or above it)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier obslib output (never anything else)")
    o.add_argument("--quiet", action="store_true", help="no progress bars, notes or closing line")
    o.add_argument("--verbose", action="store_true", help="show the libraries' own loading bars and warnings")
    add_config_flags(p, groups)
    p.set_defaults(func=_cli_prune)


REFIT_DEFAULT = 20  # CG iterations of --refit without a number
DEFAULT_NUM_PROMPTS = 100  # the embedded model's calibration set without --num-prompts
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cli_prune(a) -> None:
    """``obslib prune``: every flag and path is checked before the model is loaded, then prune and save.
    Notes for flags the method ignores come only once the command is known to be valid."""
    if a.dtype not in DTYPES:
        raise UsageError(f"--dtype {a.dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    if a.num_prompts is not None and a.num_prompts < 1:
        raise UsageError(f"--num-prompts {a.num_prompts} must be >= 1")
    for flag, v in (("--checkpoint-dir", a.checkpoint_dir), ("--prompts", a.prompts), ("--train-data", a.train_data),
                    ("--out", a.out), ("MODEL_DIR", a.model_dir)):
        if v is not None and not v.strip():
            raise UsageError(f"{flag} {v!r}: expected a path (an empty one names no file)")
    if a.refit_iterations is not None and a.refit_iterations < 1:
        raise UsageError(f"--refit-iterations {a.refit_iterations}: must be at least 1 (allowed: 1 to 100000)")
    real = os.path.realpath(a.out) if isinstance(a.out, str) and a.out.strip() else None
    ckdir = a.checkpoint_dir or (real and os.path.join(os.path.dirname(real), f".obslib-ckpt-{os.path.basename(real)}"))
    cfg = config_from_args(a, ckdir).validate()  # every flag, before any path is looked at
    meth = METHODS[cfg.method]
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


def config_from_args(a, checkpoint_dir: str | None) -> PruneConfig:
    """The ``PruneConfig`` of an ``obslib prune`` command line: every generated flag that was given, then the flags
    that set a setting another way (--alpha-ratio, --refit, --report-error, --quiet); prompts come later, once the
    paths are checked."""
    from dataclasses import fields

    from .config import option_flag

    given = {f.name: getattr(a, f.name) for f in fields(PruneConfig)
             if option_flag(f) is not None and getattr(a, f.name) is not None}
    given["checkpoint_dir"] = checkpoint_dir
    if "block_range" in given:
        given["block_range"] = tuple(given["block_range"])
    if a.alpha_ratio is not None:
        given["alpha_min"], given["alpha_max"] = alpha_range(a.alpha_ratio)
    return PruneConfig(**given, refit_iterations=(a.refit_iterations or REFIT_DEFAULT)
                       if a.refit else 0, measure_error=a.report_error, progress=not a.quiet, restore_on_failure=False)


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
        for n in ignored_notes(a, cfg, meth):
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


def ignored_notes(a, cfg, meth) -> list[str]:
    """What a valid ``obslib prune`` command line sets that its method ignores, one note each (and pickle files the
    model directory holds, which obslib never opens)."""
    kind = meth.checkpoint_kind
    notes = []
    for flag, field_ in (("--packages", "packages"), ("--calibration", "calibration")):
        if getattr(a, field_) is not None and meth.ignored(field_):
            notes.append(f"{flag} is ignored by {cfg.method} (one calibration pass, one global allocation)")
    if a.weighting is not None or a.alpha_ratio is not None:
        flags = " / ".join(f for f, v in (("--weighting", a.weighting), ("--alpha-ratio", a.alpha_ratio))
                           if v is not None)
        why = meth.why_weighting_ignored()
        if why:
            notes.append(f"{flags} is ignored by {cfg.method} ({why})")
        elif a.alpha_ratio is not None and cfg.weighting in ("uniform", "sensitivity"):
            notes.append(f"--alpha-ratio is ignored with --weighting {cfg.weighting} ("
                         + ("every step weighs the same)" if cfg.weighting == "uniform"
                            else "the probe measures the weights)"))
    calibrates = meth.calibrates(a.report_error)
    if a.calib_tokens is not None and not calibrates:
        notes.append(f"--calib-tokens is ignored: {cfg.method} needs no calibration (add --report-error to calibrate "
                     "for the layer errors)")
    if a.refit_iterations is not None and not a.refit:
        notes.append("--refit-iterations is ignored without --refit")
    notes += private_notes(a, meth)
    if a.calibration == "propagate" and not calibrates and not meth.ignored("calibration"):
        notes.append(f"--calibration propagate is ignored: {cfg.method} needs no calibration (add --report-error "
                     "to calibrate for the layer errors)")
    if a.record_ram_mb is not None and (cfg.calibration != "propagate" or not calibrates
                                        or meth.ignored("calibration")):
        notes.append("--record-ram-mb only applies to --calibration propagate; ignored")
    if kind is None and (a.checkpoint_dir is not None or a.resume):
        notes.append(f"{cfg.method} runs in one step and writes no checkpoints; --checkpoint-dir / --resume ignored")
    notes += [f"{f} is a pickle file; obslib loads the safetensors beside it and never opens it"
              for f in ignored_pickles(a.model_dir)[:3]]
    return notes


def private_notes(a, meth) -> list[str]:
    """Notes for the given flags of settings private to other methods (``Method.options``)."""
    from dataclasses import fields

    from .config import option_flag
    from .methods import private_owners

    by_owner: dict[str, list[str]] = {}
    for f in fields(PruneConfig):
        flag = option_flag(f)
        if flag is not None and getattr(a, f.name) is not None and meth.ignored(f.name) and private_owners(f.name):
            by_owner.setdefault(", ".join(private_owners(f.name)), []).append(flag)
    return [f"{', '.join(flags)} only appl{'ies' if len(flags) == 1 else 'y'} to {owners}; ignored by {meth.name}"
            for owners, flags in by_owner.items()]


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
