"""Study runner: prune + evaluate grids over methods, patterns, sparsities and seeds, resumably.

The notebooks call these functions and only plot; every number they show comes from here. A grid's rows
are appended to a CSV under results/ (written atomically) and rows already there are not recomputed,
so an interrupted study resumes where it stopped.

Seeds: seed s calibrates with sampling seed s and evaluates with sampling seed 1000 + s on the held-out
prompts; the dense reference images for PSNR/SSIM use the same evaluation seed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .api import PruneConfig, prune
from .evaluate import REAL_SEED_OFFSET, distribution_metrics, fidelity, generate, reconstruction_metrics, render_prompts
from .io import load_pipeline
from .shapes import prompts as world_prompts

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-sd3")
EVAL_SEED_OFFSET = 1000
SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}


@dataclass
class Setting:
    """One row of a grid: how to prune (PruneConfig fields) and how to evaluate."""

    method: str = "obs-diff"  # or "dense"
    pattern: str = "unstructured"
    sparsity: float = 0.5
    weighting: str = "log-decrease"
    packages: int = 4
    num_calib: int = 32
    calib_steps: int | None = None
    eval_steps: int | None = None
    eval_guidance: float | None = None
    eval_sampler: str = "euler"
    extra: dict = field(default_factory=dict)  # further PruneConfig fields

    def key(self, seed: int) -> str:
        d = {k: v for k, v in self.__dict__.items()}
        d["seed"] = seed
        return json.dumps(d, sort_keys=True)


def _set_sampler(pipe, name: str) -> None:
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    cls = getattr(diffusers, SAMPLERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


class Evaluator:
    """Caches the classifier, ground-truth renders and dense reference images between grid rows."""

    def __init__(self, model_dir: str = DEFAULT_MODEL, num_prompts: int = 64, batch_size: int = 64, progress: bool = False):
        from .shapes.classifier import load_classifier

        self.model_dir, self.num_prompts, self.batch_size, self.progress = model_dir, num_prompts, batch_size, progress
        self.prompts = world_prompts("heldout", num_prompts)
        self.classifier = load_classifier()
        self._dense: dict[tuple, np.ndarray] = {}
        self._real: dict[int, np.ndarray] = {}
        self.defaults = json.load(open(os.path.join(model_dir, "obslib_defaults.json")))

    def images(self, pipe, s: Setting, seed: int) -> np.ndarray:
        _set_sampler(pipe, s.eval_sampler)
        return generate(pipe, self.prompts, EVAL_SEED_OFFSET + seed, steps=s.eval_steps, guidance=s.eval_guidance,
                        batch_size=self.batch_size, progress=self.progress)

    def dense_images(self, s: Setting, seed: int) -> np.ndarray:
        key = (s.eval_steps, s.eval_guidance, s.eval_sampler, seed)
        if key not in self._dense:
            self._dense[key] = self.images(load_pipeline(self.model_dir), s, seed)
        return self._dense[key]

    def real(self, seed: int) -> np.ndarray:
        if seed not in self._real:
            self._real[seed] = render_prompts(self.prompts, EVAL_SEED_OFFSET + seed + REAL_SEED_OFFSET)
        return self._real[seed]

    def score(self, images: np.ndarray, s: Setting, seed: int) -> dict:
        out = fidelity(images, self.prompts, self.classifier)
        out.update(distribution_metrics(images, self.real(seed), self.classifier, seed=seed))
        out.update(reconstruction_metrics(images, self.dense_images(s, seed)))
        return out


def run_setting(ev: Evaluator, s: Setting, seed: int, progress: bool = False) -> dict:
    """Prune a fresh copy of the model with one setting and seed, then evaluate it."""
    pipe = load_pipeline(ev.model_dir)
    row = {k: v for k, v in s.__dict__.items() if k != "extra"}
    row.update(seed=seed, **{f"extra_{k}": v for k, v in s.extra.items()})
    if s.method != "dense":
        cfg = PruneConfig(method=s.method, pattern=s.pattern, sparsity=s.sparsity, weighting=s.weighting,
                          packages=s.packages, prompts=world_prompts("train", s.num_calib), steps=s.calib_steps,
                          seed=seed, progress=progress, **s.extra)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rep = prune(pipe, cfg)
        row.update(prune_s=rep["timings"]["total_s"], calibration_s=rep["timings"]["calibration_s"],
                   solve_s=rep["timings"]["solve_s"], sparsity_actual=rep["sparsity_actual"],
                   params=rep["params_after"], hessian_mb=max(rep["hessian_mb_per_package"] or [0.0]),
                   mean_rel_error=float(np.mean([l["rel_error"] for l in rep["layers"] if l["rel_error"] is not None] or [np.nan])))
    else:
        row.update(prune_s=0.0, sparsity_actual=0.0, params=sum(p.numel() for p in pipe.transformer.parameters()))
    t = time.perf_counter()
    images = ev.images(pipe, s, seed)
    row["generate_s"] = time.perf_counter() - t
    row.update(ev.score(images, s, seed))
    return row


def run_grid(settings: list[Setting], seeds, out_csv: str, evaluator: Evaluator | None = None,
             progress: bool = True, **ev_kwargs) -> pd.DataFrame:
    """Run every (setting, seed) not yet in ``out_csv``; returns the whole table."""
    ev = evaluator or Evaluator(**ev_kwargs)
    done = pd.read_csv(out_csv) if os.path.exists(out_csv) else pd.DataFrame()
    keys = set(done["key"]) if "key" in done else set()
    todo = [(s, sd) for s in settings for sd in seeds if s.key(sd) not in keys]
    rows = done.to_dict("records")
    for s, sd in tqdm(todo, desc=os.path.basename(out_csv), disable=not progress):
        row = run_setting(ev, s, sd)
        row["key"] = s.key(sd)
        rows.append(row)
        _write_csv(pd.DataFrame(rows), out_csv)
    df = pd.DataFrame(rows)
    wanted = {s.key(sd) for s in settings for sd in seeds}
    return df[df["key"].isin(wanted)].reset_index(drop=True)


def _write_csv(df: pd.DataFrame, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


METRICS = ("prompt_fidelity", "fid", "kid", "psnr", "ssim")


def summarize(df: pd.DataFrame, by: list[str], metrics=METRICS + ("prune_s",)) -> pd.DataFrame:
    """Mean and standard deviation over seeds, one row per group; also the number of seeds."""
    metrics = [m for m in metrics if m in df]
    g = df.groupby(by, dropna=False)[list(metrics)]
    out = g.mean().add_suffix("_mean").join(g.std().add_suffix("_std"))
    out["seeds"] = df.groupby(by, dropna=False).size()
    return out.reset_index()


def format_table(summary: pd.DataFrame, by: list[str], metrics=("prompt_fidelity", "fid", "psnr")) -> pd.DataFrame:
    """'mean ± std' strings for display."""
    out = summary[by].copy()
    for m in metrics:
        if f"{m}_mean" in summary:
            out[m] = [f"{a:.3f} ± {b:.3f}" if np.isfinite(b) else f"{a:.3f}"
                      for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"].fillna(np.nan))]
    return out


def transformer_flops(pipe, batch: int = 2) -> float:
    """FLOPs of one transformer forward (CFG batch) at the model's default size, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    den = pipe.transformer
    c = den.config
    size = c.sample_size
    x = torch.zeros(batch, c.in_channels, size, size)
    ctx = torch.zeros(batch, 32, c.joint_attention_dim)
    pooled = torch.zeros(batch, c.pooled_projection_dim)
    t = torch.ones(batch)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        den(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)
    return float(fc.get_total_flops())


def median_time(fn, repeats: int = 7, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median_s": float(np.median(ts)), "min_s": float(np.min(ts)), "max_s": float(np.max(ts)), "repeats": repeats}
