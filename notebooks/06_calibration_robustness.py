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
# # 06 · Calibration size and robustness (Fig. 3 and App. D analogues)
#
# **The question.** How many calibration prompts does OBS-Diff need, and does a model pruned under one sampling setting hold up under others? The paper (Fig. 3) sees quality rise steeply up to ~100 prompts, then flatten; App. D (SD3-M 50%) shows the pruned model tracking the dense one under other CFG scales, step counts and the Heun sampler.
#
# Quality against the number of calibration prompts; then the pruned model (calibrated at the default CFG, step count and Euler sampler) evaluated with other CFG scales, step counts and the Heun sampler, beside the dense model under the same change.
#
# Metrics: **PSNR vs dense** (how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single attributes found) and FID on the evaluator's features.
#
# Every quality number is the mean over `S['seeds']` seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. Prompt fidelity also carries, in brackets, its 95% Wilson interval pooled over seeds × prompts: with 64 held-out prompts a share near 0.8 is only known to about ±0.1, whatever the seeds say. KID is unbiased, so a model the evaluator cannot tell from the real images scores around 0, negative values included; its own standard error is given beside it where the run computed it. Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks 01–03 is `results/methods_table.csv`.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
sparsity = 0.5

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
# OBS-Diff at 50% with 2–128 calibration prompts; then the model pruned with the default settings (16 prompts, CFG 4, 20 Euler steps) evaluated at other CFG scales, step counts and with Heun, beside the dense model under the same change.

# %%
grid = [ex.Setting(method="obs-diff", sparsity=sparsity, num_calib=n) for n in S["calib_sizes"]]
robust = []
for method in ("dense", "obs-diff"):
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_guidance=g) for g in S["cfg_values"]]
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_steps=st) for st in S["step_values"]]
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_sampler="heun")]
df_r = ex.run_grid(robust, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), 'rows')

# %% [markdown]
# ## The table
#
# First table: quality against the number of calibration prompts. Second: prompt fidelity and FID of dense and pruned under each change of sampling.

# %%
summary = ex.summarize(df, ["num_calib"])
summary.to_csv(f"{S['results']}/06_calibration_size.csv", index=False)
rob = df_r.copy()
rob["change"] = np.select([rob.eval_guidance.notna(), rob.eval_steps.notna(), rob.eval_sampler == "heun"],
                          ["CFG " + rob.eval_guidance.astype(str), "steps " + rob.eval_steps.astype(str), "Heun sampler"], "default")
rsum = ex.summarize(rob, ["change", "method"])
rsum.to_csv(f"{S['results']}/06_robustness.csv", index=False)
display(ex.format_table(summary, ["num_calib"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity")))
ex.format_table(rsum, ["change", "method"], ("prompt_fidelity", "fid"))

# %% [markdown]
# ## The figure
#
# Left: PSNR against the number of calibration prompts (log scale). Right: prompt fidelity of dense and pruned under each change.

# %%
fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
plots.metric_lines(summary.assign(m="obs-diff"), "num_calib", "m", "psnr", ax[0], "PSNR vs dense (dB)"); ax[0].set_xscale("log", base=2)
sns.barplot(rob, x="change", y="prompt_fidelity", hue="method", errorbar="sd", ax=ax[1]); ax[1].tick_params(axis="x", rotation=30)
plots.save(fig, f"{S['figures']}/06_calibration_robustness.png")

# %% [markdown]
# ## Finding
#
# Computed from the numbers above (a gap counts when it is larger than both standard deviations over seeds and, for prompt fidelity, the two 95% intervals do not overlap; in quick mode there is one seed and no verdict):

# %%
n_lo, n_hi = summary.num_calib.min(), summary.num_calib.max()
print(ex.versus(summary, {}, "num_calib", n_hi, n_lo, "psnr"))
for change in rsum.change.unique():
    print(change, "—", ex.versus(rsum, {"change": change}, "method", "dense", "obs-diff"))

# %% [markdown]
# ## Try next
#
# Add sizes to `S['calib_sizes']`, or evaluate with other samplers (`eval_sampler`). The calibration prompts are the training split's; a held-out set would test calibration drift.

# %%
assert len(summary) == len(S["calib_sizes"])
