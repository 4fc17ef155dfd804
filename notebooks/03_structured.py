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
# # 03 · Structured: heads and FFN neurons (Tables 3/4/9 analogues)
#
# **The question.** Can whole attention heads and FFN neurons be removed — a model that is really smaller and faster — and does OBS's group compensation beat criteria without it? The paper (structured results, SD3.5-Large at 15–30%) keeps FID at 32.6–34.5 while L1-norm collapses (FID 159–346). This chapter adds the two peer methods the study was built to compare with: SlimDiff and gradient-flow pruning (our reconstructions).
#
# Attention heads (exact group-OBS saliency, RRF across the image and text output projections) and FFN neurons are physically removed from every block but the first and the last; compared with L1-norm, FLAP and the peer method SlimDiff (our reconstruction: spectral slimming of the query-key and value-output head dimensions and of the FFN width, with a global allocator; `obslib/slimdiff.py`) and the peer method gradient-flow pruning (our reconstruction: soft gates on the same heads and neurons, GraSP criterion, trained on the model's own flow-matching loss for `S['gf_iterations']` iterations; `obslib/gradflow.py`). For OBS-Diff, L1-norm, FLAP and gradient flow the sparsity is the share of heads and neurons removed per block (identical shapes); for SlimDiff it is the share of the same blocks' attention and FFN parameters removed — compare at equal `params_drop_%`. A last table is an ablation of gradient flow's criterion: pruning the groups whose removal raises the gradient norm (the paper's rule) against those whose removal lowers it.
#
# Metrics: **PSNR vs dense** (how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single attributes found) and FID on the evaluator's features.
#
# Every quality number is the mean over `S['seeds']` seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. Prompt fidelity also carries, in brackets, its 95% Wilson interval pooled over seeds × prompts: with 64 held-out prompts a share near 0.8 is only known to about ±0.1, whatever the seeds say. KID is unbiased, so a model the evaluator cannot tell from the real images scores around 0, negative values included; its own standard error is given beside it where the run computed it. Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks 01–03 is `results/methods_table.csv`.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
methods = ["obs-diff", "l1-norm", "flap", "slimdiff", "gradient-flow"]

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
# Heads and neurons are removed from every block but the first and the last (the paper's choice), at 10–30%. L1-norm and FLAP are the paper's and our structured baselines; SlimDiff spends one global budget of attention and FFN parameters; gradient flow trains the targeted blocks for `S['gf_iterations']` iterations while its soft gates close. The last grid row reruns gradient flow at the middle sparsity with the opposite criterion.

# %%
grid = [ex.Setting(method="dense", num_calib=S["num_calib"])]
gf = {"iterations": S["gf_iterations"], "lr": S["gf_lr"]}  # gradient flow trains; the others are one-shot
grid += [ex.Setting(method=m, pattern="structured", sparsity=s, num_calib=S["num_calib"],
                    extra=gf if m == "gradient-flow" else {}) for m in methods for s in S["structured_sparsities"]]
s_mid = S["structured_sparsities"][len(S["structured_sparsities"]) // 2]
grid += [ex.Setting(method="gradient-flow", pattern="structured", sparsity=s_mid, num_calib=S["num_calib"],
                    extra={**gf, "gradient_criterion": "lower"})]
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df), 'rows')

# %% [markdown]
# ## The table
#
# One row per method and sparsity with `params_drop_%` and `flops_drop_%` of the transformer: compare methods at equal parameter drop (SlimDiff's sparsity counts parameters, the others' heads and neurons). The second table is gradient flow's criterion ablation.

# %%
crit = df.get("extra_gradient_criterion")
ablation = df[crit.notna()].copy() if crit is not None else df.iloc[:0]
df = df[crit.isna()] if crit is not None else df
summary = ex.summarize(df, ["method", "sparsity"], ex.METRICS + ("prune_s", "params", "gflops"))
dense = summary[summary.method == "dense"].iloc[0]
summary["params_drop_%"] = 100 * (1 - summary.params_mean / dense.params_mean)
summary["flops_drop_%"] = 100 * (1 - summary.gflops_mean / dense.gflops_mean)
summary.to_csv(f"{S['results']}/03_structured.csv", index=False)
t = ex.format_table(summary, ["method", "sparsity"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity"))
t[["params_drop_%", "flops_drop_%"]] = summary[["params_drop_%", "flops_drop_%"]].round(1)
display(t)
gf_rows = df[(df.method == "gradient-flow") & (df.sparsity == s_mid)].assign(extra_gradient_criterion="raise")
abl = ex.summarize(pd.concat([gf_rows, ablation]), ["extra_gradient_criterion"], ex.METRICS + ("prune_s",))
abl.to_csv(f"{S['results']}/03_gradient_criterion.csv", index=False)
ex.format_table(abl, ["extra_gradient_criterion"], ("psnr", "prompt_fidelity", "fid", "prune_s"))

# %% [markdown]
# ## The figure
#
# PSNR against the dense model (left) and prompt fidelity (right) against sparsity; the last table is where SlimDiff spent its budget (share of removed parameters by kind of group and stream).

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
curves = summary[summary.method != "dense"]
plots.metric_lines(curves, "sparsity", "method", "psnr", ax[0], "PSNR vs dense (dB)")
plots.metric_lines(curves, "sparsity", "method", "prompt_fidelity", ax[1], "prompt fidelity (held-out)")
plots.save(fig, f"{S['figures']}/03_structured.png")
# where SlimDiff spends its budget (calibration seed 0, the middle sparsity)
pipe_s = obslib.load_pipeline(S["model_dir"])
rep_s = obslib.prune(pipe_s, obslib.PruneConfig(method="slimdiff", pattern="structured", sparsity=s_mid,
                                                prompts=prompts("train", S["num_calib"]), progress=False))
alloc = ex.slimdiff_allocation(rep_s)
alloc.to_csv(f"{S['results']}/03_slimdiff_allocation.csv", index=False)
alloc.round(3)

# %% [markdown]
# ## Finding
#
# Computed from the numbers above (a gap counts when it is larger than both standard deviations over seeds and, for prompt fidelity, the two 95% intervals do not overlap; in quick mode there is one seed and no verdict):

# %%
for sp in sorted(summary[summary.method != "dense"].sparsity.unique()):
    r = summary[np.isclose(summary.sparsity, sp)].set_index("method")
    drops = ", ".join(f"{m} −{r.loc[m, 'params_drop_%']:.1f}%" for m in r.index if m != "dense")
    print(f"{sp:.0%} (parameters removed: {drops})")
    for a, b in (("obs-diff", "l1-norm"), ("slimdiff", "obs-diff"), ("obs-diff", "gradient-flow")):
        print("   ", ex.versus(summary, {"sparsity": sp}, "method", a, b))
print("gradient-flow criterion:", ex.versus(abl, {}, "extra_gradient_criterion", "lower", "raise"))
top = alloc.sort_values("share_of_removed", ascending=False).iloc[0]
print(f"SlimDiff's largest share of removed parameters: {top.kind} ({top.stream}) {top.share_of_removed:.0%}")

# %% [markdown]
# ## Try next
#
# Give gradient flow more iterations or another learning rate (`S['gf_iterations']`, `S['gf_lr']`), or `gradient_criterion='lower'` for every row. An allocator-matched OBS-Diff — SlimDiff's per-group budget solved with OBS — would separate allocation from the solver. `head_saliency='diag'` gives the public code's approximation.

# %%
assert (df[df.method != "dense"].params < df[df.method == "dense"].params.iloc[0]).all()
# every method at 50% / 60% unstructured, 2:4 and 20% structured, from the shared run cache (notebooks 01-03)
mt = ex.methods_table(S["runs_csv"], S["num_calib"])
mt.to_csv(f"{S['results']}/methods_table.csv", index=False)
ex.format_table(mt, ["setting", "method"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))
