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
# # 01 · Unstructured sparsity (Table 1 and Fig. 4 analogues)
#
# **The question.** How much of every attention and FFN weight matrix can be zeroed before the images change, and does OBS-Diff's compensated, timestep-weighted solver beat the calibration-free and compensation-free baselines? The paper (Table 1, Fig. 4) says yes by a wide margin on SD3-Medium: at 50% ImageReward .65 for OBS-Diff against −.11 (Wanda), −.59 (DSnoT) and −2.27 (magnitude), and the gap widens at 60%.
#
# Every method at 30–70% unstructured sparsity of all attention/FFN linear layers of the MMDiT, calibrated with the same prompts, packages (K = 4) and log-decrease weighting (SparseGPT = the same solver with uniform weights).
#
# Metrics: **PSNR vs dense** (how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single attributes found) and FID on the evaluator's features.
#
# Every quality number is the mean over `S['seeds']` seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. Prompt fidelity also carries, in brackets, its 95% Wilson interval pooled over seeds × prompts: with 64 held-out prompts a share near 0.8 is only known to about ±0.1, whatever the seeds say. KID is unbiased, so a model the evaluator cannot tell from the real images scores around 0, negative values included; its own standard error is given beside it where the run computed it. Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks 01–03 is `results/methods_table.csv`.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
methods = ["magnitude", "wanda", "dsnot", "sparsegpt", "obs-diff"]

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
# Every method prunes the same layers (all linear layers of every MMDiT block) at 30–70% with the same 16 calibration prompts, K = 4 packages and log-decrease weights, so the only difference is the criterion and the weight update. SparseGPT is OBS-Diff's own solver with uniform timestep weights: the pair isolates the weighting.

# %%
grid = [ex.Setting(method="dense", num_calib=S["num_calib"])]
grid += [ex.Setting(method=m, sparsity=s, num_calib=S["num_calib"]) for m in methods for s in S["sparsities"]]
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), 'rows')

# %% [markdown]
# ## The table
#
# One row per method and sparsity (50% and 60% shown; every sparsity is in `results/01_unstructured.csv`). Higher is better for PSNR, prompt fidelity and attribute accuracy; lower for FID; `prune_s` is the wall time of the prune on this machine.

# %%
summary = ex.summarize(df, ["method", "sparsity"])
summary.to_csv(f"{S['results']}/01_unstructured.csv", index=False)
ex.format_table(summary[summary.sparsity.isin([0.0, 0.5, 0.6])], ["method", "sparsity"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))

# %% [markdown]
# ## The figure
#
# Left: PSNR against the dense model's images — the closeness OBS-Diff optimises. Right: prompt fidelity, with the dense model as a dashed line. Bands are one standard deviation over seeds. Look for the sparsity where each curve leaves the dense line, and for the order of the methods at 60–70%.

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
curves = summary[summary.method != "dense"]
plots.metric_lines(curves, "sparsity", "method", "psnr", ax[0], "PSNR vs dense (dB)")
plots.metric_lines(curves, "sparsity", "method", "prompt_fidelity", ax[1], "prompt fidelity (held-out)")
dense = summary[summary.method == "dense"].iloc[0]
ax[1].axhline(dense.prompt_fidelity_mean, color="k", ls="--", lw=1, label="dense")
plots.save(fig, f"{S['figures']}/01_quality_vs_sparsity.png")

# %% [markdown]
# ## Finding
#
# Computed from the numbers above (a gap counts when it is larger than both standard deviations over seeds and, for prompt fidelity, the two 95% intervals do not overlap; in quick mode there is one seed and no verdict):

# %%
for sp in sorted(summary[summary.method != "dense"].sparsity.unique()):
    print(f"{sp:.0%}")
    for other in ("wanda", "magnitude", "sparsegpt"):
        for metric in ("prompt_fidelity", "psnr"):
            print("   ", ex.versus(summary, {"sparsity": sp}, "method", "obs-diff", other, metric))

# %% [markdown]
# ## Try next
#
# Change `methods` or the grid's `num_calib` (more calibration prompts), or pass `block_range` in a setting's `extra` to prune only some blocks (as the paper did for SD3.5-Large 2:4). Notebook 02 asks the same question for N:M patterns, notebook 04 whether the weighting matters.

# %%
pruned = df[df.method != "dense"]
assert (abs(pruned.sparsity_actual - pruned.sparsity) < 0.01).all()
assert df.prompt_fidelity.between(0, 1).all() and df.attribute_accuracy.between(0, 1).all() and (df.fid >= 0).all()
