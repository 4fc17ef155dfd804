"""``PruneConfig``: every setting of a prune, checked in one place.

Each field's kind (and whether it may be None, and whether it changes the result) is in its dataclass
metadata: the single list of fields that the type check, the checkpoint fingerprint and the report use; the
command line takes its defaults from the same dataclass.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace

from .errors import UsageError
from .seeds import SEEDING_VERSION
from .weighting import SCHEMES

MAX_STEPS = 10_000  # sampling steps of a run: 1..MAX_STEPS (config, the model defaults, obslib evaluate)

PATTERNS = ("unstructured", "2:4", "4:8", "structured")
CALIBRATIONS = ("resample", "propagate")
MAX_SEED = 2**63 - 2**32  # seeds are hashed with each prompt's number (obslib.seeds.prompt_seed)
MAX_RECORD_MIB = 2**40


@dataclass(frozen=True)
class Interval:
    """The allowed values of a number, written once and used by every check and help text that needs it:
    ``lo``..``hi`` (None: unbounded), each end closed unless ``lo_open`` / ``hi_open``; ``shown`` prints it where the
    numbers are unwieldy."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    shown: str | None = None

    def __contains__(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.shown:
            return self.shown
        lo = "(-∞" if self.lo is None else f"{'(' if self.lo_open else '['}{shown(self.lo)}"
        hi = "∞)" if self.hi is None else f"{shown(self.hi)}{')' if self.hi_open else ']'}"
        return f"{lo}, {hi}"

    def check(self, name: str, v) -> None:
        """Raise ``UsageError`` naming ``name``, the value and this interval when ``v`` lies outside it."""
        if v not in self:
            raise UsageError(f"{name} {shown(v)} is outside {self}")


def shown(v) -> str:
    """A number as a message states it: integers whole, floats as typed unless very large or small."""
    if isinstance(v, float) and v != 0 and not 1e-4 <= abs(v) < 1e6:
        return f"{v:.6g}"
    return str(v)


SHARE = Interval(0, 1, hi_open=True)  # a share removed: sparsities, budgets
STEPS = Interval(1, MAX_STEPS)  # sampling steps of a run (config, the model defaults, obslib evaluate)
GUIDANCE = Interval(0, 1000)  # a CFG scale
SEEDS = Interval(0, MAX_SEED, hi_open=True, shown="[0, 2**63 - 2**32)")
ALPHA = Interval(1e-6, 1e6)  # a timestep weight, and the ratio of the largest to the smallest
POSITIVE = Interval(1)  # counts: at least one
# typed keys of PruneConfig.extra (method-private settings kept there so that reports and fingerprints stay as they
# were): key -> (kind, bounds)
EXTRA = {"dsnot_cycles": ("int", Interval(1, 10_000))}


def option_flag(f) -> str | None:
    """The command-line flag of a PruneConfig field (None: it has none of its own)."""
    flag = f.metadata["flag"]
    return None if flag is None else flag or "--" + f.name.replace("_", "-")


def option_choices(f) -> tuple | None:
    c = f.metadata["choices"]
    return tuple(c()) if callable(c) else c


KIND_WORDS = {"real": "a finite number", "int": "an integer", "str": "a string", "bool": "True or False",
              "dict": "a dict", "str-list": "a list of strings", "int-list": "a list of integers",
              "real-list": "a list of finite numbers"}


def is_kind(kind: str, v) -> bool:
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
    return isinstance(v, (list, tuple)) and all(is_kind(item, x) for x in v)


def _plain(kind: str, v):
    """numpy / torch scalars and tuples as the plain Python values the report's JSON needs."""
    if kind in ("int", "real"):
        return int(v) if kind == "int" else float(v)
    if kind.endswith("-list"):
        return [_plain(kind.split("-")[0], x) if kind != "str-list" else x for x in v]
    return v



def _plain_fields(cfg) -> dict:
    """Every field type-checked, as the plain values the report's JSON needs; raises on the first bad one."""
    out = {}
    for f in fields(cfg):
        kind, nullable = f.metadata["kind"], f.metadata["nullable"]
        v = getattr(cfg, f.name)
        if v is None and nullable:
            out[f.name] = None
            continue
        if not is_kind(kind, v):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise UsageError(f"{f.name}={shown} ({type(v).__name__}): expected {KIND_WORDS[kind]}"
                             + (" or None" if nullable else ""))
        out[f.name] = _plain(kind, v)
    return out


def fingerprint_fields() -> tuple[str, ...]:
    """The fields that change a prune's result (a resumed run must match them all)."""
    return tuple(f.name for f in fields(PruneConfig) if f.metadata["fingerprint"])


def _methods():
    from .methods import METHODS

    return METHODS


def _allocations():
    from .methods.base import ALLOCATIONS

    return ALLOCATIONS


def _opt(default, kind: str, nullable: bool = False, fingerprint: bool = True, *, help: str = "",
         bounds: Interval | None = None, choices=None, flag: str | None = "", metavar=None,
         default_help: str | None = None, group: str = "method"):
    """A field whose metadata is the one description of its setting, read by the type and range checks, the
    checkpoint fingerprint, the report and the command line (``obslib.cli``); mutable defaults through a factory.

    * ``kind`` (see KIND_WORDS), whether None is allowed, whether it changes the result (and so belongs to a
      checkpoint's fingerprint; the others are run control);
    * ``bounds`` (an ``Interval``) and ``choices`` (a tuple, or a function returning one, for registries filled
      later), checked by ``PruneConfig.validate``;
    * for the command line: ``help``, ``flag`` ("" = ``--`` + the name with dashes; None = no flag of its own: set
      through another flag or from Python only), ``metavar``, ``default_help`` (how the help states a default that
      is not a plain value), ``group`` (where the help lists it). Settings only one method reads are grouped by that
      method instead (``Method.options``)."""
    md = {"kind": kind, "nullable": nullable, "fingerprint": fingerprint, "help": help, "bounds": bounds,
          "choices": choices, "flag": flag, "metavar": metavar, "default_help": default_help, "group": group}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class PruneConfig:
    """Every setting of a prune. Each field's metadata (``_opt``) is its one description: kind, bounds, choices,
    whether it changes the result, and its command-line flag and help (``obslib prune`` is generated from it)."""

    method: str = _opt("obs-diff", "str", choices=_methods, help="the pruning method")
    pattern: str = _opt("unstructured", "str", choices=PATTERNS,
                        help="sparsity pattern; slimdiff and gradient-flow need structured")
    sparsity: float = _opt(0.5, "real", bounds=SHARE,
                           help="share removed from the targeted layers; N:M needs N/M; structured: share of heads and "
                                "FFN neurons per block (slimdiff: of their parameters)")
    # structured: the share of heads / of FFN neurons removed per block (None: ``sparsity``)
    head_sparsity: float | None = _opt(None, "real", True, bounds=SHARE, metavar="S", group="structured",
                                       default_help="--sparsity",
                                       help="structured: the share of each block's attention heads to remove")
    neuron_sparsity: float | None = _opt(None, "real", True, bounds=SHARE, metavar="S", group="structured",
                                         default_help="--sparsity",
                                         help="structured: the share of each block's FFN neurons to remove")
    weighting: str = _opt("log-decrease", "str", choices=SCHEMES, group="weighting",
                          help="timestep weights; sensitivity measures them with a short probe before the first package")
    alpha_min: float = _opt(0.8, "real", bounds=ALPHA, flag=None, group="weighting")  # set by --alpha-ratio
    alpha_max: float = _opt(1.2, "real", bounds=ALPHA, flag=None, group="weighting")
    # weighting "sensitivity": its probe samples the first N calibration prompts with an error injected in each of
    # W windows of steps (obslib.sensitivity)
    sensitivity_prompts: int = _opt(4, "int", bounds=Interval(1, 10_000), metavar="N", group="weighting",
                                    help="--weighting sensitivity: the probe samples the first N calibration prompts")
    sensitivity_windows: int = _opt(10, "int", bounds=Interval(1, 10_000), metavar="W", group="weighting",
                                    help="--weighting sensitivity: an error is injected in each of W windows of steps")
    packages: int = _opt(4, "int", bounds=POSITIVE, metavar="K", group="calibration",
                         help="K module packages, each calibrated through the already-pruned model")
    # resample: full sampling per package (the paper's); propagate: sample once
    calibration: str = _opt("resample", "str", choices=CALIBRATIONS, group="calibration",
                            help="resample: full sampling through the partly pruned model for every package (the "
                                 "paper's); propagate: dense sampling once, then each package replays the recorded inputs "
                                 "through its own blocks only, so the cost barely grows with --packages")
    # propagate: RAM for the recorded block inputs (None: half of what is free)
    record_ram_mb: float | None = _opt(None, "real", True, False, bounds=Interval(0, MAX_RECORD_MIB, shown="[0, 2**40]"),
                                       metavar="MIB", group="calibration", default_help="half of the free memory",
                                       help="propagate: RAM the recorded block inputs may take before they go to disk "
                                            "beside --out")
    prompts: list[str] | None = _opt(None, "str-list", True, False, flag=None)  # --prompts FILE / --num-prompts N
    # default: the model's sampling default
    steps: int | None = _opt(None, "int", True, bounds=STEPS, group="calibration", default_help="the model's own, else 25",
                             help="sampling steps per calibration run")
    guidance: float | None = _opt(None, "real", True, bounds=GUIDANCE, group="calibration",
                                  default_help="the model's own, else 7.0", help="CFG scale of calibration runs")
    seed: int = _opt(0, "int", bounds=SEEDS, group="calibration",
                     help="calibration seed; prompt i's noise comes from it and i")
    batch_size: int = _opt(16, "int", bounds=POSITIVE, group="calibration",
                           help="prompts per calibration (or training) batch")
    blocksize: int = _opt(128, "int", bounds=POSITIVE, group="solver",
                          help="OBS: columns solved per block (N:M needs a multiple of M)")
    percdamp: float = _opt(0.01, "real", bounds=Interval(0, 10), group="solver",
                           help="OBS: damping added to the Hessian's diagonal, as a share of the mean of its live entries")
    # after the solve, refit the kept weights on the fixed mask with this many masked CG iterations (0: off;
    # unstructured and N:M, methods with a Hessian: obslib.refit)
    refit_iterations: int = _opt(0, "int", bounds=Interval(0, 100_000), flag=None, group="solver")  # --refit [--refit-iterations]
    calib_tokens: int | None = _opt(None, "int", True, bounds=POSITIVE, metavar="N", group="calibration",
                                    default_help="all",
                                    help="a seeded random subset of N tokens per image and step goes into the Hessians "
                                         "(the rest are skipped: the accumulation, which dominates at 1024x1024, costs "
                                         "N / tokens of the full one; see results/scale.md for the error it adds)")
    # structured: the share of the targeted layers' parameters (weights and biases) to remove; every structured
    # method meets it (None: heads and neurons at ``sparsity``; slimdiff: ``sparsity`` is its parameter budget)
    param_budget: float | None = _opt(None, "real", True, bounds=SHARE, metavar="B", group="structured",
                                      default_help="heads and neurons at --sparsity",
                                      help="structured: remove this share of the targeted layers' parameters (weights "
                                           "and biases) whatever the method, so methods can be asked for the same size "
                                           "(uniform: heads at --head-sparsity or B per block, FFN neurons make up the "
                                           "rest; global: see --allocation)")
    # uniform: every layer (structured: every block) gives the same share; global: the budget goes where OBS says
    # removing costs least (obslib.allocation); None: the method's own (slimdiff: global, the others: uniform)
    allocation: str | None = _opt(None, "str", True, choices=_allocations,
                                  default_help="the method's own; slimdiff: global, the others: uniform",
                                  help="uniform: every layer (structured: every block) gives the same share; global: the "
                                       "budget goes where removing costs least by OBS relative to each layer's output — "
                                       "unstructured: per-layer sparsities; structured: every head and neuron ranked by "
                                       "cost per parameter saved, each package meeting --param-budget (else --sparsity) "
                                       "of its parameters")
    # structured: a share removed per unit (heads: "block.attn", neurons: the down projection's name), overriding
    # every other setting for the units it names (e.g. another method's allocation: obslib.allocation)
    unit_sparsity: dict | None = _opt(None, "dict", True, flag=None)
    # OBS solver precision; float64 is used per layer where float32 fails
    solver_dtype: str = _opt("float32", "str", choices=("float32", "float64"), group="solver",
                             help="OBS solver precision; float64 is used per layer where float32 fails")
    # [start, end) block indices; default all
    block_range: tuple[int, int] | None = _opt(None, "int-list", True, metavar=("START", "END"), group="model",
                                               default_help="every block", help="prune blocks START..END-1 only")
    # one ratio per block (overrides sparsity)
    block_sparsity: list[float] | None = _opt(None, "real-list", True, flag=None)
    # structured only (the paper skips the first and last block)
    exclude_first_last: bool = _opt(True, "bool", flag=None)
    # or "diag" (the public code's approximation)
    head_saliency: str = _opt("exact", "str", choices=("exact", "diag"),
                              help="structured OBS head cost: exact, or diag (the public code's approximation)")
    neuron_batch: int = _opt(16, "int", bounds=POSITIVE, help="structured OBS: FFN neurons removed per solve")
    # count the denoiser's FLOPs per image before and after (obslib.flops; one extra denoiser call each)
    count_flops: bool = _opt(True, "bool", fingerprint=False, flag=None)
    # calibrate even for calibration-free methods, to report rel_error
    measure_error: bool = _opt(True, "bool", fingerprint=False, flag=None)  # --report-error
    progress: bool = _opt(True, "bool", fingerprint=False, flag=None)  # --quiet
    # keep the targeted layers' originals so a failed prune changes nothing
    restore_on_failure: bool = _opt(True, "bool", fingerprint=False, flag=None)
    # methods that train (gradient-flow): iterations, learning rate, data, resumable checkpoints
    iterations: int = _opt(100, "int", bounds=Interval(1, 10_000_000), help="training iterations")
    lr: float = _opt(1e-5, "real", bounds=Interval(0, 1, lo_open=True), help="AdamW learning rate")
    # a folder of images + metadata.jsonl (diffusers text-to-image convention)
    train_data: str | None = _opt(None, "str", True, metavar="DIR", default_help="the embedded model's shapes world",
                                  help="images + metadata.jsonl (file_name, text)")
    # resumable runs: a checkpoint after each package / 25 training iterations
    checkpoint_dir: str | None = _opt(None, "str", True, False, metavar="DIR", group="output",
                                      default_help=".obslib-ckpt-OUT beside --out; removed after success",
                                      help="checkpoints after each package / 25 training iterations")
    resume: bool = _opt(False, "bool", fingerprint=False, group="output",
                        help="continue an interrupted run from its last checkpoint")
    # gradient-flow: prune what raises ("raise", the paper's) or lowers the grad norm
    gradient_criterion: str = _opt("raise", "str", choices=("raise", "lower"),
                                   help="prune the groups whose removal raises (the paper's rule) or lowers the "
                                        "gradient norm")
    # typed keys: EXTRA (dsnot_cycles); other keys travel untouched
    extra: dict = _opt({}, "dict", flag=None)

    @property
    def nm(self) -> tuple[int, int]:
        if self.pattern in ("2:4", "4:8"):
            n, m = map(int, self.pattern.split(":"))
            return n, m
        return 0, 0

    @property
    def allocation_used(self) -> str:
        """``allocation``, or the method's own when it is None."""
        from .methods import METHODS

        return self.allocation or METHODS[self.method].allocation

    def group_sparsity(self, kind: str, base: float) -> float:
        """The share removed from a structured unit of ``kind`` ('heads' or 'neurons'): its own sparsity if set,
        else ``base`` (``sparsity``, or the block's entry of ``block_sparsity``)."""
        own = {"heads": self.head_sparsity, "neurons": self.neuron_sparsity}.get(kind)
        return base if own is None else own

    @property
    def seeding(self) -> str:
        """How calibration noise is seeded (``SEEDING_VERSION``): part of a checkpoint's fingerprint."""
        return SEEDING_VERSION

    def validate(self) -> "PruneConfig":
        """Check every field's type and range; raises ``UsageError`` (a ValueError) naming the bad value.
        Returns a checked copy (numpy scalars as plain numbers, tuples as lists); ``self`` is never changed."""
        cfg = replace(self, **_plain_fields(self))
        cfg._check_ranges()
        cfg._validated = True
        return cfg

    def with_prompts(self, prompts: list[str]) -> "PruneConfig":
        """A checked copy with these calibration prompts (only they are checked again)."""
        cfg = replace(self, prompts=list(prompts))
        checked = replace(PruneConfig(), prompts=cfg.prompts)
        _plain_fields(checked)
        checked._check_prompts()
        cfg._validated = getattr(self, "_validated", False)
        return cfg

    def _check_prompts(self) -> None:
        if self.prompts is not None:
            if len(self.prompts) == 0:
                raise UsageError("the calibration prompt list is empty")
            if any(not p.strip() for p in self.prompts):
                raise UsageError("the calibration prompt list holds an empty prompt")

    def _check_ranges(self) -> None:
        from .methods import METHODS

        for f in fields(self):  # every bound and choice, from the fields' metadata
            v = getattr(self, f.name)
            if v is None:
                continue
            name = option_flag(f) or f.name
            choices = option_choices(f)
            if choices is not None and v not in choices:
                raise UsageError(f"{name} {v!r} is unknown; allowed: {', '.join(choices)}")
            if f.metadata["bounds"] is not None:
                f.metadata["bounds"].check(name, v)
        for key, (kind, bounds) in EXTRA.items():
            if key in self.extra:
                v = self.extra[key]
                if not is_kind(kind, v):
                    raise UsageError(f"extra[{key!r}]={v!r}: expected {KIND_WORDS[kind]}")
                bounds.check(f"extra[{key!r}]", v)
        ALPHA.check("alpha_max / alpha_min", self.alpha_max / self.alpha_min)
        for flag, v in (("--head-sparsity", self.head_sparsity), ("--neuron-sparsity", self.neuron_sparsity)):
            if v is None:
                continue
            if self.pattern != "structured":
                raise UsageError(f"{flag} applies to --pattern structured only (got {self.pattern!r})")
            if self.method == "slimdiff":
                raise UsageError(f"{flag}: slimdiff allocates heads and neurons itself from its parameter budget "
                                 "(--sparsity); drop it")
        n, m = self.nm
        if m and abs(self.sparsity - n / m) > 1e-9:
            raise UsageError(f"sparsity {self.sparsity} does not match pattern {self.pattern} (needs {n / m})")
        if m and self.blocksize % m:
            raise UsageError(f"--blocksize {self.blocksize} must be a positive multiple of M={m}")
        self._check_prompts()
        if self.block_range is not None and (len(self.block_range) != 2 or self.block_range[0] >= self.block_range[1]
                                             or self.block_range[0] < 0):
            raise UsageError(f"block range {self.block_range} must be (start, end) with 0 <= start < end")
        if self.block_sparsity is not None and any(s not in SHARE for s in self.block_sparsity):
            raise UsageError(f"block sparsity list {self.block_sparsity} has values outside {SHARE}")
        meth = METHODS[self.method]
        if not meth.supports(self.pattern):
            raise UsageError(f"method {self.method!r} does not support pattern {self.pattern!r}")
        self._check_allocation(meth)
        if self.refit_iterations:
            if self.pattern == "structured":
                raise UsageError("--refit applies to unstructured and N:M patterns (structured OBS already compensates "
                                 "its removed groups in closed form); drop it or choose --pattern unstructured, 2:4 or 4:8")
            if not meth.refits:
                allowed = ", ".join(m.name for m in METHODS.values() if m.refits)
                raise UsageError(f"--refit needs a method that calibrates a Hessian; {self.method!r} has none; "
                                 f"allowed: {allowed}")

    def _check_allocation(self, meth) -> None:
        from .methods import METHODS

        structured = self.pattern == "structured"
        if self.param_budget is not None:
            if not structured:
                raise UsageError(f"--param-budget applies to --pattern structured only (got {self.pattern!r}); "
                                 "use --sparsity")
            if self.neuron_sparsity is not None:
                raise UsageError("--param-budget with --neuron-sparsity: the neurons make up the budget after the heads; "
                                 "drop --neuron-sparsity")
        if self.unit_sparsity is not None:
            if not structured:
                raise UsageError(f"a unit sparsity map applies to --pattern structured only (got {self.pattern!r})")
            bad = [f"{k}={v!r}" for k, v in self.unit_sparsity.items()
                   if not isinstance(k, str) or not is_kind("real", v) or v not in SHARE]
            if bad:
                raise UsageError(f"unit sparsity {bad[0]}: expected a unit name and a share in [0, 1)")
            if meth.whole_model:
                raise UsageError(f"a unit sparsity map is taken by the package driver's methods; {self.method!r} "
                                 "allocates itself")
        if self.allocation_used == "global" and not meth.whole_model:
            if self.pattern in ("2:4", "4:8"):
                raise UsageError(f"--allocation global does not apply to {self.pattern}: every layer must keep exactly "
                                 f"{self.pattern} for the sparse kernels, so there is nothing to move between layers; "
                                 "use --allocation uniform")
            if not meth.solves_hessian:
                allowed = ", ".join(m.name for m in METHODS.values() if m.solves_hessian)
                raise UsageError(f"--allocation global needs a method that calibrates a Hessian; {self.method!r} has "
                                 f"none; allowed: {allowed}, slimdiff")
            if self.block_sparsity is not None or self.unit_sparsity is not None:
                raise UsageError("--allocation global decides each layer's sparsity itself; drop the block / unit "
                                 "sparsity list")
            if self.head_sparsity is not None or self.neuron_sparsity is not None:
                raise UsageError("--allocation global decides how many heads and neurons go; drop --head-sparsity / "
                                 "--neuron-sparsity (set the size with --param-budget)")
        if self.allocation_used == "global" and meth.trains:
            raise UsageError(f"--allocation global needs a method that calibrates a Hessian; {self.method!r} trains "
                             "gates instead; use --allocation uniform")
