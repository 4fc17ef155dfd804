"""``obslib.prune(pipe, config) -> report`` and the ``obslib prune`` command.

The one driver for every method and granularity: resolve the denoiser's layer map, form basic units
and K packages, calibrate each package through the already-pruned model, solve each unit with the
chosen method, and report per-layer sparsity and reconstruction error.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .archs import attr, find_denoiser, has, iter_blocks, spec_for
from .hessian import Calibration, weight_matrix
from .io import UsageError, check_pipeline_dir, load_pipeline, save_pipeline
from .obs import reconstruction_error
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
    prompts: list[str] | None = None
    steps: int | None = None  # default: the model's sampling default
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 16
    blocksize: int = 128
    percdamp: float = 0.01
    block_range: tuple[int, int] | None = None  # [start, end) block indices; default all
    block_sparsity: list[float] | None = None  # one ratio per block (overrides sparsity)
    exclude_first_last: bool = True  # structured only (the paper skips the first and last block)
    head_saliency: str = "exact"  # or "diag" (the public code's approximation)
    neuron_batch: int = 16
    measure_error: bool = True  # calibrate even for calibration-free methods, to report rel_error
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def nm(self) -> tuple[int, int]:
        if self.pattern in ("2:4", "4:8"):
            n, m = map(int, self.pattern.split(":"))
            return n, m
        return 0, 0

    def validate(self) -> None:
        from .methods import METHODS

        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r} is unknown; allowed: {', '.join(METHODS)}")
        if self.pattern not in PATTERNS:
            raise UsageError(f"pattern {self.pattern!r} is unknown; allowed: {', '.join(PATTERNS)}")
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1) or math.isnan(self.sparsity):
            raise UsageError(f"sparsity {self.sparsity} is outside [0, 1)")
        n, m = self.nm
        if m and abs(self.sparsity - n / m) > 1e-9:
            raise UsageError(f"sparsity {self.sparsity} does not match pattern {self.pattern} (needs {n / m})")
        if self.weighting not in SCHEMES:
            raise UsageError(f"weighting {self.weighting!r} is unknown; allowed: {', '.join(SCHEMES)}")
        if not isinstance(self.packages, int) or self.packages < 1:
            raise UsageError(f"packages K={self.packages} must be an integer >= 1")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"steps {self.steps} must be >= 1")
        if self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size} must be >= 1")
        if self.prompts is not None and len(self.prompts) == 0:
            raise UsageError("the calibration prompt list is empty")
        if self.head_saliency not in ("exact", "diag"):
            raise UsageError(f"head saliency {self.head_saliency!r} is unknown; allowed: exact, diag")
        if self.block_sparsity is not None and any(not 0 <= s < 1 for s in self.block_sparsity):
            raise UsageError(f"block sparsity list {self.block_sparsity} has values outside [0, 1)")
        meth = METHODS[self.method]
        fn = meth.unstructured if self.pattern != "structured" else meth.heads or meth.neurons
        if fn is None:
            raise UsageError(f"method {self.method!r} does not support pattern {self.pattern!r}")


def sampling_defaults(pipe) -> dict:
    """The model's own sampling defaults (obslib_defaults.json in its directory) or the paper's."""
    path = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    f = os.path.join(path, DEFAULTS_FILE) if path else None
    if f and os.path.exists(f):
        with open(f) as fh:
            return json.load(fh)
    return dict(GENERIC_SAMPLING)


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
    """Prune the pipeline's denoiser in place; returns the report (see README for its keys)."""
    from .methods import METHODS

    cfg = config
    cfg.validate()
    defaults = sampling_defaults(pipe)
    steps = cfg.steps or defaults["num_inference_steps"]
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"]
    if cfg.prompts is None:
        raise UsageError("no calibration prompts given")
    comp, den = find_denoiser(pipe)
    calibrate = None
    if METHODS[cfg.method].needs_calibration or cfg.measure_error:
        msl = {k: v for k, v in defaults.items() if k == "max_sequence_length"}
        runner = CalibrationRunner(pipe, cfg.prompts, steps, guidance, cfg.seed, cfg.batch_size, msl, cfg.progress)
        calibrate = runner.run
    report = prune_model(den, calibrate, cfg, steps, component=comp)
    report.update(num_calibration_prompts=len(cfg.prompts), guidance=guidance)
    return report


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


def prune_model(den, calibrate, cfg: PruneConfig, steps: int, component: str = "transformer") -> dict:
    """Prune a denoiser in place. ``calibrate(calibration, desc)`` must run ``steps`` denoiser calls per
    sampling run over the calibration data, calling ``calibration.begin_run()/end_run()`` around each run
    (``CalibrationRunner.run`` does this with a real pipeline); None for calibration-free methods."""
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
    packages = split_packages(units, cfg.packages)
    weighting = method.forced_weighting or cfg.weighting
    alphas = timestep_weights(weighting, steps, cfg.alpha_min, cfg.alpha_max)
    targeted = _targeted_layers(den, spec, units, structured)
    shapes_before, heads_before = linear_shapes(den), head_counts(den)
    params_before = sum(p.numel() for p in den.parameters())
    target_before = sum(den.get_submodule(n).weight.numel() for n in targeted)

    t0 = time.perf_counter()
    t_cal = t_solve = 0.0
    layers_report = []
    package_mb = []
    bar = tqdm(packages, desc=f"{cfg.method} packages", disable=not cfg.progress)
    for pi, package in enumerate(bar):
        stats = {}
        if calibrate is not None:
            t = time.perf_counter()
            layers = package_layers(den, package)
            calib = Calibration(den, layers, alphas)
            mb = sum(s.xtx.numel() * 4 for s in calib.stats.values()) / 2**20
            package_mb.append(mb)
            if cfg.progress:
                bar.write(f"package {pi + 1}/{len(packages)}: {len(layers)} layers, Hessians need {mb:.1f} MiB (float32)")
            with calib:
                calibrate(calib, f"calibrate package {pi + 1}/{len(packages)}")
            stats = calib.stats
            t_cal += time.perf_counter() - t
        t = time.perf_counter()
        for unit in package:
            s = _block_sparsity(cfg, unit.block_index, n_blocks)
            solve = _solve_structured if structured else _solve_layers
            layers_report += solve(den, unit, stats, s, cfg, method)
        t_solve += time.perf_counter() - t
        del stats

    target_after = sum(_nonzero_or_size(den.get_submodule(n), structured) for n in targeted)
    report = {
        "method": cfg.method,
        "pattern": cfg.pattern,
        "sparsity_target": cfg.sparsity,
        "sparsity_actual": 1 - target_after / target_before,
        "weighting": weighting,
        "packages": len(packages),
        "steps": steps,
        "seed": cfg.seed,
        "blocks": ids,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in den.parameters()),
        "hessian_mb_per_package": package_mb,
        "timings": {"calibration_s": t_cal, "solve_s": t_solve, "total_s": time.perf_counter() - t0},
        "layers": layers_report,
        "config": {k: v for k, v in asdict(cfg).items() if k != "prompts"},
    }
    if structured:
        report["manifest"] = make_manifest(component, den, shapes_before, heads_before)
    return report


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


def _solve_layers(den, unit, stats, sparsity, cfg, method) -> list[dict]:
    out = []
    n, m = cfg.nm
    for name in unit.hessian_layers:
        mod = den.get_submodule(name)
        W = weight_matrix(mod)
        W_hat, mask = method.unstructured(W, stats.get(name), sparsity, n, m, cfg)
        err = reconstruction_error(W, W_hat, stats[name].H) if name in stats else None
        mod.weight.data.copy_(W_hat.to(mod.weight.dtype).reshape(mod.weight.shape))
        out.append({"name": name, "sparsity": float((mod.weight == 0).float().mean()), "rel_error": err})
    return out


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


def _solve_structured(den, unit, stats, sparsity, cfg, method) -> list[dict]:
    block = den.get_submodule(unit.block)
    g = unit.group
    out = []
    if unit.kind == "heads":
        attn = block.get_submodule(g.attn)
        heads = attn.heads
        n_remove = min(heads - 1, round(sparsity * heads))
        if n_remove == 0:
            return []
        fulls = [weight_matrix(den.get_submodule(n)) for n in unit.hessian_layers]
        hi = attr(block, g.out_cols) if g.out_cols else fulls[0].shape[1]
        head_dim = hi // heads
        Ws = [W[:, :hi] for W in fulls]
        sts = [_sliced(stats, n, 0, hi, False) for n in unit.hessian_layers]
        new, removed, biases = method.heads(Ws, sts, head_dim, n_remove, cfg)
        keep = torch.cat([kept_index(heads, removed, head_dim), torch.arange(hi, fulls[0].shape[1])])
        for i, (name, W, Wn, full, st) in enumerate(zip(unit.hessian_layers, Ws, new, fulls, sts)):
            err = reconstruction_error(W, Wn, st.H) if st is not None else None
            full = full.clone()
            full[:, :hi] = Wn.to(full.dtype)
            keep_cols(den, name, keep, full)
            _add_bias(den.get_submodule(name), None if biases is None else biases[i])
            out.append({"name": name, "sparsity": len(removed) / heads, "rel_error": err, "removed_heads": removed})
        for rel in g.inputs:
            if has(block, rel):
                keep_rows(den, f"{unit.block}.{rel}", keep[keep < hi])
        set_heads(attn, heads - len(removed))
    else:
        name = unit.hessian_layers[0]
        full = weight_matrix(den.get_submodule(name))
        inner = attr(block, g.down_cols) if g.down_cols else full.shape[1]
        lo = full.shape[1] - inner
        n_remove = min(inner - 1, round(sparsity * inner))
        if n_remove == 0:
            return []
        W = full[:, lo:]
        st = _sliced(stats, name, lo, full.shape[1], True)
        Wn, removed, bias = method.neurons(W, st, n_remove, cfg)
        keep_local = kept_index(inner, removed)
        err = reconstruction_error(W, Wn, st.H) if st is not None else None
        full = full.clone()
        full[:, lo:] = Wn.to(full.dtype)
        keep_cols(den, name, torch.cat([torch.arange(lo), lo + keep_local]), full)
        _add_bias(den.get_submodule(name), bias)
        for up in g.ups:
            up_mod = block.get_submodule(up)
            gated = up_mod.out_features == 2 * inner  # GEGLU: value and gate halves
            keep_rows(den, f"{unit.block}.{up}", torch.cat([keep_local, keep_local + inner]) if gated else keep_local)
        out.append({"name": name, "sparsity": n_remove / inner, "rel_error": err, "removed_neurons": len(removed)})
    return out


# ---------------------------------------------------------------------------------------------------
# Command line

def read_prompt_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path!r} does not exist")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path!r} is empty (need one prompt per line)")
    return prompts


def default_calibration_prompts(model_dir: str, n: int) -> list[str]:
    """The embedded model's own training prompts; other models must pass --prompts FILE."""
    f = os.path.join(model_dir, DEFAULTS_FILE)
    meta = json.load(open(f)) if os.path.exists(f) else {}
    if meta.get("calibration_prompts") != "shapes-train":
        raise UsageError(f"{model_dir!r} has no default calibration set; pass --prompts FILE (one prompt per line)")
    from .shapes import prompts

    return prompts("train", n)


def add_cli(sub) -> None:
    from .methods import METHODS

    p = sub.add_parser("prune", help="prune a diffusers pipeline directory")
    p.add_argument("model_dir")
    p.add_argument("--method", default="obs-diff", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--pattern", default="unstructured", help=f"one of: {', '.join(PATTERNS)}")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--weighting", default="log-decrease", help=f"one of: {', '.join(SCHEMES)}")
    p.add_argument("--packages", type=int, default=4)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-prompts", type=int)
    g.add_argument("--prompts")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-range", type=int, nargs=2, metavar=("START", "END"))
    p.add_argument("--head-saliency", default="exact")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (Hessians are float32)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cli_prune)


def _cli_prune(a) -> None:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if a.dtype not in dtypes:
        raise UsageError(f"dtype {a.dtype!r} is unknown; allowed: {', '.join(dtypes)}")
    if a.num_prompts is not None and a.num_prompts < 1:
        raise UsageError(f"--num-prompts {a.num_prompts} must be >= 1")
    cfg = PruneConfig(method=a.method, pattern=a.pattern, sparsity=a.sparsity, weighting=a.weighting,
                      packages=a.packages, steps=a.steps, guidance=a.guidance, seed=a.seed, batch_size=a.batch_size,
                      block_range=tuple(a.block_range) if a.block_range else None, head_saliency=a.head_saliency,
                      progress=not a.quiet, prompts=["(validated)"])
    cfg.validate()
    check_pipeline_dir(a.model_dir)
    cfg.prompts = read_prompt_file(a.prompts) if a.prompts else default_calibration_prompts(a.model_dir, a.num_prompts or 100)
    if os.path.abspath(a.out) == os.path.abspath(a.model_dir):
        raise UsageError("--out must differ from the model directory")
    pipe = load_pipeline(a.model_dir, device=a.device, dtype=dtypes[a.dtype])
    report = prune(pipe, cfg)
    save_pruned(pipe, report, a.out, a.model_dir)
    if not a.quiet:
        print(f"wrote {a.out}: sparsity {report['sparsity_actual']:.3f}, params {report['params_before']} -> "
              f"{report['params_after']}, {report['timings']['total_s']:.1f} s")


def save_pruned(pipe, report: dict, out: str, model_dir: str | None = None) -> None:
    """Write the pruned pipeline, its report and (structured) manifest atomically."""
    extra = {"pruning_report.json": {k: v for k, v in report.items() if k != "manifest"}}
    src = os.path.join(model_dir, DEFAULTS_FILE) if model_dir else None
    if src and os.path.exists(src):
        extra[DEFAULTS_FILE] = json.load(open(src))
    save_pipeline(pipe, out, manifest=report.get("manifest"), extra_json=extra)
