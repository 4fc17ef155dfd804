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
# 2:4 and 4:8 patterns (both 50%) for every unstructured method, and OBS-Diff's unstructured 50% from notebook 01 (the same cached rows) to see what the pattern costs. Metrics, seeds and the paired comparisons are defined in the [glossary](00_walkthrough.ipynb#Glossary-of-the-metrics); verdicts across chapters: [results/claims.md](../results/claims.md).

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
model_dir = None  # another embedded model, e.g. "models/shapes-flux": its tables and figures go to results/<name>/ and figures/<name>/ (default: models/shapes-sd3)
methods = ["magnitude", "wanda", "dsnot", "sparsegpt", "obs-diff"]
patterns = ["2:4", "4:8"]

# %%
import os
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
import obslib
from obslib import study
from obslib.study import experiments as ex, plots, compare as cmp
S = study.settings(mode, model_dir)  # grid sizes of this mode, the model and output folders
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
print(S["mode"], "mode: tables ->", study.rel(S["results"]), "| figures ->", study.rel(S["figures"]))

# %% [markdown]
# ## What runs, and why these settings
#
# The same methods and calibration as notebook 01, at 2:4 and 4:8. Both remove half of every row; 4:8 lets each group of eight keep its four best weights, a looser constraint than 2:4 and a tighter one than unstructured 50% (any half of the row). Whether the looser pattern costs less quality is measured below, not assumed.

# %%
grid = [ex.Setting(method="dense", num_calib=S["num_calib"]), ex.Setting(method="obs-diff", sparsity=0.5, num_calib=S["num_calib"])]
grid += [ex.Setting(method=m, pattern=p, sparsity=0.5, num_calib=S["num_calib"]) for m in methods for p in patterns]
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), "rows:", df.seed.nunique(), "seeds ×", int(df.n_prompts.iloc[0]), "held-out prompts per setting")

# %% [markdown]
# ## The table
#
# One row per method and pattern (`unstructured` = OBS-Diff at 50% from notebook 01): mean ± standard deviation over seeds.

# %%
summary = ex.summarize(df, ["method", "pattern"])
summary.to_csv(f"{S['results']}/02_semistructured.csv", index=False)
ex.format_table(summary, ["method", "pattern"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))

# %% [markdown]
# ## Paired comparisons
#
# OBS-Diff against every other method under each pattern, and OBS-Diff's three 50% patterns against each other (4:8 − 2:4, unstructured − 4:8).

# %%
# NBVAL_CHECK_OUTPUT
C = []
for p in patterns:
    for other in [m for m in methods if m != "obs-diff"]:
        C += cmp.compare_in(df, "method", "obs-diff", other, where={"pattern": p}, metrics=("prompt_fidelity", "psnr"),
                            chapter="02 semi-structured", context=f"At {p}")
obs = df[df.method == "obs-diff"]
P = [("4:8", "2:4")] + ([("unstructured", "4:8")] if "4:8" in patterns else [])
for a, b in P:
    C += cmp.compare_in(obs, "pattern", a, b, metrics=("prompt_fidelity", "psnr"), chapter="02 semi-structured",
                        context="OBS-Diff patterns")
cmp.write_comparisons(C, "02 semi-structured", f"{S['results']}/comparisons.csv")
cmp.table(C)

# %% [markdown]
# ## The figure
#
# Paired differences with their 95% intervals: OBS-Diff minus each method under each pattern (left: prompt fidelity; right: PSNR against the dense images), and at the bottom OBS-Diff's patterns against each other. A filled dot's interval excludes zero.

# %%
plots.paired_panels(C, f"{S['figures']}/02_nm_fidelity.png")

# %% [markdown]
# ## Answer
#
# Generated from the comparisons just computed.

# %%
# NBVAL_CHECK_OUTPUT
for p in patterns:
    sub = [c for c in C if c["context"] == f"At {p}"]
    for line in cmp.summary_line(sub, "prompt_fidelity") + cmp.summary_line(sub, "psnr"):
        print(line)
for c in C:
    if c["context"] == "OBS-Diff patterns":
        print(cmp.sentence(c))
m = summary[summary.method == "obs-diff"].set_index("pattern").psnr_mean
order = " > ".join(f"{k} ({m[k]:.2f} dB)" for k in m.sort_values(ascending=False).index)
print(f"OBS-Diff's PSNR by pattern, highest first: {order}. "
      "This study scores fidelity to the dense images, not hardware speed: the 2:4 kernels are timed only on a GPU (notebook 07).")

# %% [markdown]
# ## Try next
#
# `patterns` takes any of `2:4`, `4:8`; on a GPU notebook 07 times the 2:4 kernels. The paper pruned only blocks 3–25 of SD3.5-Large at 2:4: pass `block_range` in a setting's `extra` to do the same.

# %%
assert (abs(df[df.method != "dense"].sparsity_actual - 0.5) < 0.01).all()
