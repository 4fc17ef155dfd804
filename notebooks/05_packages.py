# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Module packages and how to calibrate them (Table 7 analogue)
#
# **The question.** How many module packages, and must every package be calibrated by sampling again? Each package is calibrated through the already-pruned earlier ones, so more packages hold fewer Hessians at once. The paper (Table 7, SD3-Medium 30%) finds memory 30.7 → 22.1 GB and time 572 → 2,595 s from K = 1 to 20 (4.5×, every package re-runs full sampling), with “no clear relation” to quality.
#
# K contiguous packages of basic units, each calibrated through the already-pruned earlier packages. More packages hold fewer Hessians at once but, calibrated the paper's way (`resample`: full sampling for every package), cost one sampling pass each. `propagate` samples once with the dense model, records what enters the first block, and calibrates each package by replaying that record through its own blocks only, the earlier packages already pruned (as SparseGPT does layer by layer); only the latents' trajectory stays dense. `block` = one package per transformer block, `unit` = one per basic unit (the most packages there can be). Memory is the largest set of float32 Hessians held at once.
#
# Metrics: **PSNR vs dense** (how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single attributes found) and FID on the evaluator's features.
#
# Every quality number is the mean over `S['seeds']` seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. Prompt fidelity also carries, in brackets, its 95% Wilson interval pooled over seeds × prompts: with 64 held-out prompts a share near 0.8 is only known to about ±0.1, whatever the seeds say. KID is unbiased, so a model the evaluator cannot tell from the real images scores around 0, negative values included; its own standard error is given beside it where the run computed it. Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks 01–03 is `results/methods_table.csv`.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
sparsity = 0.5
calibrations = ["resample", "propagate"]

# %%
import os, json
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
import obslib
from obslib import study, experiments as ex, plots
from obslib.shapes import prompts
S = study.settings(mode)          # grid sizes of this mode and output folders
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
print(S["mode"], "->", S["results"])

# %% [markdown]
# ## What runs, and why these settings
#
# OBS-Diff at 50% with K = 1, 2, 4, 8, one package per block and one per basic unit, each calibrated both ways (`resample`, the paper's; `propagate`, ours). The question for propagate: does K = every unit cost at most 1.5× of K = 1 while its quality stays within the seeds' spread of resample?

# %%
den = obslib.load_pipeline(S["model_dir"]).transformer
n_blocks = len(obslib.archs.iter_blocks(den, obslib.archs.SD3))
n_units = len(obslib.packages.layer_units(den, obslib.archs.SD3, list(range(n_blocks))))
ks = [n_blocks if k == "block" else n_units if k == "unit" else k for k in S["packages"]]
grid = [ex.Setting(method="obs-diff", sparsity=sparsity, packages=k, num_calib=S["num_calib"],
                   extra={"calibration": c}) for c in calibrations for k in ks]
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), 'rows')

# %% [markdown]
# ## The table
#
# One row per calibration and K: quality, prune time (calibration + solve), calibration time, the peak Hessian memory and the time relative to the same calibration's K = 1.

# %%
df["calibration"] = df.extra_calibration
summary = ex.summarize(df, ["calibration", "packages"], ex.METRICS + ("prune_s", "calibration_s", "hessian_mb"))
summary.to_csv(f"{S['results']}/05_packages.csv", index=False)
t = ex.format_table(summary, ["calibration", "packages"], ("psnr", "prompt_fidelity", "attribute_accuracy", "prune_s"))
t["calibration_s"] = summary.calibration_s_mean.round(1)
t["hessian_MiB"] = summary.hessian_mb_mean.round(2)
k1 = summary[summary.packages == 1].set_index("calibration").prune_s_mean
t["time_vs_K1"] = (summary.prune_s_mean / summary.calibration.map(k1)).round(2).values
t

# %% [markdown]
# ## The figure
#
# Peak Hessian memory, prune time and PSNR against K, one line per calibration.

# %%
fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
for a, (m, lab) in zip(ax, [("hessian_mb", "peak Hessian memory (MiB)"), ("prune_s", "prune time (s)"), ("psnr", "PSNR vs dense (dB)")]):
    sns.pointplot(df, x="packages", y=m, hue="calibration", errorbar="sd", ax=a, dodge=0.2); a.set_ylabel(lab)
plots.save(fig, f"{S['figures']}/05_packages.png")

# %% [markdown]
# ## Finding
#
# Computed from the numbers above (a gap counts when it is larger than both standard deviations over seeds and, for prompt fidelity, the two 95% intervals do not overlap; in quick mode there is one seed and no verdict):

# %%
s = summary.set_index(["calibration", "packages"])
k_lo, k_hi = summary.packages.min(), summary.packages.max()
for c in summary.calibration.unique():
    lo, hi = s.loc[(c, k_lo)], s.loc[(c, k_hi)]
    print(f"{c}: K={k_lo} -> K={k_hi}: Hessian memory {lo.hessian_mb_mean:.1f} -> {hi.hessian_mb_mean:.1f} MiB, "
          f"prune time {lo.prune_s_mean:.1f} -> {hi.prune_s_mean:.1f} s ({hi.prune_s_mean / lo.prune_s_mean:.2f}x)")
for k in sorted(summary.packages.unique()):
    for metric in ("prompt_fidelity", "psnr"):
        print(ex.versus(summary, {"packages": k}, "calibration", "propagate", "resample", metric))

# %% [markdown]
# ## Try next
#
# `S['packages']` takes any K (and `block`, `unit`). On a real model, watch the memory line each package prints (and the record's size in propagate mode: it goes to disk above `--record-ram-mb`); `--resume` makes many packages safe to interrupt. Notebook 07 has the solver's speed, `results/scale.md` the projection to real model sizes.

# %%
for c, part in summary.groupby("calibration"):
    assert part.hessian_mb_mean.is_monotonic_decreasing or len(part) < 2
one = summary[summary.packages == 1].set_index("calibration")
if len(one) == 2:  # K = 1: propagate samples exactly as resample does (same Hessians, same model)
    assert abs(one.loc["propagate", "psnr_mean"] - one.loc["resample", "psnr_mean"]) < 1e-6
