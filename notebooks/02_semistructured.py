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
# # 02 · Semi-structured N:M sparsity (Table 2 analogue)
#
# **The question.** Does OBS-Diff keep its lead when the sparsity pattern is the hardware-friendly N:M (N of every M consecutive inputs of a row removed)? The paper (Table 2, SD3.5-Large 2:4, blocks 3–25) reports ImageReward .45 for OBS-Diff against −.14 (Wanda), .03 (DSnoT) and −.47 (magnitude), with FID within one point of the dense model.
#
# 2:4 and 4:8 patterns (N of every M consecutive inputs of each row removed) for every unstructured method.
#
# Metrics: **PSNR vs dense** (how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single attributes found) and FID on the evaluator's features.
#
# Every quality number is the mean over `S['seeds']` seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. Prompt fidelity also carries, in brackets, its 95% Wilson interval pooled over seeds × prompts: with 64 held-out prompts a share near 0.8 is only known to about ±0.1, whatever the seeds say. KID is unbiased, so a model the evaluator cannot tell from the real images scores around 0, negative values included; its own standard error is given beside it where the run computed it. Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks 01–03 is `results/methods_table.csv`.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
methods = ["magnitude", "wanda", "dsnot", "sparsegpt", "obs-diff"]
patterns = ["2:4", "4:8"]

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
# The same methods and calibration as notebook 01, at 2:4 and 4:8 (both 50%). 4:8 is the looser pattern: each group of eight may keep its four best weights, so it should sit between 2:4 and unstructured 50%.

# %%
grid = [ex.Setting(method="dense", num_calib=S["num_calib"])]
grid += [ex.Setting(method=m, pattern=p, sparsity=0.5, num_calib=S["num_calib"]) for m in methods for p in patterns]
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), 'rows')

# %% [markdown]
# ## The table
#
# One row per method and pattern. The dense row is the reference (PSNR infinite).

# %%
summary = ex.summarize(df, ["method", "pattern"])
summary.to_csv(f"{S['results']}/02_semistructured.csv", index=False)
ex.format_table(summary, ["method", "pattern"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))

# %% [markdown]
# ## The figure
#
# PSNR against the dense model per method, 2:4 beside 4:8; error bars are one standard deviation over seeds.

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
sns.barplot(df[df.method != "dense"], x="method", y="psnr", hue="pattern", errorbar="sd", ax=ax)
ax.set_ylabel("PSNR vs dense (dB)")
plots.save(fig, f"{S['figures']}/02_nm_fidelity.png")

# %% [markdown]
# ## Finding
#
# Computed from the numbers above (a gap counts when it is larger than both standard deviations over seeds and, for prompt fidelity, the two 95% intervals do not overlap; in quick mode there is one seed and no verdict):

# %%
for pattern in [p for p in summary.pattern.unique() if ":" in str(p)]:
    print(pattern)
    for other in ("wanda", "magnitude", "sparsegpt"):
        for metric in ("prompt_fidelity", "psnr"):
            print("   ", ex.versus(summary, {"pattern": pattern}, "method", "obs-diff", other, metric))

# %% [markdown]
# ## Try next
#
# `patterns` takes any of `2:4`, `4:8`; on a GPU notebook 07 times the 2:4 kernels. Compare with the 50% rows of notebook 01 to see what the pattern costs.

# %%
assert (abs(df[df.method != "dense"].sparsity_actual - 0.5) < 0.01).all()
