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

from ..config import PruneConfig
from ..flops import flops_per_image
from ..seeds import SEEDING_VERSION
from ..driver import prune
from ..evaluate import (REAL_SEED_OFFSET, distribution_metrics, fidelity, generate, reconstruction_metrics,
                       render_prompts, wilson_interval)
from ..io import load_pipeline, read_defaults
from ..methods import METHODS
from ..paths import DEFAULT_MODEL
from ..shapes import prompts as world_prompts

EVAL_SEED_OFFSET = 1000
# version of the evaluation in the run cache's key: pp2 = per-prompt outcomes kept, PSNR/SSIM averaged per image
EVAL_VERSION = "pp2"
PP_COLUMNS = ("pp_fidelity", "pp_attributes", "pp_psnr", "pp_ssim")  # per-prompt outcomes (obslib.study.compare.encode)
SAMPLERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}
# FluxPipeline always hands its scheduler its own sigma schedule, which the Heun scheduler cannot take
SAMPLERS_UNAVAILABLE = {"FluxPipeline": ("heun",)}


def samplers(model_dir: str) -> list[str]:
    """The evaluation samplers (``SAMPLERS``) the model's pipeline class can run."""
    from ..owned import read_json

    cls = read_json(os.path.join(model_dir, "model_index.json"), "model_index.json").get("_class_name")
    return [s for s in SAMPLERS if s not in SAMPLERS_UNAVAILABLE.get(cls, ())]


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
        from ..shapes.classifier import load_classifier

        self.model_dir, self.num_prompts, self.batch_size, self.progress = model_dir, num_prompts, batch_size, progress
        self.prompts = world_prompts("heldout", num_prompts)
        self.classifier = load_classifier()
        self._dense: dict[tuple, np.ndarray] = {}
        self._real: dict[int, np.ndarray] = {}
        self.defaults = read_defaults(model_dir) or {}

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

    def score(self, images: np.ndarray, s: Setting, seed: int, dense: bool = False) -> dict:
        """Every metric of one row, and its per-prompt outcomes as ``pp_*`` strings (see obslib.study.compare)."""
        from .compare import encode

        fid = fidelity(images, self.prompts, self.classifier, per_prompt=True)
        pp = fid.pop("per_prompt")
        out = dict(fid)
        out["n_prompts"] = len(self.prompts)
        out["attribute_accuracy"] = float(np.mean(pp["attributes"]))
        out.update(distribution_metrics(images, self.real(seed), self.classifier, seed=seed))
        out["pp_fidelity"] = encode(pp["correct"])
        out["pp_attributes"] = encode(pp["attributes"], 4)
        if dense:  # the reference itself: no PSNR/SSIM to report
            out.update(psnr=np.nan, ssim=np.nan, pp_psnr=np.nan, pp_ssim=np.nan)
        else:
            rec = reconstruction_metrics(images, self.dense_images(s, seed), per_prompt=True)
            out.update(psnr=rec["psnr"], ssim=rec["ssim"], pp_psnr=encode(rec["per_prompt"]["psnr"], 3),
                       pp_ssim=encode(rec["per_prompt"]["ssim"], 4))
        return out


def _prune_key(s: Setting, seed: int) -> str:
    d = {k: v for k, v in s.__dict__.items() if not k.startswith("eval_")}
    return json.dumps({**d, "seed": seed}, sort_keys=True)


_PRUNED: dict[str, tuple] = {}  # the last pruned model, reused by settings that differ only in evaluation


def forget_pruned() -> None:
    """Drop the kept pruned model (``pruned_pipeline``'s reuse), e.g. before pruning the same setting under another
    numerical regime."""
    _PRUNED.clear()


def run_setting(ev: Evaluator, s: Setting, seed: int, progress: bool = False) -> dict:
    """Prune a fresh copy of the model with one setting and seed (or reuse the identical last one), evaluate it."""
    row = {k: v for k, v in s.__dict__.items() if k != "extra"}
    row.update(seed=seed, **{f"extra_{k}": v for k, v in s.extra.items()})
    if s.method == "dense":
        pipe = load_pipeline(ev.model_dir)
        row.update(sparsity=0.0, pattern="none", prune_s=0.0, sparsity_actual=0.0,
                   params=sum(p.numel() for p in pipe.transformer.parameters()))
        fl, _ = flops_per_image(pipe, *_sampling(pipe, s))  # the counter every pruning report uses
        row.update(gflops_image=fl / 1e9, gflops_image_dense=fl / 1e9)
        t = time.perf_counter()
        images = ev.dense_images(s, seed)
        row["generate_s"] = time.perf_counter() - t
        row.update(ev.score(images, s, seed, dense=True))
        return row
    pipe, rep = pruned_pipeline(ev.model_dir, s, seed, progress)
    if "sensitivity" in rep:  # the measured weights and what the probe cost
        row.update(sensitivity_probe_s=rep["sensitivity"]["seconds"],
                   timestep_weights=" ".join(f"{a:.4g}" for a in rep["timestep_weights"]))
    row.update(prune_s=rep["timings"]["total_s"], calibration_s=rep["timings"]["calibration_s"],
                   solve_s=rep["timings"]["solve_s"], sparsity_actual=rep["sparsity_actual"],
                   params=rep["params_after"], hessian_mb=max(rep["hessian_mb_per_package"] or [0.0]),
                   mean_rel_error=float(np.mean([e["rel_error"] for e in rep["layers"] if e["rel_error"] is not None] or [np.nan])))
    fl = rep.get("flops_per_image") or {}
    if fl.get("pruned"):  # the denoiser's FLOPs per image on real inputs (obslib.flops), and the dense model's
        row.update(gflops_image=fl["pruned"] / 1e9, gflops_image_dense=fl["dense"] / 1e9)
    if rep.get("targeted_params_before"):
        row["targeted_removed"] = 1 - rep["targeted_params_after"] / rep["targeted_params_before"]
    t = time.perf_counter()
    images = ev.images(pipe, s, seed)
    row["generate_s"] = time.perf_counter() - t
    row.update(ev.score(images, s, seed))
    return row


def pruned_pipeline(model_dir: str, s: Setting, seed: int, progress: bool = False) -> tuple:
    """(pipeline, report) of the model pruned with one setting and seed; the last one is kept, so settings that
    differ only in evaluation reuse it (do not change the returned pipeline)."""
    key = _prune_key(s, seed)
    if key not in _PRUNED:
        _PRUNED.clear()
        pipe = load_pipeline(model_dir)
        cfg = PruneConfig(method=s.method, pattern=s.pattern, sparsity=s.sparsity, weighting=s.weighting,
                          packages=s.packages, prompts=world_prompts("train", s.num_calib), steps=s.calib_steps,
                          seed=seed, progress=progress, measure_error=METHODS[s.method].needs_calibration, **s.extra)
        _PRUNED[key] = (pipe, prune(pipe, cfg))
    return _PRUNED[key]


def regime() -> str:
    """The numerical regime this process computes under: torch's version, its thread count and the CPU kernel sets
    of torch (ATen), MKL and oneDNN. Float32 results round differently under another regime, and the rounding moves
    masks and images by as much as the smaller effects the study judges, so the regime is part of every cached row's
    key: rows of two regimes are never paired (a row of another regime is recomputed).

    MKL and oneDNN report no dispatch of their own: an unset ``MKL_ENABLE_INSTRUCTIONS`` / ``ONEDNN_MAX_CPU_ISA``
    is recorded as ``auto`` with the widest vector set the CPU offers, which is what they pick then."""
    cap = str(torch.backends.cpu.get_cpu_capability()).lower()
    native = _cpu_vector_set()
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS") or f"auto-{native}"
    dnnl = os.environ.get("ONEDNN_MAX_CPU_ISA") or f"auto-{native}"
    return f"torch{torch.__version__.split('+')[0]}-t{torch.get_num_threads()}-aten-{cap}-mkl-{mkl}-dnnl-{dnnl}".lower()


def _cpu_vector_set() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "unknown"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def cache_tag(ev: Evaluator) -> str:
    """The part of a cached row's key that names the model, the evaluation prompts, the evaluation and seeding
    versions and the numerical regime (``regime()``)."""
    import hashlib

    prompts_digest = hashlib.sha1("\n".join(ev.prompts).encode()).hexdigest()[:8]
    return (f"{model_fingerprint(ev.model_dir)}/{ev.num_prompts}/{prompts_digest}/{EVAL_VERSION}/{SEEDING_VERSION}/"
            f"{regime()}")


def read_cache(out_csv: str, others: bool = False) -> pd.DataFrame:
    """The cached rows of a study CSV made under the current evaluation and seeding versions and this process's
    numerical regime (others are recomputed: rows sampled with another seeding are other models and other images,
    rows of another regime round differently). ``others=True``: the rows that are not, which stay in the file as
    they are (a record of earlier runs, never paired with this regime's rows)."""
    done = pd.read_csv(out_csv, dtype={c: str for c in PP_COLUMNS}) if os.path.exists(out_csv) else pd.DataFrame()
    if "key" in done and len(done):
        mine = done["key"].astype(str).str.split("|").str[0].str.endswith(f"/{EVAL_VERSION}/{SEEDING_VERSION}/{regime()}")
        done = done[~mine if others else mine]
    elif others:
        done = pd.DataFrame()
    return done


def model_fingerprint(model_dir: str) -> str:
    """Short hash of the model's weights: cached rows of another model are never reused."""
    import hashlib

    h = hashlib.sha1()
    for d, _, files in sorted(os.walk(model_dir)):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


def run_grid(settings: list[Setting], seeds, out_csv: str, evaluator: Evaluator | None = None,
             progress: bool = True, **ev_kwargs) -> pd.DataFrame:
    """Run every (setting, seed) not yet in ``out_csv`` for this model and evaluation prompts; returns those rows."""
    ev = evaluator or Evaluator(**ev_kwargs)
    tag = cache_tag(ev)

    def key(s, sd):
        return f"{tag}|{s.key(sd)}"

    done = read_cache(out_csv)  # rows of other versions or another regime are recomputed
    keys = set(done["key"]) if "key" in done else set()
    todo = [(s, sd) for sd in seeds for s in settings if key(s, sd) not in keys]  # seed-major: reuse pruned models
    rows = done.to_dict("records")
    for s, sd in tqdm(todo, desc=os.path.basename(out_csv), disable=not progress):
        row = run_setting(ev, s, sd)
        row["key"] = key(s, sd)
        rows.append(row)
        write_csv(pd.concat([read_cache(out_csv, others=True), pd.DataFrame(rows)], ignore_index=True), out_csv)
    df = pd.DataFrame(rows)
    wanted = {key(s, sd) for s in settings for sd in seeds}
    return df[df["key"].isin(wanted)].reset_index(drop=True)


def write_csv(df: pd.DataFrame, path: str) -> None:
    from ..owned import write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, df.to_csv(index=False))


METRICS = ("prompt_fidelity", "attribute_accuracy", "fid", "kid", "psnr", "ssim")


def summarize(df: pd.DataFrame, by: list[str], metrics=METRICS + ("prune_s",)) -> pd.DataFrame:
    """Mean and standard deviation over seeds, one row per group; also the number of seeds, the 95% Wilson
    interval of prompt fidelity pooled over seeds x prompts (``prompt_fidelity_lo/_hi``) and, where the rows
    have it, the KID estimate's own standard error averaged over seeds (``kid_sd_mean``)."""
    metrics = [m for m in metrics if m in df]
    if "kid" in metrics and "kid_sd" in df:
        metrics.append("kid_sd")
    g = df.groupby(by, dropna=False)[list(metrics)]
    out = g.mean().add_suffix("_mean").join(g.std().add_suffix("_std"))
    out["seeds"] = df.groupby(by, dropna=False).size()
    if "prompt_fidelity" in df:
        trials = _n_prompts(df)
        hits = (df["prompt_fidelity"] * trials).round()
        pooled = pd.DataFrame({"hits": hits, "trials": trials}).join(df[by]).groupby(by, dropna=False)[["hits", "trials"]].sum()
        ci = [wilson_interval(h / t, int(t)) if t > 0 else (np.nan, np.nan) for h, t in zip(pooled.hits, pooled.trials)]
        out["prompt_fidelity_lo"] = [a for a, _ in ci]
        out["prompt_fidelity_hi"] = [b for _, b in ci]
    return out.reset_index()


def _n_prompts(df: pd.DataFrame) -> pd.Series:
    """Evaluation prompts per row: the row's own count, else the one in its cache key (model/prompts/digest)."""
    n = df["n_prompts"] if "n_prompts" in df else pd.Series(np.nan, index=df.index)
    if "key" in df:
        from_key = df["key"].astype(str).str.split("|").str[0].str.split("/").str[1]
        n = n.fillna(pd.to_numeric(from_key, errors="coerce"))
    return n.fillna(0)


def cell(row, metric: str, digits: int = 3) -> str:
    """'mean ± std' of one summary row (the std is left out with a single seed); prompt fidelity adds its 95%
    interval over prompts and seeds, KID its own standard error."""
    m, sd = row[f"{metric}_mean"], row.get(f"{metric}_std", np.nan)
    if not np.isfinite(m):
        return "— (reference)" if metric in ("psnr", "ssim") else "—"
    text = f"{m:.{digits}f} ± {sd:.{digits}f}" if np.isfinite(sd) else f"{m:.{digits}f} (one seed)"
    lo, hi = row.get(f"{metric}_lo", np.nan), row.get(f"{metric}_hi", np.nan)
    if np.isfinite(lo) and np.isfinite(hi):
        text += f" [95% {lo:.{digits}f}–{hi:.{digits}f}]"
    if metric == "kid" and np.isfinite(row.get("kid_sd_mean", np.nan)):
        text += f" (estimate's sd {row['kid_sd_mean']:.{digits}f})"
    return text


def format_table(summary: pd.DataFrame, by: list[str], metrics=("prompt_fidelity", "fid", "psnr")) -> pd.DataFrame:
    """'mean ± std' strings for display; prompt fidelity with its 95% interval, KID with its own sd."""
    out = summary[by].copy()
    for m in metrics:
        if f"{m}_mean" in summary:
            out[m] = [cell(r, m) for _, r in summary.iterrows()]
    return out


def slimdiff_allocation(report: dict) -> pd.DataFrame:
    """Where a SlimDiff report spent its parameter budget: per kind of group (FFN, value-output, query-key)
    and stream (MMDiT image / text FFNs; attention groups serve both), the parameters removed and their share."""
    rows = []
    for name, r in report["ranks"].items():
        stream = "both" if r["kind"] != "ffn" else ("text" if "context" in name else "image")
        rows.append({"kind": r["kind"], "stream": stream, "groups": 1, "slimmed": int(r["level"] < r["full"]),
                     "kept_share": r["level"] / r["full"], "params_removed": r["params_removed"]})
    df = pd.DataFrame(rows).groupby(["kind", "stream"], as_index=False).agg(
        groups=("groups", "sum"), slimmed=("slimmed", "sum"), mean_kept_share=("kept_share", "mean"),
        params_removed=("params_removed", "sum"))
    df["share_of_removed"] = df.params_removed / max(df.params_removed.sum(), 1)
    return df


def _sampling(pipe, s: Setting) -> tuple:
    """(steps, guidance, first calibration prompt, call arguments) of a setting's calibration runs: the inputs on
    which a prune's report counts the denoiser's FLOPs (``obslib.driver``), so a dense row counts the same call."""
    from ..sampling import call_kwargs, sampling_defaults

    d = sampling_defaults(pipe)
    return (s.calib_steps or d["num_inference_steps"], d["guidance_scale"], world_prompts("train", s.num_calib)[0],
            call_kwargs(d))


def methods_table(runs_csv: str, num_calib: int, method_extras=("iterations", "lr")) -> pd.DataFrame:
    """Every method at 50% and 60% unstructured, 2:4 and 20% structured (default evaluation, K = 4, log-decrease,
    default calibration). Rows whose settings differ beyond method and pattern are never pooled: a row with an
    ``extra_*`` field other than ``method_extras`` (a method's own run length, e.g. gradient flow's iterations
    and learning rate) is an ablation and left out; two rows of one method, setting and seed are an error."""
    df = pd.read_csv(runs_csv)
    default_eval = df.eval_steps.isna() & df.eval_guidance.isna() & (df.eval_sampler == "euler")
    base = default_eval & (df.packages == 4) & (df.weighting == "log-decrease") & (df.num_calib == num_calib)
    ablation = [c for c in df if c.startswith("extra_") and c[len("extra_"):] not in method_extras]
    if ablation:
        base &= df[ablation].isna().all(axis=1)
    pick = ((df.pattern == "unstructured") & df.sparsity.isin([0.5, 0.6])) | (df.pattern == "2:4") | \
           ((df.pattern == "structured") & np.isclose(df.sparsity, 0.2))
    rows = df[base & (pick | (df.method == "dense"))].drop_duplicates("key")
    rows = rows[rows.key.str.split("|").str[0] == rows.key.iloc[-1].split("|")[0]] if len(rows) else rows
    rows = rows.assign(setting=np.where(rows.method == "dense", "dense",
                                        np.where(rows.pattern == "unstructured", (rows.sparsity * 100).round().astype(int).astype(str) + "% unstructured",
                                                 np.where(rows.pattern == "2:4", "2:4", "20% structured"))))
    if rows.groupby(["setting", "method", "seed"]).size().max() > 1:
        raise ValueError("methods_table would pool rows of different settings: " +
                         str(rows[rows.duplicated(["setting", "method", "seed"], keep=False)].key.tolist()[:2]))
    return summarize(rows, ["setting", "method"], ("prompt_fidelity", "attribute_accuracy", "fid", "psnr", "prune_s"))
