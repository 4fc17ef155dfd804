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
# # 00 · OBS-Diff, one layer at a time
#
# This notebook walks through the method on the embedded model (`models/shapes-sd3`, a real
# `StableDiffusion3Pipeline`): the layer's inputs at every denoising step, the timestep weights, the
# Hessian and its spectrum, the OBS saliencies, the mask, the compensation, and what it buys in
# reconstruction error and in images. To run it on a real model on a GPU, point `model_dir` at a local
# diffusers directory, give `calib_prompts_file`, and pick a layer name that exists in that model.

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
layer = "transformer_blocks.2.ff.net.2"   # any targeted linear layer
sparsity = 0.5
model_dir = None  # default: the embedded model
calib_prompts_file = None

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

# %%
pipe = obslib.load_pipeline(model_dir or S["model_dir"])
defaults = obslib.sampling_defaults(pipe)
calib = obslib.sampling.read_prompt_file(calib_prompts_file) if calib_prompts_file else prompts("train", S["num_calib"])
T = defaults["num_inference_steps"]
print(defaults, len(calib), "calibration prompts")

# %% [markdown]
# ## 1. Timestep weights
#
# The layer-wise objective is Σ_t α_t ‖W X_t − Ŵ X_t‖². OBS-Diff's **log-decrease** keeps α high for most of
# the trajectory and drops it sharply at the end: errors made early (t = 1 is pure noise) are carried
# through every later step. `exp-decrease` and `cosine` are our additions.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for scheme in obslib.SCHEMES:
    ax.plot(range(1, T + 1), obslib.timestep_weights(scheme, T), label=scheme, marker=".")
ax.set_xlabel("sampling step t (1 = pure noise)"); ax.set_ylabel("α_t"); ax.legend(fontsize=7, ncol=2)
plots.save(fig, f"{S['figures']}/00_weighting_curves.png")

# %% [markdown]
# ## 2. The layer's inputs along the trajectory
#
# Forward hooks record every token of every image (the classifier-free-guidance batch included) at each
# step. The input energy changes along the trajectory, which is why the weighting matters at all.

# %%
stats = obslib.sampling.collect_stats(pipe, [layer], calib, weighting="log-decrease")[layer]
energy = pd.DataFrame([(t, e / n) for t, (e, n) in sorted(stats.step_energy.items())], columns=["step", "mean ‖x‖²"])
ax = energy.plot(x="step", y="mean ‖x‖²", marker="o", figsize=(6, 3), legend=False)
ax.set_ylabel("mean squared input norm")
plots.save(ax.figure, f"{S['figures']}/00_input_energy.png")
assert len(energy) == T and stats.tokens > 0

# %% [markdown]
# ## 3. The Hessian H = 2 Σ_t α_t X_t X_tᵀ / Σ_t α_t n_t and its spectrum

# %%
H = stats.H.double()
eig = torch.linalg.eigvalsh(H).flip(0)
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].imshow(H.numpy(), cmap="RdBu_r", vmin=-H.abs().max(), vmax=H.abs().max()); ax[0].set_title("H")
ax[1].semilogy(eig.clamp_min(1e-12).numpy()); ax[1].set_title("eigenvalues (descending)")
plots.save(fig, f"{S['figures']}/00_hessian.png")
print(f"condition number {float(eig[0] / eig[-1]):.3g}")
assert torch.allclose(H, H.T) and eig[-1] > -1e-6

# %% [markdown]
# ## 4. Saliency, mask and compensation
#
# The textbook OBS saliency w_q² / (2 [H⁻¹]_qq) (plotted below) is not magnitude: a large weight on a
# redundant input is cheap to remove. The solver does not apply that rule over all columns at once. Like
# SparseGPT it is *sequential*: columns are visited left to right and frozen once done, so column j's cost
# and compensation use the inverse Hessian of the columns j… alone, H_F⁻¹ with F = {j, …} (read off a
# Cholesky factor: [H_F⁻¹]_jj = U_jj²), and each removed weight's error is pushed onto the columns to its
# right only (δw_F = −(w_j/[H_F⁻¹]_jj) (H_F⁻¹)_{:,j}). The mask is picked once per lazy block of 128 columns.

# %%
from obslib.obs import obs_prune, saliency, reconstruction_error
from obslib.methods import METHODS
W = pipe.transformer.get_submodule(layer).weight.data.double()
sal = saliency(W, H)
W_obs, mask = obs_prune(W, H, sparsity)
W_mask_only = W * (~mask)
W_mag, _ = METHODS["magnitude"].unstructured(W, None, sparsity, 0, 0, None)
errors = pd.DataFrame({
    "variant": ["magnitude mask", "OBS mask, no compensation", "OBS mask + compensation"],
    "rel_error": [reconstruction_error(W, w, H) for w in (W_mag, W_mask_only, W_obs)],
})
errors.to_csv(f"{S['results']}/00_layer_errors.csv", index=False)
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].scatter(W.abs().flatten(), sal.flatten(), s=2, c=mask.flatten(), cmap="coolwarm")
ax[0].set_xscale("log"); ax[0].set_yscale("log"); ax[0].set_xlabel("|w|"); ax[0].set_ylabel("OBS saliency"); ax[0].set_title("red = pruned")
ax[1].imshow(mask[:64, :64].numpy(), cmap="gray_r"); ax[1].set_title("mask (first 64×64)")
plots.save(fig, f"{S['figures']}/00_saliency_mask.png")
errors

# %%
# invariants: compensation helps, OBS beats magnitude on its own objective
e = errors.set_index("variant")["rel_error"]
assert e["OBS mask + compensation"] < e["OBS mask, no compensation"]
assert e["OBS mask + compensation"] < e["magnitude mask"]
assert abs(float(mask.float().mean()) - sparsity) < 0.01

# %% [markdown]
# ## 5. One whole block, then the whole model

# %%
block = int(layer.split(".")[1])
pipe_b = obslib.load_pipeline(model_dir or S["model_dir"])
rep = obslib.prune(pipe_b, obslib.PruneConfig(sparsity=sparsity, prompts=calib, block_range=(block, block + 1), packages=1, progress=False))
pd.DataFrame(rep["layers"])[["name", "sparsity", "rel_error"]]

# %%
pipe_p = obslib.load_pipeline(model_dir or S["model_dir"])
rep_all = obslib.prune(pipe_p, obslib.PruneConfig(sparsity=sparsity, prompts=calib, packages=4, progress=False))
show = prompts("heldout", 8)
dense_img = obslib.evaluate.generate(pipe, show, seed=0, progress=False)
pruned_img = obslib.evaluate.generate(pipe_p, show, seed=0, progress=False)
fig = plots.image_grid(np.concatenate([dense_img, pruned_img]), [f"dense: {p}" for p in show] + [f"OBS-Diff {sparsity:.0%}: {p}" for p in show])
plots.save(fig, f"{S['figures']}/00_dense_vs_pruned.png")
print(f"actual sparsity {rep_all['sparsity_actual']:.3f}, prune time {rep_all['timings']['total_s']:.1f} s")
assert abs(rep_all["sparsity_actual"] - sparsity) < 0.01
