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
# # 04 · Timestep weighting ablation (Table 6 analogue)
#
# **The question.** Does weighting the calibration steps matter, and is the paper's log-decrease (early, noisy steps weigh more) the best scheme? The paper (Table 6, SD3-Medium 50%) ranks log-decrease first with ImageReward .6438, within .03 of every other scheme (uniform .6355).
#
# OBS-Diff at one sparsity with every weighting scheme: the paper's five and our exponential and cosine decreases.
#
# Metrics: **PSNR vs dense** (how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single attributes found) and FID on the evaluator's features.
#
# Every quality number is the mean over `S['seeds']` seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. Prompt fidelity also carries, in brackets, its 95% Wilson interval pooled over seeds × prompts: with 64 held-out prompts a share near 0.8 is only known to about ±0.1, whatever the seeds say. KID is unbiased, so a model the evaluator cannot tell from the real images scores around 0, negative values included; its own standard error is given beside it where the run computed it. Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks 01–03 is `results/methods_table.csv`.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
sparsity = 0.6

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
# OBS-Diff at 60% sparsity (where differences show most in notebook 01) with every scheme: the paper's five and our exponential and cosine decreases; everything else as in notebook 01.

# %%
grid = [ex.Setting(method="obs-diff", sparsity=sparsity, weighting=w, num_calib=S["num_calib"]) for w in obslib.SCHEMES]
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), 'rows')

# %% [markdown]
# ## The table
#
# One row per weighting, best prompt fidelity first.

# %%
summary = ex.summarize(df, ["weighting"]).sort_values("prompt_fidelity_mean", ascending=False)
summary.to_csv(f"{S['results']}/04_weighting.csv", index=False)
ex.format_table(summary, ["weighting"], ("psnr", "attribute_accuracy", "fid", "kid"))

# %% [markdown]
# ## The figure
#
# PSNR against the dense model per scheme, with one standard deviation over seeds.

# %%
fig, ax = plt.subplots(figsize=(8, 3.4))
sns.barplot(df, x="weighting", y="psnr", errorbar="sd", ax=ax, order=summary.weighting)
ax.tick_params(axis="x", rotation=30)
plots.save(fig, f"{S['figures']}/04_weighting.png")

# %% [markdown]
# ## Finding
#
# Computed from the numbers above (a gap counts when it is larger than both standard deviations over seeds and, for prompt fidelity, the two 95% intervals do not overlap; in quick mode there is one seed and no verdict):

# %%
best = summary.iloc[0].weighting
print("best prompt fidelity:", best)
for metric in ("prompt_fidelity", "psnr"):
    print(ex.versus(summary, {}, "weighting", "log-decrease", "uniform", metric))
    print(ex.versus(summary, {}, "weighting", best, "log-decrease", metric))

# %% [markdown]
# ## Try next
#
# Change `sparsity`, or `alpha_min`/`alpha_max` through a setting's `extra` (the public defaults are 0.8 / 1.2; a wider range makes the schemes differ more).

# %%
assert set(df.weighting) == set(obslib.SCHEMES)
