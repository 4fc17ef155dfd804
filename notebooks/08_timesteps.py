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
# # 08 · Does timestep-awareness matter, and why
#
# **The question.** The paper's second contribution is the timestep-aware Hessian H = Σ_t α_t X_t X_tᵀ with weights that fall over the trajectory (log-decrease). Its argument is *error accumulation*: an error made at an early, noisy step is carried through every later step, so the early steps' inputs should count more when the mask and the compensation are chosen. Notebooks 01, 02 and 04 found at most a small difference: no scheme detectably better than uniform at 60% at the paper's strength (α from 0.8 to 1.2, a ratio of 1.5), and OBS-Diff ahead of SparseGPT's uniform Hessian on prompt fidelity at 50% and 2:4 only, never on PSNR. That leaves three possibilities this chapter tells apart:
#
# 1. **The premise is wrong** here: errors at early steps do not hurt the final image more than late ones. Tested directly by *error injection*: sampling with the pruned weights active in one window of steps only.
# 2. **The weighting is too weak** to act on it: at a ratio of 1.5 the Hessian barely moves. Tested by how far each step's inputs differ at all, how many mask positions a weighting changes, and by a *strength sweep* up to a ratio of 100 and to one-sided weightings.
# 3. **The shape is guessed, not measured**: tested with a weighting whose α_t follow the *measured* harm of an error at step t (`--weighting sensitivity`).
#
# Metrics, seeds and the paired comparisons: [glossary](00_walkthrough.ipynb#Glossary-of-the-metrics); the weighting ablation at the paper's strength: [04](04_weighting.ipynb); verdicts across chapters: [results/claims.md](../results/claims.md).

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
model_dir = None  # another embedded model, e.g. "models/shapes-flux": its tables and figures go to results/<name>/ and figures/<name>/ (default: models/shapes-sd3)

# %%
import os
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
import obslib
from obslib import study
from obslib.study import experiments as ex, plots, compare as cmp, timesteps as ts
from obslib.shapes import prompts as world_prompts
from obslib.shapes.model import DEFAULT_SAMPLING
from obslib.weighting import ABLATION_SCHEMES
S = study.settings(mode, model_dir)  # grid sizes of this mode, the model and output folders
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
print(S["mode"], "mode: tables ->", study.rel(S["results"]), "| figures ->", study.rel(S["figures"]))
T = DEFAULT_SAMPLING["num_inference_steps"]
print(f"sampling: {T} Euler steps (step 1 = pure noise), CFG {DEFAULT_SAMPLING['guidance_scale']:g}; "
      f"{len(S['seeds'])} seeds × {S['num_eval_prompts']} held-out prompts per setting")

# %% [markdown]
# ## 1 · Where does an error hurt? Error injection
#
# The model is pruned once (OBS-Diff at 50% unstructured, and structured at 20%: one head of four and 20% of the FFN neurons per block); then the **dense** pipeline samples with the pruned transformer switched in for one window of steps only (`obslib.windows.StepSwitch`: a window covering every step gives exactly the pruned model's images, an empty one exactly the dense model's — both are tests). Five equal windows cover the trajectory, plus its first and second half. Each run is scored like every study row: PSNR against the dense images of the same prompt and seed, and prompt fidelity.
#
# If early errors accumulate, pruning only the early steps should hurt the final image more than pruning only the late ones.

# %%
windows = ts.injection_windows(T, S["inject_windows"])
inject = [ex.Setting(method="obs-diff", sparsity=0.5, num_calib=S["num_calib"]),
          ex.Setting(method="obs-diff", pattern="structured", sparsity=S["inject_structured"], num_calib=S["num_calib"])]
inj = ts.run_injection(inject, S["seeds"], windows, f"{S['results']}/08_injection_runs.csv",
                       model_dir=S["model_dir"], num_prompts=S["num_eval_prompts"])
whole = ex.run_grid(inject + [ex.Setting(method="dense", num_calib=S["num_calib"])], S["seeds"], S["runs_csv"],
                    model_dir=S["model_dir"], num_prompts=S["num_eval_prompts"])
D = ts.injection_frame(inj, whole)
print(len(inj), "window rows;", "windows:", ", ".join(ts.window_label(w) for w in windows))

# %% [markdown]
# **The table.** Mean over seeds × prompts with its 95% interval. "all steps" is the ordinary pruned model; "none (dense)" the dense one (its PSNR is the reference itself, so it has none).

# %%
means = pd.concat([ts.window_means(D, m) for m in ("psnr", "prompt_fidelity")])
means.to_csv(f"{S['results']}/08_injection.csv", index=False)
show = means.assign(value=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if k == "prompt_fidelity" else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
                           for m, lo, hi, k in zip(means["mean"], means.lo, means.hi, means.metric)])
show.pivot_table(index=["setting", "first", "window"], columns="metric", values="value", aggfunc="first").droplevel("first")

# %% [markdown]
# **Every reading of the damage.** The mean of per-image PSNR above weighs every image alike. The same per-image values read as the PSNR of the pooled MSE (total pixel damage, led by the few images that changed most), the median, the share of images below 30 dB, SSIM, and the share of prompts whose fidelity verdict differs from the dense image's (`obslib.study.timesteps.premise_metrics`) can order the windows differently; chapter 09 reads the premise on all of them.

# %%
# NBVAL_CHECK_OUTPUT
premise = ts.premise_metrics(D)
premise.to_csv(f"{S['results']}/08_premise_metrics.csv", index=False)
print(premise.drop(columns=["first", "last", "images"]).rename(columns=ts.PREMISE_COLUMNS).round(3).to_string(index=False))

# %% [markdown]
# **The paired comparisons.** The first half against the second half, and the first window against the last (a − b: a higher PSNR means *less* harm from pruning those steps); and the prompt fidelity each window costs against the dense model.

# %%
# NBVAL_CHECK_OUTPUT
first, second = (ts.window_label(w) for w in ts.halves(T))
w0, w1 = ts.window_label(windows[0]), ts.window_label(windows[S["inject_windows"] - 1])
C1, F1 = [], []
for setting in D.setting.unique():
    for a, b, what in ((first, second, "Halves"), (w0, w1, "End windows")):
        C1 += cmp.compare_in(D, "window", a, b, where={"setting": setting}, metrics=("prompt_fidelity", "psnr"),
                             chapter="08 timesteps", context=f"{what}, {setting}")
    for w in [ts.window_label(x) for x in windows] + [ts.WHOLE]:
        F1 += cmp.compare_in(D, "window", w, ts.DENSE, where={"setting": setting}, metrics=("prompt_fidelity",),
                             chapter="08 timesteps", context=f"Fidelity cost, {setting}")
cmp.table(C1)

# %% [markdown]
# **The figure.** Left: PSNR against the dense images when only that window is pruned (higher = the error there harms the final image less), with the whole-trajectory prune as a dashed line. Right: prompt fidelity of each window minus the dense model's, paired, with its 95% interval. Read the left panel from left (noisy steps) to right (detail steps): a rising curve means early errors hurt more, as the paper argues.

# %%
fig, ax = plt.subplots(1, 2, figsize=(13, 3.8))
equal = windows[:S["inject_windows"]]  # the equal windows (the last two of `windows` are the halves)
eq = means[(means.metric == "psnr") & means.window.isin([ts.window_label(w) for w in equal])]
for i, (setting, g) in enumerate(eq.groupby("setting", sort=False)):
    g = g.sort_values("first")
    mid = (g["first"] + g["last"]) / 2
    ax[0].errorbar(mid, g["mean"], yerr=[g["mean"] - g.lo, g.hi - g["mean"]], marker="o", capsize=3, color=f"C{i}", label=setting)
    full = means[(means.metric == "psnr") & (means.setting == setting) & (means.window == ts.WHOLE)]
    if len(full):
        ax[0].axhline(full["mean"].iloc[0], color=f"C{i}", ls="--", lw=1, label=f"{setting}, all steps")
ax[0].set_xlabel("window of pruned steps (centre; 1 = pure noise)")
ax[0].set_ylabel("PSNR vs dense (dB)")
plots.legend_outside(ax[0])
plots.paired_differences([c for c in F1 if c["a"] != ts.WHOLE], ax[1], "prompt fidelity, window − dense (share of prompts)")
ax[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
fig.tight_layout()
plots.save(fig, f"{S['figures']}/08_injection.png")

# %% [markdown]
# **The same prompts, window by window.** The first six held-out prompts of the first seed at 50% unstructured: the dense model (top row), the pruned weights active in one window only (one row per window, noisy steps first), and at every step (bottom row). Read down a column: a change of layout (a shape appears, vanishes or moves) is what the evaluator's reading and prompt fidelity register; a change of edges and shades is what PSNR registers and the evaluator may not.

# %%
imgs, labels = ts.window_images(inject[0], S["seeds"][0], windows[:S["inject_windows"]], 6, S["model_dir"])
per_row = len(imgs) // len(labels)
fig = plots.image_grid(imgs, [lab if j == 0 else "" for lab in labels for j in range(per_row)], ncols=per_row, width=1.5)
plots.save(fig, f"{S['figures']}/08_window_images.png")

# %% [markdown]
# ### The same error at every step
#
# A window's damage above mixes two things: how much an error made at those steps hurts the final image, and how large the pruned model's error is at those steps (its inputs differ from step to step, and so does its error). To separate them, the probe below (`obslib.study.timesteps.run_equal_probe`) first measures the pruned model's relative prediction error ‖v_pruned − v_dense‖ / ‖v_dense‖ at every step along the dense trajectory, then samples the dense model with Gaussian noise of *one* relative size — the mean of those errors — added to its prediction in one window only. Every window now receives an error of the same size; what still differs between windows is only where the error lands.

# %%
probe = ts.run_equal_probe(inject[:1], S["seeds"], windows, f"{S['results']}/08_equal_probe_runs.csv",
                           model_dir=S["model_dir"], num_prompts=S["num_eval_prompts"])
NOISE = "equal-size noise"
P = ts.injection_frame(probe, whole)
P = P[P.window != ts.WHOLE].assign(setting=NOISE)
rel_steps = np.mean([[float(x) for x in r.split(";")] for r in probe.drop_duplicates("seed").rel_error_steps], axis=0)
probe_size = float(probe.drop_duplicates("seed").rel.mean())
print(f"the pruned model's ({ts.setting_label(probe.iloc[0])}) relative prediction error per step, mean over "
      f"{probe.seed.nunique()} seeds: " + ", ".join(f"{x:.3f}" for x in rel_steps) + f"; the probe's size: {probe_size:.3f}")
probe_means = pd.concat([ts.window_means(P, m) for m in ("psnr", "prompt_fidelity")])
probe_premise = ts.premise_metrics(P)
probe_premise.to_csv(f"{S['results']}/08_equal_probe_metrics.csv", index=False)
print(probe_premise.drop(columns=["first", "last", "images"]).rename(columns=ts.PREMISE_COLUMNS).round(3).to_string(index=False))

# %%
# NBVAL_CHECK_OUTPUT
C5 = []
for a, b, what in ((first, second, "Halves"), (w0, w1, "End windows")):
    C5 += cmp.compare_in(P, "window", a, b, where={"setting": NOISE}, metrics=("prompt_fidelity", "psnr"),
                         chapter="08 timesteps", context=f"{what}, {NOISE}")
cmp.table(C5)

# %% [markdown]
# **The figure.** Left: the pruned model's relative prediction error at each step (how large the error is where it is made) and the probe's one size (dashed). Right: PSNR against the dense images per window, for the pruned weights (as above) and for the equal-size noise, both read two ways — the mean of per-image dB (a typical image) and the PSNR of the pooled MSE (total pixel damage). If the pruned curve's shape came from the error's size, the noise curve would be flat.

# %%
fig, ax = plt.subplots(1, 2, figsize=(13, 3.8))
ax[0].plot(range(1, len(rel_steps) + 1), rel_steps, marker="o", label="pruned model, per step")
ax[0].axhline(probe_size, ls="--", color="k", lw=1, label="equal-size probe")
ax[0].set_xlabel("step (1 = pure noise)")
ax[0].set_ylabel("relative prediction error")
plots.legend_outside(ax[0])
eq_labels = [ts.window_label(w) for w in equal]
both = pd.concat([premise, probe_premise])
both = both[both.window.isin(eq_labels) & both.setting.isin([ts.setting_label(probe.iloc[0]), NOISE])]
for i, (setting, g) in enumerate(both.groupby("setting", sort=False)):
    g = g.sort_values("first")
    mid = (g["first"] + g["last"]) / 2
    ax[1].plot(mid, g.mean_db, marker="o", color=f"C{i}", label=f"{setting}, mean of dB")
    ax[1].plot(mid, g.pooled_db, marker="s", ls=":", color=f"C{i}", label=f"{setting}, pooled MSE")
ax[1].set_xlabel("window of the error (centre; 1 = pure noise)")
ax[1].set_ylabel("PSNR vs dense (dB)")
plots.legend_outside(ax[1])
fig.tight_layout()
plots.save(fig, f"{S['figures']}/08_equal_probe.png")

# %% [markdown]
# ## 2 · How much can a weighting change? Per-step inputs and masks
#
# The weighting only reweights the steps' input statistics, so it can only matter where those differ. One calibration run keeps each step's X_tᵀX_t for three kinds of layer (the image-stream query projection, the attention output and the FFN down-projection) in the first, middle and last block. Left: the relative distance of each step's H_t from their mean, ‖H_t − H̄‖_F / ‖H̄‖_F. Then every weighting of notebook 04 (at its 1.5× strength) and of the strength sweep forms its H from the same statistics (exactly: H = 2 Σ_t α_t X_tᵀX_t / Σ_t α_t n_t), and OBS at 50% is solved with it: the share of mask positions that differ from the uniform Hessian's mask, and the change in layer error measured on the uniform H (every step counted alike).

# %%
pipe = obslib.load_pipeline(S["model_dir"])
layers = ts.representative_layers(pipe.transformer)
stats = ts.step_statistics(pipe, layers, world_prompts("train", S["num_calib"]))
spread = ts.hessian_spread(stats)
spread.to_csv(f"{S['results']}/08_hessian_spread.csv", index=False)
W = {f"{w} ×1.5": obslib.timestep_weights(w, T) for w in ABLATION_SCHEMES if w != "uniform"}  # notebook 04's schemes
W.update(ts.weightings(T, ratios=S["strength_ratios"]))                                          # the strength sweep
shift = ts.mask_shift(pipe.transformer, stats, W, sparsity=0.5)
shift.to_csv(f"{S['results']}/08_mask_shift.csv", index=False)
per_w = shift.groupby("weighting", sort=False)[["h_distance", "mask_differs", "error_change_uniform_H", "error_change_own_H"]].mean()
(per_w * [1, 100, 100, 100]).round(2).rename(columns={"h_distance": "‖H − H_uniform‖/‖H_uniform‖", "mask_differs": "mask positions changed (%)",
                                                      "error_change_uniform_H": "layer error on uniform H (% change)",
                                                      "error_change_own_H": "layer error on own H (% change)"})

# %%
fig, ax = plt.subplots(1, 2, figsize=(13, 3.6))
for name, g in spread.groupby("layer", sort=False):
    short = name.replace("transformer_blocks.", "block ")
    ax[0].plot(g.step, g.rel_distance, marker=".", label=short)
ax[0].set_xlabel("sampling step (1 = pure noise)")
ax[0].set_ylabel("‖H_t − H̄‖_F / ‖H̄‖_F")
plots.legend_outside(ax[0], "layer")
for scheme in ("log-decrease", "log-increase"):
    r = per_w[per_w.index.str.startswith(scheme + " ×")]
    ratios = [float(i.split("×")[1]) for i in r.index]
    ax[1].plot(ratios, 100 * r.mask_differs, marker="o", label=scheme)
for name in per_w.index[per_w.index.str.endswith(" only")]:
    ax[1].axhline(100 * per_w.loc[name, "mask_differs"], ls=":", color="0.4" if name.startswith("first") else "0.7", label=name)
ax[1].set_xscale("log")
ax[1].set_xlabel("weighting strength α_max / α_min (log scale; the paper's: 1.5)")
ax[1].set_ylabel("mask positions differing from uniform (%)")
plots.legend_outside(ax[1])
fig.tight_layout()
plots.save(fig, f"{S['figures']}/08_hessian_and_masks.png")

# %% [markdown]
# ## 3 · Strength sweep, end to end
#
# OBS-Diff at 60% unstructured (where notebook 01 shows the largest differences) with log-decrease and log-increase at ratios 1.5 (the paper's), 4, 16 and 100, and the one-sided weightings that count only the first or only the second half of the steps (ratio 10⁶). Every one is compared, paired, with the uniform Hessian.

# %%
base = ex.Setting(method="obs-diff", sparsity=0.6, num_calib=S["num_calib"])
sweep = [ex.Setting(**{**base.__dict__, "weighting": "uniform"})] + ts.strength_settings(base, ratios=S["strength_ratios"])
df3 = ts.label_strength(ex.run_grid(sweep, S["seeds"], S["runs_csv"], model_dir=S["model_dir"], num_prompts=S["num_eval_prompts"]))
ex.format_table(ex.summarize(df3, ["weighting_label"]), ["weighting_label"], ("prompt_fidelity", "psnr", "prune_s"))

# %%
# NBVAL_CHECK_OUTPUT
C3 = []
for lab in [x for x in df3.weighting_label.unique() if x != "uniform"]:
    C3 += cmp.compare_in(df3, "weighting_label", lab, "uniform", metrics=("prompt_fidelity", "psnr"),
                         chapter="08 timesteps", context="Strength at 60%")
cmp.table(C3)

# %%
plots.paired_panels(C3, f"{S['figures']}/08_strength.png", title="each weighting − uniform at 60%, paired (95% interval)")

# %% [markdown]
# ## 4 · A measured weighting: `--weighting sensitivity`
#
# Instead of assuming where errors hurt, the prune measures it (`obslib.sensitivity`): before the first package, a cheap probe error (the targeted layers magnitude-pruned at the same sparsity) is switched in for each of 10 windows of steps on the first 4 calibration prompts, and α_t follows the resulting change of the final latents (mean 1). It is compared, paired, with log-decrease and uniform at 50% and 60% unstructured and at 2:4.

# %%
grid4 = [ex.Setting(method="obs-diff", pattern=p, sparsity=s, weighting=w, num_calib=S["num_calib"])
         for p, s in S["sensitivity"] for w in ("sensitivity", "log-decrease", "uniform")]
df4 = ex.run_grid(grid4, S["seeds"], S["runs_csv"], model_dir=S["model_dir"], num_prompts=S["num_eval_prompts"])
df4 = df4.assign(setting=[ts.setting_label(r) for _, r in df4.iterrows()])
ex.format_table(ex.summarize(df4, ["setting", "weighting"]), ["setting", "weighting"], ("prompt_fidelity", "psnr", "prune_s"))

# %%
sens = df4[df4.weighting == "sensitivity"]
probe_share = (sens.sensitivity_probe_s / sens.prune_s).median()
print(f"the probe took a median {sens.sensitivity_probe_s.median():.1f} s of a {sens.prune_s.median():.1f} s prune "
      f"({probe_share:.0%}) on this machine")

# %%
# NBVAL_CHECK_OUTPUT
C4 = []
for setting in df4.setting.unique():
    for a, b in (("sensitivity", "uniform"), ("sensitivity", "log-decrease"), ("log-decrease", "uniform")):
        C4 += cmp.compare_in(df4, "weighting", a, b, where={"setting": setting}, metrics=("prompt_fidelity", "psnr"),
                             chapter="08 timesteps", context=f"At {setting}")
cmp.write_comparisons(C1 + F1 + C3 + C4 + C5, "08 timesteps", f"{S['results']}/comparisons.csv")
cmp.table(C4)

# %% [markdown]
# **The figure.** Left: the measured weights α_t (one line per setting and seed) beside the paper's log-decrease at its default strength. Right: the paired differences.

# %%
fig, ax = plt.subplots(1, 2, figsize=(13, 0.3 * len(C4) / 2 + 2.6), gridspec_kw={"width_ratios": [1, 1.2]})
for i, (setting, g) in enumerate(sens.groupby("setting", sort=False)):
    for j, (_, r) in enumerate(g.iterrows()):
        a = [float(x) for x in r.timestep_weights.split()]
        ax[0].plot(range(1, len(a) + 1), a, color=f"C{i}", alpha=0.7, label=setting if j == 0 else None)
ax[0].plot(range(1, T + 1), obslib.timestep_weights("log-decrease", T), "k--", label="log-decrease ×1.5")
ax[0].set_yscale("log")
ax[0].set_xlabel("sampling step (1 = pure noise)")
ax[0].set_ylabel("α_t (mean 1; log scale)")
ax[0].legend(fontsize=8, frameon=False)
plots.paired_differences([c for c in C4 if c["metric"] == "psnr"], ax[1], "PSNR difference (dB)")
ax[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
fig.tight_layout()
plots.save(fig, f"{S['figures']}/08_sensitivity.png")

# %%
alphas = {f"sensitivity ({r.setting}, seed {r.seed})": [float(x) for x in r.timestep_weights.split()]
          for _, r in sens.iterrows() if r.setting == sens.setting.iloc[0]}
sshift = ts.mask_shift(pipe.transformer, stats, alphas, sparsity=0.5).groupby("weighting")[["h_distance", "mask_differs"]].mean()
print("the measured weights move", ", ".join(f"{v:.1%}" for v in sshift.mask_differs),
      "of the mask positions at 50% on the representative layers (H distance from uniform",
      ", ".join(f"{v:.3f}" for v in sshift.h_distance) + ")")

# %% [markdown]
# ## Answer
#
# Generated from the numbers just computed.

# %%
# NBVAL_CHECK_OUTPUT
says, reading = cmp.interval, ts.premise_reading
print("Where errors hurt (a − b: a higher PSNR or fidelity for a means pruning a's steps harms less):")
for setting in D.setting.unique():
    h = {c["metric"]: c for c in C1 if c["context"] == f"Halves, {setting}"}
    e = {c["metric"]: c for c in C1 if c["context"] == f"End windows, {setting}"}
    order = eq[eq.setting == setting].sort_values("first")
    print(f"- {setting}: only the first half − only the second half: PSNR {says(h['psnr'])}, prompt fidelity "
          f"{says(h['prompt_fidelity'])}: {reading(h['psnr'], 'PSNR')}; {reading(h['prompt_fidelity'], 'prompt fidelity')}. "
          f"First window − last window ({w0} − {w1}): PSNR {says(e['psnr'])}: {reading(e['psnr'], 'PSNR')}. "
          "PSNR by window, first to last: " + ", ".join(f"{m:.1f}" for m in order["mean"])
          + f" dB (the whole-trajectory prune: {means[(means.metric == 'psnr') & (means.setting == setting) & (means.window == ts.WHOLE)]['mean'].iloc[0]:.1f} dB).")
h5 = {c["metric"]: c for c in C5 if c["context"] == f"Halves, {NOISE}"}
e5 = {c["metric"]: c for c in C5 if c["context"] == f"End windows, {NOISE}"}
nz = probe_premise[probe_premise.window.isin(eq_labels)].sort_values("first")
print(f"- The same relative error ({probe_size:.3f}) in every window: only the first half − only the second half: PSNR "
      f"{says(h5['psnr'])}, prompt fidelity {says(h5['prompt_fidelity'])}: {reading(h5['psnr'], 'PSNR')}; "
      f"{reading(h5['prompt_fidelity'], 'prompt fidelity')}. First window − last window: PSNR {says(e5['psnr'])}: "
      f"{reading(e5['psnr'], 'PSNR')}. Mean-of-dB PSNR by window, first to last: " + ", ".join(f"{m:.1f}" for m in nz.mean_db)
      + " dB; pooled-MSE PSNR: " + ", ".join(f"{m:.1f}" for m in nz.pooled_db) + " dB.")
print(f"- The pruned model's own relative error is {rel_steps[0]:.3f} at step 1 and {rel_steps[-1]:.3f} at the last step "
      f"(largest {rel_steps.max():.3f} at step {int(np.argmax(rel_steps)) + 1}, smallest {rel_steps.min():.3f} at step "
      f"{int(np.argmin(rel_steps)) + 1}).")
cost = {c["context"].split(", ")[1] + "|" + c["a"]: c for c in F1}
lost = [f"{k.split('|')[1]} ({k.split('|')[0]}: {says(c)})" for k, c in cost.items()
        if c["verdict"] == cmp.BEHIND and c["a"] != ts.WHOLE]
print("- Windows whose errors alone cost prompt fidelity against the dense model: " + ("; ".join(lost) if lost else "none detected") + ".")
print("How much a weighting can change:")
print(f"- Each step's H_t lies {spread.rel_distance.min():.2f}–{spread.rel_distance.max():.2f} (relative Frobenius distance) "
      f"from their mean on the representative layers, so the steps' inputs do differ.")
pw = per_w.mask_differs
weakest = min(S["strength_ratios"])
lab0 = [x for x in pw.index if x.endswith(f"×{weakest:g}")]
strongest = pw.idxmax()
print(f"- At 50%, strength ×{weakest:g}" + (" (the paper's)" if weakest == 1.5 else "") + f" changes {pw[lab0].mean():.1%} "
      f"of the mask positions on average over {len(lab0)} schemes (layer error on the uniform H "
      f"{per_w.loc[lab0, 'error_change_uniform_H'].mean():+.2%}); the most, {strongest}, changes {pw[strongest]:.1%}, with a "
      f"layer error {per_w.loc[strongest, 'error_change_uniform_H']:+.1%} on the uniform H.")
heaviest = sorted({f"{r.setting} seed {r.seed}: step {int(np.argmax([float(x) for x in r.timestep_weights.split()])) + 1}"
                   for _, r in sens.iterrows()})
print(f"- The measured (sensitivity) weights put their largest α at: {'; '.join(heaviest)}.")
print("Does any weighting beat uniform?")
vs_uniform = [c for group in (C3, C4) for c in group if c["b"] == "uniform"]
hits = [f"{c['a']} {c['context'].replace('At ', 'at ').replace('Strength at', 'at')} on {cmp.NAMES[c['metric']]}: "
        f"{says(c)} ({c['verdict']})" for c in vs_uniform if c["verdict"] != cmp.NONE]
ch = cmp.against_chance(vs_uniform)
side = lambda k: (f"{ch[k]} {k} (chance alone: about {ch['expected_per_side']:.1f}; at least {ch[k]} by chance: "
                  f"p = {ch['p_' + k]:.2g}, if the comparisons were independent)")
print(f"- Of {ch['n']} paired comparisons with uniform (strength sweep and measured weighting), {side('ahead')} and "
      f"{side('behind')}" + (": " + "; ".join(hits) if hits else "") + ".")
print("- Read: " + ("more weightings come out ahead than chance alone gives" if ch["p_ahead"] < 0.05 else
                    "no more come out ahead than chance alone could give, so this is no evidence that a weighting helps")
      + ("; more come out behind than chance gives: the ones listed behind hurt here." if ch["p_behind"] < 0.05 else
         "; no more come out behind than chance could give."))

# %% [markdown]
# ## Try next
#
# Inject a different error (`inject` above: another sparsity, 2:4, or SparseGPT's solution) to see whether the harm profile is a property of the sampler or of the error; widen the probe of the sensitivity weighting (`sensitivity_prompts`, `sensitivity_windows` in a setting's `extra`); or prune with `--weighting first-half --alpha-ratio 1e6` from the command line and compare its images with uniform's yourself.

# %%
assert set(inj.window) == {ts.window_label(w) for w in windows}
assert (abs(df4.sparsity_actual - df4.sparsity) < 0.01).all()
assert len(sens) == len(S["seeds"]) * len(S["sensitivity"]) and sens.timestep_weights.notna().all()
