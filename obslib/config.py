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


def _kind(kind: str, nullable: bool = False, fingerprint: bool = True) -> dict:
    """Field metadata: its kind (see KIND_WORDS), whether None is allowed, whether it changes the result (and so
    belongs to a checkpoint's fingerprint)."""
    return {"kind": kind, "nullable": nullable, "fingerprint": fingerprint}


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


@dataclass
class PruneConfig:
    method: str = field(default="obs-diff", metadata=_kind("str"))
    pattern: str = field(default="unstructured", metadata=_kind("str"))
    sparsity: float = field(default=0.5, metadata=_kind("real"))
    # structured: the share of heads / of FFN neurons removed per block (None: ``sparsity``)
    head_sparsity: float | None = field(default=None, metadata=_kind("real", nullable=True))
    neuron_sparsity: float | None = field(default=None, metadata=_kind("real", nullable=True))
    weighting: str = field(default="log-decrease", metadata=_kind("str"))
    alpha_min: float = field(default=0.8, metadata=_kind("real"))
    alpha_max: float = field(default=1.2, metadata=_kind("real"))
    # weighting "sensitivity": its probe samples the first N calibration prompts with an error injected in each of
    # W windows of steps (obslib.sensitivity)
    sensitivity_prompts: int = field(default=4, metadata=_kind("int"))
    sensitivity_windows: int = field(default=10, metadata=_kind("int"))
    packages: int = field(default=4, metadata=_kind("int"))
    # resample: full sampling per package (the paper's); propagate: sample once
    calibration: str = field(default="resample", metadata=_kind("str"))
    # propagate: RAM for the recorded block inputs (None: half of what is free)
    record_ram_mb: float | None = field(default=None, metadata=_kind("real", nullable=True, fingerprint=False))
    prompts: list[str] | None = field(default=None, metadata=_kind("str-list", nullable=True, fingerprint=False))
    # default: the model's sampling default
    steps: int | None = field(default=None, metadata=_kind("int", nullable=True))
    guidance: float | None = field(default=None, metadata=_kind("real", nullable=True))
    seed: int = field(default=0, metadata=_kind("int"))
    batch_size: int = field(default=16, metadata=_kind("int"))
    blocksize: int = field(default=128, metadata=_kind("int"))
    percdamp: float = field(default=0.01, metadata=_kind("real"))
    # after the solve, refit the kept weights on the fixed mask with this many masked CG iterations (0: off;
    # unstructured and N:M, methods with a Hessian: obslib.refit)
    refit_iterations: int = field(default=0, metadata=_kind("int"))
    calib_tokens: int | None = field(default=None, metadata=_kind("int", nullable=True))
    # structured: the share of the targeted layers' parameters (weights and biases) to remove; every structured
    # method meets it (None: heads and neurons at ``sparsity``; slimdiff: ``sparsity`` is its parameter budget)
    param_budget: float | None = field(default=None, metadata=_kind("real", nullable=True))
    # uniform: every layer (structured: every block) gives the same share; global: the budget goes where OBS says
    # removing costs least (obslib.allocation); None: the method's own (slimdiff: global, the others: uniform)
    allocation: str | None = field(default=None, metadata=_kind("str", nullable=True))
    # structured: a share removed per unit (heads: "block.attn", neurons: the down projection's name), overriding
    # every other setting for the units it names (e.g. another method's allocation: obslib.allocation)
    unit_sparsity: dict | None = field(default=None, metadata=_kind("dict", nullable=True))
    # OBS solver precision; float64 is used per layer where float32 fails
    solver_dtype: str = field(default="float32", metadata=_kind("str"))
    # [start, end) block indices; default all
    block_range: tuple[int, int] | None = field(default=None, metadata=_kind("int-list", nullable=True))
    # one ratio per block (overrides sparsity)
    block_sparsity: list[float] | None = field(default=None, metadata=_kind("real-list", nullable=True))
    # structured only (the paper skips the first and last block)
    exclude_first_last: bool = field(default=True, metadata=_kind("bool"))
    # or "diag" (the public code's approximation)
    head_saliency: str = field(default="exact", metadata=_kind("str"))
    neuron_batch: int = field(default=16, metadata=_kind("int"))
    # count the denoiser's FLOPs per image before and after (obslib.flops; one extra denoiser call each)
    count_flops: bool = field(default=True, metadata=_kind("bool", fingerprint=False))
    # calibrate even for calibration-free methods, to report rel_error
    measure_error: bool = field(default=True, metadata=_kind("bool", fingerprint=False))
    progress: bool = field(default=True, metadata=_kind("bool", fingerprint=False))
    # keep the targeted layers' originals so a failed prune changes nothing
    restore_on_failure: bool = field(default=True, metadata=_kind("bool", fingerprint=False))
    # methods that train (gradient-flow): iterations, learning rate, data, resumable checkpoints
    iterations: int = field(default=100, metadata=_kind("int"))
    lr: float = field(default=1e-5, metadata=_kind("real"))
    # a folder of images + metadata.jsonl (diffusers text-to-image convention)
    train_data: str | None = field(default=None, metadata=_kind("str", nullable=True))
    # resumable runs: a checkpoint after each package / 25 training iterations
    checkpoint_dir: str | None = field(default=None, metadata=_kind("str", nullable=True, fingerprint=False))
    resume: bool = field(default=False, metadata=_kind("bool", fingerprint=False))
    # gradient-flow: prune what raises ("raise", the paper's) or lowers the grad norm
    gradient_criterion: str = field(default="raise", metadata=_kind("str"))
    extra: dict = field(default_factory=dict, metadata=_kind("dict", fingerprint=True))

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

        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r} is unknown; allowed: {', '.join(METHODS)}")
        if self.pattern not in PATTERNS:
            raise UsageError(f"pattern {self.pattern!r} is unknown; allowed: {', '.join(PATTERNS)}")
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"sparsity {self.sparsity} is outside [0, 1)")
        for flag, v in (("--head-sparsity", self.head_sparsity), ("--neuron-sparsity", self.neuron_sparsity)):
            if v is None:
                continue
            if not 0 <= v < 1:
                raise UsageError(f"{flag} {v} is outside [0, 1)")
            if self.pattern != "structured":
                raise UsageError(f"{flag} applies to --pattern structured only (got {self.pattern!r})")
            if self.method == "slimdiff":
                raise UsageError(f"{flag}: slimdiff allocates heads and neurons itself from its parameter budget "
                                 "(--sparsity); drop it")
        n, m = self.nm
        if m and abs(self.sparsity - n / m) > 1e-9:
            raise UsageError(f"sparsity {self.sparsity} does not match pattern {self.pattern} (needs {n / m})")
        if self.weighting not in SCHEMES:
            raise UsageError(f"weighting {self.weighting!r} is unknown; allowed: {', '.join(SCHEMES)}")
        if not (1e-6 <= self.alpha_min <= 1e6 and 1e-6 <= self.alpha_max <= 1e6
                and 1e-6 <= self.alpha_max / self.alpha_min <= 1e6):
            raise UsageError(f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}: need 1e-6 <= alpha_min <= 1e6, "
                             "1e-6 <= alpha_max <= 1e6 and a ratio alpha_max / alpha_min in [1e-6, 1e6]")
        if not 1 <= self.sensitivity_prompts <= 10_000:
            raise UsageError(f"sensitivity prompts {self.sensitivity_prompts} must be an integer in [1, 10000]")
        if not 1 <= self.sensitivity_windows <= 10_000:
            raise UsageError(f"sensitivity windows {self.sensitivity_windows} must be an integer in [1, 10000]")
        if self.packages < 1:
            raise UsageError(f"packages K={self.packages} must be an integer >= 1")
        if self.calibration not in CALIBRATIONS:
            raise UsageError(f"calibration {self.calibration!r} is unknown; allowed: {', '.join(CALIBRATIONS)}")
        if self.record_ram_mb is not None and not 0 <= self.record_ram_mb <= MAX_RECORD_MIB:
            raise UsageError(f"record RAM {self.record_ram_mb:g} MiB is outside the allowed 0 to {MAX_RECORD_MIB} MiB")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"steps {self.steps} must be an integer in [1, {MAX_STEPS}]")
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
        if self.calib_tokens is not None and self.calib_tokens <= 0:
            raise UsageError(f"calib tokens {self.calib_tokens}: must be a positive number of tokens per image and step "
                             "(or None: all)")
        if not 0 <= self.refit_iterations <= 100_000:
            raise UsageError(f"refit iterations {self.refit_iterations} must be an integer in [0, 100000]")
        if self.neuron_batch < 1:
            raise UsageError(f"neuron batch {self.neuron_batch} must be >= 1")
        self._check_prompts()
        if self.head_saliency not in ("exact", "diag"):
            raise UsageError(f"head saliency {self.head_saliency!r} is unknown; allowed: exact, diag")
        if self.block_range is not None and (len(self.block_range) != 2 or self.block_range[0] >= self.block_range[1]
                                             or self.block_range[0] < 0):
            raise UsageError(f"block range {self.block_range} must be (start, end) with 0 <= start < end")
        if self.block_sparsity is not None and any(not 0 <= s < 1 for s in self.block_sparsity):
            raise UsageError(f"block sparsity list {self.block_sparsity} has values outside [0, 1)")
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
        from .methods.base import ALLOCATIONS

        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise UsageError(f"allocation {self.allocation!r} is unknown; allowed: {', '.join(ALLOCATIONS)}")
        structured = self.pattern == "structured"
        if self.param_budget is not None:
            if not 0 <= self.param_budget < 1:
                raise UsageError(f"--param-budget {self.param_budget} is outside [0, 1)")
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
                   if not isinstance(k, str) or not is_kind("real", v) or not 0 <= v < 1]
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
