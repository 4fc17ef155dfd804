"""Does timestep-awareness matter, and why: the experiments of notebook 08 (the notebook only plots).

The paper weighs early, noisy steps more because an error made there travels through every later step. Three
measurements test that premise and how much a weighting can act on it:

* ``run_injection``: sample with the pruned weights active in one window of steps and the dense weights
  elsewhere (``obslib.windows.StepSwitch``), and score the images against the dense model's, paired per prompt:
  where an error hurts the final image.
* ``step_statistics`` / ``hessian_spread``: how far each step's H_t = 2 X_t^T X_t / n_t is from the mean over
  steps, on a few representative layers: how different the steps' inputs are at all.
* ``mask_shift``: how far a weighting (scheme and strength) moves the OBS mask and the layer error away from
  the uniform Hessian's, every scheme's Hessian formed from one per-step calibration.

``strength_settings`` builds the grid of weightings (scheme x ratio alpha_max / alpha_min) that
``obslib.study.experiments.run_grid`` prunes and evaluates end to end.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .compare import AHEAD, BEHIND, NONE, PAIRED, outcomes, paired_bootstrap
from .experiments import Evaluator, Setting, cache_tag, pruned_pipeline, read_cache, write_csv
from ..hessian import weight_matrix
from ..io import load_pipeline
from ..obs import obs_prune, reconstruction_error
from ..sampling import collect_stats
from ..shapes.model import DEFAULT_SAMPLING
from ..weighting import alpha_range, timestep_weights
from ..windows import StepSwitch, equal_windows, halves

ONLY = 1e6  # the ratio that makes first-half / second-half weigh "only that half"


def injection_windows(steps: int, n: int = 5) -> list[tuple[int, int]]:
    """``n`` equal windows covering the trajectory, then its first and second half."""
    return equal_windows(steps, n) + halves(steps)


def window_label(w: tuple[int, int]) -> str:
    return f"steps {w[0]}-{w[1]}"


EQUAL_PROBE = "equal-output-noise"


def window_tail(w: tuple[int, int], probe: str = "") -> str:
    """The end of a window row's cache key after its setting's key: the window, and the probe when the error in it
    is not the pruned weights' (``run_equal_probe``: ``EQUAL_PROBE``)."""
    return f"|window={w[0]}-{w[1]}" + (f"|probe={probe}" if probe else "")


def run_injection(settings: list[Setting], seeds, windows: list[tuple[int, int]], out_csv: str,
                  evaluator: Evaluator | None = None, progress: bool = True, **ev_kwargs) -> pd.DataFrame:
    """For each setting and seed, prune once, then sample the dense pipeline with the pruned denoiser active only
    in each window; every row is scored like a study row (``Evaluator.score``: PSNR/SSIM against the dense
    images of the same prompts and seed, prompt fidelity, per-prompt outcomes). Rows are cached in ``out_csv``
    (resumable); returns the rows asked for, with ``window`` ("steps a-b"), ``first`` and ``last``."""
    ev = evaluator or Evaluator(**ev_kwargs)
    tag = cache_tag(ev)
    done = read_cache(out_csv)
    keys = set(done["key"]) if "key" in done else set()
    rows = done.to_dict("records")

    def key(s, sd, w):
        return f"{tag}|{s.key(sd)}{window_tail(w)}"

    todo = [(s, sd) for sd in seeds for s in settings if any(key(s, sd, w) not in keys for w in windows)]
    for s, sd in tqdm(todo, desc=os.path.basename(out_csv), disable=not progress):
        steps = s.eval_steps or DEFAULT_SAMPLING["num_inference_steps"]
        pruned, rep = pruned_pipeline(ev.model_dir, s, sd)
        dense = load_pipeline(ev.model_dir)
        for w in windows:
            if key(s, sd, w) in keys:
                continue
            with StepSwitch(dense.transformer, pruned.transformer, w, steps, _calls(dense, s)):
                images = ev.images(dense, s, sd)
            row = {k: v for k, v in s.__dict__.items() if k != "extra"}
            row.update(seed=sd, window=window_label(w), first=w[0], last=w[1], steps=steps,
                       sparsity_actual=rep["sparsity_actual"], **ev.score(images, s, sd), key=key(s, sd, w))
            rows.append(row)
            write_csv(pd.concat([read_cache(out_csv, others=True), pd.DataFrame(rows)], ignore_index=True), out_csv)
    df = pd.DataFrame(rows)
    wanted = {key(s, sd, w) for s in settings for sd in seeds for w in windows}
    return df[df["key"].isin(wanted)].reset_index(drop=True)


def _prediction(out):
    """The prediction tensor of a denoiser's output (a tuple from ``return_dict=False``, else ``.sample``)."""
    return out[0] if isinstance(out, tuple) else out.sample


def _with_prediction(out, v):
    return (v, *out[1:]) if isinstance(out, tuple) else type(out)(sample=v)


def _rel(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per sample of the batch: ‖v − d‖ / ‖d‖."""
    return (v - d).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)


class OutputNoise(torch.nn.Module):
    """``denoiser`` with Gaussian noise added to its prediction, ‖noise‖ = ``rel``·‖prediction‖ for every sample of the
    batch at every call: an error of the same relative size at every step (the probe that separates "where an error
    hurts" from "how large the pruning error is at that step"). The noise is drawn from a generator seeded by
    ``seed`` and the call count, so a window's images are reproducible."""

    def __init__(self, denoiser: torch.nn.Module, rel: float, seed: int):
        super().__init__()
        self.denoiser, self.rel, self.seed, self.calls = denoiser, float(rel), int(seed), 0

    def forward(self, *args, **kwargs):
        out = self.denoiser(*args, **kwargs)
        v = _prediction(out)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        z = torch.randn(v.shape, generator=g, dtype=v.dtype)
        shape = (-1,) + (1,) * (v.dim() - 1)
        z = z * (self.rel * v.flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1).clamp_min(1e-12)).reshape(shape)
        return _with_prediction(out, v + z)


class ErrorMeter(torch.nn.Module):
    """Runs ``dense`` and ``other`` on the same inputs and returns ``dense``'s output (the trajectory stays the dense
    one); records ``other``'s relative error ‖v_other − v_dense‖ / ‖v_dense‖ (mean over the batch) per step
    (``calls_per_step`` calls a step, steps counted modulo ``steps``)."""

    def __init__(self, dense: torch.nn.Module, other: torch.nn.Module, steps: int, calls_per_step: int = 1):
        super().__init__()
        self.dense, self.other, self.steps, self.calls = dense, other, int(steps), 0
        self.calls_per_step = int(calls_per_step)
        self.errors: list[list[float]] = [[] for _ in range(self.steps)]

    def forward(self, *args, **kwargs):
        d = self.dense(*args, **kwargs)
        o = self.other(*args, **kwargs)
        self.errors[(self.calls // self.calls_per_step) % self.steps].append(
            float(_rel(_prediction(o), _prediction(d)).mean()))
        self.calls += 1
        return d

    def per_step(self) -> list[float]:
        return [float(np.mean(e)) if e else float("nan") for e in self.errors]


def run_equal_probe(settings: list[Setting], seeds, windows: list[tuple[int, int]], out_csv: str,
                    evaluator: Evaluator | None = None, progress: bool = True, **ev_kwargs) -> pd.DataFrame:
    """The confound check of ``run_injection``: for each setting and seed, measure the pruned model's relative
    prediction error at every step along the dense trajectory (``ErrorMeter``), then sample with an error of the
    same relative size — its mean over the steps — added to the dense prediction in each window only
    (``OutputNoise``), scored like ``run_injection``'s rows. Rows carry ``rel`` (the probe's size) and
    ``rel_error_steps`` (the pruned model's error per step, ';'-joined); cached in ``out_csv``."""
    ev = evaluator or Evaluator(**ev_kwargs)
    tag = cache_tag(ev)
    done = read_cache(out_csv)
    keys = set(done["key"]) if "key" in done else set()
    rows = done.to_dict("records")

    def key(s, sd, w):
        return f"{tag}|{s.key(sd)}{window_tail(w, EQUAL_PROBE)}"

    todo = [(s, sd) for sd in seeds for s in settings if any(key(s, sd, w) not in keys for w in windows)]
    for s, sd in tqdm(todo, desc=os.path.basename(out_csv), disable=not progress):
        steps = s.eval_steps or DEFAULT_SAMPLING["num_inference_steps"]
        pruned, _ = pruned_pipeline(ev.model_dir, s, sd)
        dense, twin = load_pipeline(ev.model_dir), load_pipeline(ev.model_dir).transformer
        meter = ErrorMeter(twin, pruned.transformer, steps, _calls(dense, s))
        with StepSwitch(dense.transformer, meter, (1, steps), steps, _calls(dense, s)):
            ev.images(dense, s, sd)
        per_step = meter.per_step()
        rel = float(np.mean(per_step))
        for w in windows:
            if key(s, sd, w) in keys:
                continue
            with StepSwitch(dense.transformer, OutputNoise(twin, rel, sd), w, steps, _calls(dense, s)):
                images = ev.images(dense, s, sd)
            row = {k: v for k, v in s.__dict__.items() if k != "extra"}
            row.update(seed=sd, window=window_label(w), first=w[0], last=w[1], steps=steps, rel=rel,
                       rel_error_steps=";".join(f"{x:.6g}" for x in per_step), **ev.score(images, s, sd),
                       key=key(s, sd, w))
            rows.append(row)
            write_csv(pd.concat([read_cache(out_csv, others=True), pd.DataFrame(rows)], ignore_index=True), out_csv)
    df = pd.DataFrame(rows)
    wanted = {key(s, sd, w) for s in settings for sd in seeds for w in windows}
    return df[df["key"].isin(wanted)].reset_index(drop=True)


def window_images(setting: Setting, seed: int, windows: list[tuple[int, int]], prompts: int, model_dir: str,
                  evaluator: Evaluator | None = None) -> tuple[np.ndarray, list[str]]:
    """The first ``prompts`` held-out prompts of ``seed`` sampled dense, pruned in each window, and pruned at every
    step: images (rows: dense, windows..., all steps; ``prompts`` columns) and one label per row, for a grid."""
    ev = evaluator or Evaluator(model_dir=model_dir, num_prompts=prompts)
    steps = setting.eval_steps or DEFAULT_SAMPLING["num_inference_steps"]
    pruned, _ = pruned_pipeline(ev.model_dir, setting, seed)
    dense = load_pipeline(ev.model_dir)
    rows, labels = [ev.images(dense, setting, seed)[:prompts]], [DENSE]
    for w in windows:
        with StepSwitch(dense.transformer, pruned.transformer, w, steps, _calls(dense, setting)):
            rows.append(ev.images(dense, setting, seed)[:prompts])
        labels.append(window_label(w))
    rows.append(ev.images(pruned, setting, seed)[:prompts])
    labels.append(WHOLE)
    return np.concatenate(rows), labels


def _calls(pipe, s: Setting) -> int:
    """Denoiser calls per step when ``pipe`` samples a setting's evaluation (2 under the Flux model's true CFG)."""
    from ..sampling import calls_per_step

    return calls_per_step(pipe, s.eval_guidance)


def setting_label(row) -> str:
    """'50% unstructured', '2:4', '20% structured' from a row's pattern and sparsity."""
    if row["pattern"] in ("unstructured", "structured"):
        return f"{row['sparsity']:.0%} {row['pattern']}"
    return str(row["pattern"])


WHOLE, DENSE = "all steps", "none (dense)"


def injection_frame(injected: pd.DataFrame, whole: pd.DataFrame) -> pd.DataFrame:
    """The window rows of ``run_injection`` together with, for each of their settings, the same prune active at
    every step (``WHOLE``) and the dense model (``DENSE``) from ``whole`` (study rows, ``run_grid``), labelled by a
    ``setting`` column, so every window can be compared, paired, with both ends."""
    injected = injected.assign(setting=[setting_label(r) for _, r in injected.iterrows()])
    parts = [injected]
    dense = whole[whole.method == "dense"]
    for label, g in injected.groupby("setting", sort=False):
        r = g.iloc[0]
        same = whole[(whole.method == r.method) & (whole.pattern == r.pattern) & np.isclose(whole.sparsity, r.sparsity)
                     & (whole.weighting == r.weighting)]
        parts += [same.assign(setting=label, window=WHOLE, first=1, last=r.steps),
                  dense.assign(setting=label, window=DENSE, first=0, last=0)]
    return pd.concat(parts, ignore_index=True)


def pooled_psnr(psnr_db) -> float:
    """PSNR of the pooled MSE of images whose per-image PSNRs (data range 1) are given: −10·log10(mean 10^(−dB/10)).
    One badly changed image weighs by its error, not by its decibels, so this reading and the mean of per-image
    dB can order two settings differently."""
    x = np.asarray(psnr_db, dtype=float)
    return float(-10 * np.log10(np.mean(10 ** (-x / 10))))


PREMISE_COLUMNS = {"mean_db": "mean of per-image PSNR (dB)", "pooled_db": "PSNR of the pooled MSE (dB)",
                   "median_db": "median PSNR (dB)", "below_30db": "images below 30 dB", "ssim": "mean SSIM",
                   "prompt_fidelity": "prompt fidelity", "fidelity_flips": "prompts whose verdict flips vs dense",
                   "composition_changed": "images whose composition changed (the evaluator reads it differently)",
                   "fid": "FID to the renders (evaluator features)"}


def premise_metrics(frame: pd.DataFrame, threshold_db: float = 30.0) -> pd.DataFrame:
    """Every reading of "how much did the images change" per setting and window of an ``injection_frame``: the mean,
    pooled-MSE and median PSNR, the share of images below ``threshold_db``, mean SSIM, prompt fidelity, and the share
    of (seed, prompt) pairs whose prompt-fidelity verdict differs from the dense image's (the evaluator reads the
    composition differently), the share of images whose composition changed — the evaluator's reading of the image
    (count, arrangement, background, each shape's kind, colour and size) scores another share of the prompt's
    attributes than its reading of the dense image of the same prompt and seed: a reading that changed between two
    wrong values escapes it, so it is a lower bound on changed readings, and, unlike PSNR, blind to changes the
    evaluator does not read (a shape moved by a pixel) — and the mean FID of the seeds' images to the ground-truth renders (the evaluator's
    features: a distribution distance, not a per-image one). Each answers another question: the mean of dB weighs every image alike (a typical
    image), the pooled MSE weighs images by their error (total pixel damage, dominated by a few heavily changed
    images), the median and the share below 30 dB separate "a few images a lot" from "every image a little"."""
    rows = []
    dense = frame[frame.window == DENSE]
    for (setting, window), g in frame[frame.window != DENSE].groupby(["setting", "window"], sort=False):
        psnr, _ = outcomes(g, "psnr")
        ssim, _ = outcomes(g, "ssim")
        fid, seeds = outcomes(g, "prompt_fidelity")
        d = dense[dense.setting == setting]
        flips = changed = np.nan
        if len(d) and set(seeds) <= set(d.seed):
            dfid, _ = outcomes(d[d.seed.isin(seeds)], "prompt_fidelity")
            flips = float(np.mean(dfid != fid))
            if "pp_attributes" in g and "pp_attributes" in d:
                att, _ = outcomes(g, "attribute_accuracy")
                datt, _ = outcomes(d[d.seed.isin(seeds)], "attribute_accuracy")
                changed = float(np.mean(np.abs(att - datt) > 1e-9))
        rows.append({"setting": setting, "window": window, "first": int(g["first"].iloc[0]), "last": int(g["last"].iloc[0]),
                     "mean_db": float(psnr.mean()), "pooled_db": pooled_psnr(psnr), "median_db": float(np.median(psnr)),
                     "below_30db": float(np.mean(psnr < threshold_db)), "ssim": float(ssim.mean()),
                     "prompt_fidelity": float(fid.mean()), "fidelity_flips": flips, "composition_changed": changed,
                     "fid": float(g["fid"].mean()) if "fid" in g else np.nan, "images": psnr.size})
    return pd.DataFrame(rows)


def which_half_hurts_more(premise: pd.DataFrame, col: str, higher: bool = True) -> str | None:
    """From one setting's ``premise_metrics`` rows: 'the first half', 'the second half' or 'neither' hurts more on
    ``col`` (``higher``: a higher value means less harm), comparing the windows of steps 1-10 and 11-20; None when
    either half or the column is missing."""
    h = premise[premise.window.isin(["steps 1-10", "steps 11-20"])].set_index("window")
    if len(h) < 2 or col not in h or h[col].isna().any():
        return None
    e, late = h.loc["steps 1-10", col], h.loc["steps 11-20", col]
    return "neither" if e == late else "the first half" if (e < late) == higher else "the second half"


def window_means(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per setting and window: the mean of a metric over seeds x prompts and its 95% interval (the two-level
    bootstrap of ``obslib.study.compare``: seeds, then prompts)."""
    rows = []
    for (setting, window), g in df.groupby(["setting", "window"], sort=False):
        if g[PAIRED[metric][0]].isna().any():  # the dense model has no PSNR against itself
            continue
        x, _ = outcomes(g, metric)
        mean, lo, hi = paired_bootstrap(x, np.zeros_like(x))
        rows.append({"setting": setting, "window": window, "first": int(g["first"].iloc[0]),
                     "last": int(g["last"].iloc[0]), "metric": metric, "mean": mean, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def strength_settings(base: Setting, schemes=("log-decrease", "log-increase"), ratios=(1.5, 4, 16, 100),
                      one_sided=("first-half", "second-half")) -> list[Setting]:
    """``base`` with each scheme at each ratio alpha_max / alpha_min (mean-1 pairs from ``alpha_range``; 1.5 is
    the paper's default and is left as the default row), and the one-sided schemes at ratio ``ONLY``."""
    out = []
    for w in schemes:
        for r in ratios:
            extra = {} if r == 1.5 else dict(zip(("alpha_min", "alpha_max"), alpha_range(r)))
            out.append(Setting(**{**base.__dict__, "weighting": w, "extra": {**base.extra, **extra}}))
    for w in one_sided:
        extra = dict(zip(("alpha_min", "alpha_max"), alpha_range(ONLY)))
        out.append(Setting(**{**base.__dict__, "weighting": w, "extra": {**base.extra, **extra}}))
    return out


def label_strength(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``weighting_label`` column (``strength_label`` of each row)."""
    return df.assign(weighting_label=[strength_label(r) for _, r in df.iterrows()])


def strength_label(row) -> str:
    """'log-decrease ×16' from a study row's weighting and alpha columns (no alpha columns: the default ×1.5)."""
    lo, hi = row.get("extra_alpha_min", np.nan), row.get("extra_alpha_max", np.nan)
    if row["weighting"] in ("uniform", "sensitivity"):
        return row["weighting"]
    if lo is None or not np.isfinite(lo):
        return f"{row['weighting']} ×1.5"
    r = hi / lo
    return f"{row['weighting']} only" if r >= ONLY / 2 else f"{row['weighting']} ×{r:.3g}"


# ------------------------------------------------------------------ per-step statistics of a few layers
def representative_layers(den, kinds=("attn.to_q", "attn.to_out.0", "ff.net.2")) -> list[str]:
    """The named kinds of layer in the first, middle and last transformer block."""
    n = len(den.transformer_blocks)
    names = []
    for b in sorted({0, n // 2, n - 1}):
        for k in kinds:
            name = f"transformer_blocks.{b}.{k}"
            try:
                den.get_submodule(name)
            except AttributeError:
                continue
            names.append(name)
    return names


def step_statistics(pipe, layer_names: list[str], prompts: list[str], seed: int = 0, progress: bool = False) -> dict:
    """Per-step input statistics (``LayerStats`` with ``per_step=True``) of named denoiser layers over one
    calibration run of the prompts at the model's sampling defaults (uniform weights)."""
    return collect_stats(pipe, layer_names, prompts, weighting="uniform", seed=seed, progress=progress, per_step=True)


def hessian_spread(stats: dict) -> pd.DataFrame:
    """Per layer and step: ||H_t - H_mean||_F / ||H_mean||_F (H_mean: every step weighted alike), and the step's
    mean input energy relative to the layer's mean."""
    rows = []
    for name, st in stats.items():
        Hm = st.weighted_H([1.0] * len(st.step_xtx))
        norm = float(torch.linalg.matrix_norm(Hm))
        for t in sorted(st.step_xtx):
            Ht = st.step_H(t)
            rows.append({"layer": name, "step": t, "rel_distance": float(torch.linalg.matrix_norm(Ht - Hm)) / norm,
                         "energy": float(Ht.diagonal().sum() / Hm.diagonal().sum())})
    return pd.DataFrame(rows)


def weightings(steps: int, schemes=("log-decrease", "log-increase"), ratios=(1.5, 4, 16, 100),
               one_sided=("first-half", "second-half")) -> dict[str, list[float]]:
    """label -> alpha_1..alpha_T of every weighting of the strength sweep (labels as ``strength_label``)."""
    out = {}
    for w in schemes:
        for r in ratios:
            out[f"{w} ×{r:g}"] = timestep_weights(w, steps, *alpha_range(r))
    for w in one_sided:
        out[f"{w} only"] = timestep_weights(w, steps, *alpha_range(ONLY))
    return out


def mask_shift(den, stats: dict, alphas: dict[str, list[float]], sparsity: float = 0.5, n: int = 0,
               m: int = 0) -> pd.DataFrame:
    """For each layer and weighting: how far its H is from the uniform one (relative Frobenius distance), the
    share of weight positions whose OBS mask differs from the uniform Hessian's mask, and the layer error of both
    solutions on the uniform H (every step counted alike) and on the weighting's own H."""
    rows = []
    for name, st in stats.items():
        W = weight_matrix(den.get_submodule(name)).float()
        Hu = st.weighted_H([1.0] * len(st.step_xtx))
        Wu, Mu = obs_prune(W, Hu, sparsity, n, m)[:2]
        err_u = reconstruction_error(W, Wu, Hu)
        for label, a in alphas.items():
            Hw = st.weighted_H(a)
            Ww, Mw = obs_prune(W, Hw, sparsity, n, m)[:2]
            rows.append({"layer": name, "weighting": label,
                         "h_distance": float(torch.linalg.matrix_norm(Hw - Hu) / torch.linalg.matrix_norm(Hu)),
                         "mask_differs": float((Mw != Mu).float().mean()),
                         "error_uniform_H": reconstruction_error(W, Ww, Hu), "error_uniform_H_of_uniform": err_u,
                         "error_own_H": reconstruction_error(W, Ww, Hw),
                         "error_own_H_of_uniform": reconstruction_error(W, Wu, Hw)})
    df = pd.DataFrame(rows)
    df["error_change_uniform_H"] = df.error_uniform_H / df.error_uniform_H_of_uniform - 1
    df["error_change_own_H"] = df.error_own_H / df.error_own_H_of_uniform - 1
    return df



def premise_reading(c: dict, what: str) -> str:
    """What a comparison 'pruned only in the earlier steps − only in the later steps' says about the premise: a
    lower value for the earlier steps means early errors hurt more."""
    return {BEHIND: f"early errors hurt {what} more (supports the premise)",
            AHEAD: f"late errors hurt {what} more (against the premise)",
            NONE: f"the two are not told apart on {what}"}[c["verdict"]]
