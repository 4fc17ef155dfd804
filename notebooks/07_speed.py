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
# # 07 · Speed
#
# **The question.** Does a structurally pruned model actually run faster, and by as much as its FLOPs drop? The paper
# reports one SD3.5-Large block at 1024² (batch 4): 1.03 / 1.20 / 1.29 / 1.31× at 15 / 20 / 25 / 30% structured and
# 1.23× for 2:4 on sparse kernels; no end-to-end timings were published.
#
# Wall time of the dense and the structurally pruned transformer (one CFG-batched forward) and of the whole
# pipeline on the CPU, medians over repeats, with the FLOPs ratio beside it. On a machine with CUDA, the
# 2:4 semi-structured kernels (`torch.sparse.to_sparse_semi_structured`) are timed against dense matmuls;
# without a GPU that cell says so and is skipped. Verdicts across chapters: [results/claims.md](../results/claims.md).

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
sparsities = [0.1, 0.2, 0.3]

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
# ## What runs
#
# OBS-Diff structured at each sparsity (the shapes notebook 03 scores), timed on this machine with
# `S['timing_repeats']` repeats after a warm-up; time only on an idle machine (2 cores slow ~20× under load).
# The table gives medians with min/max; `flops_ratio_inv` is the speedup the FLOPs alone would predict.

# %%
table = ex.speed_table(S["model_dir"], sparsities if S["mode"] == "full" else sparsities[1:2], repeats=S["timing_repeats"],
                      num_calib=S["num_calib"])
table.to_csv(f"{S['results']}/07_speed.csv", index=False)
table

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
t = table.set_index("variant")
t[["transformer_speedup", "pipeline_speedup", "flops_ratio_inv"]].plot.bar(ax=ax)
ax.set_ylabel("× vs dense"); ax.axhline(1, color="k", lw=1)
plots.save(fig, f"{S['figures']}/07_speed.png")

# %% [markdown]
# ## Finding
#
# Measured speedups against what the FLOPs predict (the gap is overhead that does not shrink with width:
# normalisations, attention softmax, the VAE and text encoders in the pipeline):

# %%
for _, r in table[table.variant != "dense"].iterrows():
    print(f"{r.variant}: transformer {r.transformer_speedup:.2f}x, pipeline {r.pipeline_speedup:.2f}x, "
          f"FLOPs predict {r.flops_ratio_inv:.2f}x ({r.params:,} parameters)")

# %% [markdown]
# ## Try next
#
# Run on a GPU (the 2:4 cell then times the sparse kernels), or raise `S['timing_repeats']`. Batch size and image
# size change the balance between the linear layers (which shrink) and everything else.

# %%
cuda = ex.semi_structured_benchmark()
print(cuda["message"])
if cuda["rows"]:
    pd.DataFrame(cuda["rows"]).to_csv(f"{S['results']}/07_speed_2to4_cuda.csv", index=False)
pd.DataFrame(cuda["rows"])

# %%
assert (table.loc[table.variant != "dense", "params"] < table.loc[table.variant == "dense", "params"].iloc[0]).all()
