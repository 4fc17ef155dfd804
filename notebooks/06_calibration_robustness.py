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
# Quality against the number of calibration prompts; then the pruned model (calibrated at the default CFG, step count and Euler sampler) evaluated with other CFG scales, step counts and the Heun sampler, beside the dense model under the same change. Metrics, seeds and the paired comparisons: [glossary](00_walkthrough.ipynb#Glossary-of-the-metrics); verdicts across chapters: [results/claims.md](../results/claims.md).

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
model_dir = None  # another embedded model, e.g. "models/shapes-flux": its tables and figures go to results/<name>/ and figures/<name>/ (default: models/shapes-sd3)
sparsity = 0.5

# %%
import os
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
import obslib
from obslib import study
from obslib.study import experiments as ex, plots, compare as cmp
from obslib.shapes.model import DEFAULT_SAMPLING
S = study.settings(mode, model_dir)  # grid sizes of this mode, the model and output folders
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
print(S["mode"], "mode: tables ->", study.rel(S["results"]), "| figures ->", study.rel(S["figures"]))
CFG0, STEPS0 = DEFAULT_SAMPLING["guidance_scale"], DEFAULT_SAMPLING["num_inference_steps"]
print(f"default sampling: CFG {CFG0:g}, {STEPS0} Euler steps")

# %% [markdown]
# ## What runs, and why these settings
#
# OBS-Diff at 50% with 2–128 calibration prompts; then the model pruned with the default settings (16 prompts, default CFG and steps, Euler) evaluated at other CFG scales, step counts and with Heun, beside the dense model under the same change. A change equal to the default (CFG 4, 20 steps) is the default row itself and is not run twice. Heun runs only where the pipeline allows it: `FluxPipeline` hands the scheduler its own sigma schedule, which the Heun scheduler cannot take, so the Flux model (`model_dir=models/shapes-flux`) has no Heun rows.

# %%
grid = [ex.Setting(method="obs-diff", sparsity=sparsity, num_calib=n) for n in S["calib_sizes"]]
cfgs = [g for g in S["cfg_values"] if g != CFG0]
steps = [st for st in S["step_values"] if st != STEPS0]
robust = []
for method in ("dense", "obs-diff"):
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"])]
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_guidance=g) for g in cfgs]
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_steps=st) for st in steps]
    if "heun" in ex.samplers(S["model_dir"]):  # FluxPipeline imposes its own sigmas, which Heun cannot take
        robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_sampler="heun")]
df_r = ex.run_grid(robust, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
df = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])
print(len(df) + len(df_r), "rows:", df.seed.nunique(), "seeds ×", int(df.n_prompts.iloc[0]), "held-out prompts per setting")

# %% [markdown]
# ## The tables
#
# First: quality against the number of calibration prompts. Second: prompt fidelity and FID of dense and pruned under each change of sampling (`default` = CFG 4, 20 Euler steps).

# %%
summary = ex.summarize(df, ["num_calib"])
summary.to_csv(f"{S['results']}/06_calibration_size.csv", index=False)
rob = df_r.copy()
rob["change"] = np.select([rob.eval_guidance.notna(), rob.eval_steps.notna(), rob.eval_sampler == "heun"],
                          ["CFG " + rob.eval_guidance.map("{:g}".format), "steps " + rob.eval_steps.map(lambda v: f"{v:.0f}" if v == v else ""),
                           "Heun sampler"], "default")
rsum = ex.summarize(rob, ["change", "method"])
rsum.to_csv(f"{S['results']}/06_robustness.csv", index=False)
display(ex.format_table(summary, ["num_calib"], ("prompt_fidelity", "attribute_accuracy", "psnr", "fid")))
ex.format_table(rsum, ["change", "method"], ("prompt_fidelity", "psnr", "fid"))

# %% [markdown]
# ## Paired comparisons
#
# Every calibration size minus the largest; and, under each sampling change, dense − pruned (the fidelity the pruning costs under that change).

# %%
# NBVAL_CHECK_OUTPUT
C = []
n_hi = int(summary.num_calib.max())
for n in sorted(df.num_calib.unique()):
    if n != n_hi:
        C += cmp.compare_in(df, "num_calib", n, n_hi, metrics=("prompt_fidelity", "psnr"), chapter="06 calibration",
                            context="calibration size", labels=(f"{n} prompts", f"{n_hi} prompts"))
G = []
for change in rob.change.unique():
    G += cmp.compare_in(rob, "method", "dense", "obs-diff", where={"change": change}, metrics=("prompt_fidelity",),
                        chapter="06 calibration", context=change)
cmp.write_comparisons(C + G, "06 calibration", f"{S['results']}/comparisons.csv")
cmp.table(C + G)

# %% [markdown]
# ## The figure
#
# Left: prompt fidelity (where the calibration-size effect shows) and PSNR against the number of calibration prompts (log scale; bands: one standard deviation over seeds). Right: the dense-minus-pruned prompt-fidelity gap under each sampling change, with its 95% paired interval — a gap that grows under a change means the pruned model follows the dense one less well there.

# %%
fig, ax = plt.subplots(1, 3, figsize=(15, 3.4), gridspec_kw={"wspace": 0.75})  # room for the third panel's labels
one = summary.assign(m="obs-diff 50%")
plots.metric_lines(one, "num_calib", "m", "prompt_fidelity", ax[0], "prompt fidelity (share of prompts)", "calibration prompts", legend=False)
plots.metric_lines(one, "num_calib", "m", "psnr", ax[1], "PSNR vs dense (dB)", "calibration prompts", legend=False)
for a in ax[:2]:
    a.set_xscale("log", base=2)
plots.paired_differences(G, ax[2], "dense − pruned prompt fidelity")
ax[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
plots.save(fig, f"{S['figures']}/06_calibration_robustness.png")

# %% [markdown]
# ## Answer
#
# Generated from the comparisons just computed.

# %%
# NBVAL_CHECK_OUTPUT
for line in cmp.summary_line(C, "prompt_fidelity") + cmp.summary_line(C, "psnr"):
    print(line)
gap = {g["context"]: g for g in G}
for g in G:
    print(f"{g['context']}: dense − pruned prompt fidelity {g['diff']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] ({g['verdict']}).")
cf = sorted([(CFG0, gap["default"])] + [(float(k.split()[1]), v) for k, v in gap.items() if k.startswith("CFG")], key=lambda t: t[0])
if len(cf) > 1:
    d = [v["diff"] for _, v in cf]
    trend = "widens" if all(np.diff(d) > 0) else "shrinks" if all(np.diff(d) < 0) else "does not change monotonically"
    print(f"With rising CFG ({', '.join(f'{k:g}' for k, _ in cf)}) the fidelity gap {trend} "
          f"({' / '.join(f'{x:.3f}' for x in d)}); the paper's App. D shows the pruned model tracking the dense one across CFG.")

# %% [markdown]
# ## Try next
#
# Add sizes to `S['calib_sizes']` (now 2, 4, 8, 16, 32, 64 and 128 prompts), or evaluate with other samplers (`eval_sampler`). The calibration prompts are the training split's; a held-out set would test calibration drift.

# %%
assert len(summary) == len(S["calib_sizes"])
