"""Writes the study notebooks (run once after editing this file: python notebooks/build_notebooks.py).

The notebooks are the user-facing artefacts; this file only keeps their text in one reviewable place.
Each notebook: a markdown introduction, a cell tagged ``parameters`` (papermill), then narrative, calls
into obslib and plots. No algorithm code lives here or in the notebooks.
"""
import os

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """import os, json
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
import obslib
from obslib import study, experiments as ex, plots
from obslib.shapes import prompts
S = study.settings(mode)          # grid sizes of this mode and output folders
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
print(S["mode"], "->", S["results"])"""


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=()):
    c = nbf.v4.new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = list(tags)
    return c


def params(extra=""):
    return code('mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)\n' + extra, tags=("parameters",))


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = cells
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged notebook changes nothing
        cell.id = f"{name[:2]}-{i:02d}"
    nbf.write(nb, os.path.join(HERE, name))


write("00_walkthrough.ipynb", [
    md("""
# 00 · OBS-Diff, one layer at a time

This notebook walks through the method on the embedded model (`models/shapes-sd3`, a real
`StableDiffusion3Pipeline`): the layer's inputs at every denoising step, the timestep weights, the
Hessian and its spectrum, the OBS saliencies, the mask, the compensation, and what it buys in
reconstruction error and in images. To run it on a real model on a GPU, point `model_dir` at a local
diffusers directory, give `calib_prompts_file`, and pick a layer name that exists in that model.
"""),
    params('layer = "transformer_blocks.2.ff.net.2"   # any targeted linear layer\nsparsity = 0.5\nmodel_dir = None  # default: the embedded model\ncalib_prompts_file = None'),
    code(SETUP),
    code("""pipe = obslib.load_pipeline(model_dir or S["model_dir"])
defaults = obslib.sampling_defaults(pipe)
calib = obslib.api.read_prompt_file(calib_prompts_file) if calib_prompts_file else prompts("train", S["num_calib"])
T = defaults["num_inference_steps"]
print(defaults, len(calib), "calibration prompts")"""),
    md("""
## 1. Timestep weights

The layer-wise objective is Σ_t α_t ‖W X_t − Ŵ X_t‖². OBS-Diff's **log-decrease** keeps α high for most of
the trajectory and drops it sharply at the end: errors made early (t = 1 is pure noise) are carried
through every later step. `exp-decrease` and `cosine` are our additions.
"""),
    code("""fig, ax = plt.subplots(figsize=(6, 3.2))
for scheme in obslib.SCHEMES:
    ax.plot(range(1, T + 1), obslib.timestep_weights(scheme, T), label=scheme, marker=".")
ax.set_xlabel("sampling step t (1 = pure noise)"); ax.set_ylabel("α_t"); ax.legend(fontsize=7, ncol=2)
plots.save(fig, f"{S['figures']}/00_weighting_curves.png")"""),
    md("""
## 2. The layer's inputs along the trajectory

Forward hooks record every token of every image (the classifier-free-guidance batch included) at each
step. The input energy changes along the trajectory, which is why the weighting matters at all.
"""),
    code("""stats = obslib.api.collect_stats(pipe, [layer], calib, weighting="log-decrease")[layer]
energy = pd.DataFrame([(t, e / n) for t, (e, n) in sorted(stats.step_energy.items())], columns=["step", "mean ‖x‖²"])
ax = energy.plot(x="step", y="mean ‖x‖²", marker="o", figsize=(6, 3), legend=False)
ax.set_ylabel("mean squared input norm")
plots.save(ax.figure, f"{S['figures']}/00_input_energy.png")
assert len(energy) == T and stats.tokens > 0"""),
    md("## 3. The Hessian H = 2 Σ_t α_t X_t X_tᵀ / Σ_t α_t n_t and its spectrum"),
    code("""H = stats.H.double()
eig = torch.linalg.eigvalsh(H).flip(0)
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].imshow(H.numpy(), cmap="RdBu_r", vmin=-H.abs().max(), vmax=H.abs().max()); ax[0].set_title("H")
ax[1].semilogy(eig.clamp_min(1e-12).numpy()); ax[1].set_title("eigenvalues (descending)")
plots.save(fig, f"{S['figures']}/00_hessian.png")
print(f"condition number {float(eig[0] / eig[-1]):.3g}")
assert torch.allclose(H, H.T) and eig[-1] > -1e-6"""),
    md("""
## 4. Saliency, mask and compensation

The textbook OBS saliency w_q² / (2 [H⁻¹]_qq) (plotted below) is not magnitude: a large weight on a
redundant input is cheap to remove. The solver does not apply that rule over all columns at once. Like
SparseGPT it is *sequential*: columns are visited left to right and frozen once done, so column j's cost
and compensation use the inverse Hessian of the columns j… alone, H_F⁻¹ with F = {j, …} (read off a
Cholesky factor: [H_F⁻¹]_jj = U_jj²), and each removed weight's error is pushed onto the columns to its
right only (δw_F = −(w_j/[H_F⁻¹]_jj) (H_F⁻¹)_{:,j}). The mask is picked once per lazy block of 128 columns.
"""),
    code("""from obslib.obs import obs_prune, saliency, reconstruction_error
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
errors"""),
    code("""# invariants: compensation helps, OBS beats magnitude on its own objective
e = errors.set_index("variant")["rel_error"]
assert e["OBS mask + compensation"] < e["OBS mask, no compensation"]
assert e["OBS mask + compensation"] < e["magnitude mask"]
assert abs(float(mask.float().mean()) - sparsity) < 0.01"""),
    md("## 5. One whole block, then the whole model"),
    code("""block = int(layer.split(".")[1])
pipe_b = obslib.load_pipeline(model_dir or S["model_dir"])
rep = obslib.prune(pipe_b, obslib.PruneConfig(sparsity=sparsity, prompts=calib, block_range=(block, block + 1), packages=1, progress=False))
pd.DataFrame(rep["layers"])[["name", "sparsity", "rel_error"]]"""),
    code("""pipe_p = obslib.load_pipeline(model_dir or S["model_dir"])
rep_all = obslib.prune(pipe_p, obslib.PruneConfig(sparsity=sparsity, prompts=calib, packages=4, progress=False))
show = prompts("heldout", 8)
dense_img = obslib.evaluate.generate(pipe, show, seed=0, progress=False)
pruned_img = obslib.evaluate.generate(pipe_p, show, seed=0, progress=False)
fig = plots.image_grid(np.concatenate([dense_img, pruned_img]), [f"dense: {p}" for p in show] + [f"OBS-Diff {sparsity:.0%}: {p}" for p in show])
plots.save(fig, f"{S['figures']}/00_dense_vs_pruned.png")
print(f"actual sparsity {rep_all['sparsity_actual']:.3f}, prune time {rep_all['timings']['total_s']:.1f} s")
assert abs(rep_all["sparsity_actual"] - sparsity) < 0.01"""),
])


def grid_nb(name, title, intro, param_extra, settings_code, table_code, plot_code, checks, chapter):
    """A study chapter: the question and the paper's answer, what runs and why, how to read the table and the
    figure, the finding computed from this run's numbers (with the seeds' spread), what to try next."""
    write(name, [
        md(f"# {title}\n\n**The question.** {chapter['question'].strip()}\n\n{intro.strip()}\n\nMetrics: **PSNR vs dense** "
           "(how faithfully the pruned model reproduces the dense model's images, same prompts and seeds — the quantity "
           "OBS-Diff optimises), **prompt fidelity** (GenEval-style: share of held-out prompts whose every attribute the "
           "evaluator finds; the dense model's is in results/default_model.json), attribute accuracy (share of single "
           "attributes found) and FID on the evaluator's features.\n\nEvery quality number is the mean over `S['seeds']` "
           "seeds (calibration seed s, evaluation seed 1000 + s, held-out prompts), with the standard deviation beside it. "
           "Rows are cached in `results/runs.csv`, so a rerun only computes what is missing. The verdicts of every chapter "
           "are collected in [results/claims.md](../results/claims.md); the method-by-method overview across notebooks "
           "01–03 is `results/methods_table.csv`."),
        params(param_extra),
        code(SETUP),
        md("## What runs, and why these settings\n\n" + chapter["how"].strip()),
        code(settings_code + "\ndf = ex.run_grid(grid, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])\nprint(len(df), 'rows')"),
        md("## The table\n\n" + chapter["table"].strip()),
        code(table_code),
        md("## The figure\n\n" + chapter["figure"].strip()),
        code(plot_code),
        md("## Finding\n\nComputed from the numbers above (a gap counts when it is larger than both standard deviations "
           "over seeds; in quick mode there is one seed and no verdict):"),
        code(chapter["finding"].strip()),
        md("## Try next\n\n" + chapter["next"].strip()),
        code(checks),
    ])


grid_nb("01_unstructured.ipynb", "01 · Unstructured sparsity (Table 1 and Fig. 4 analogues)",
        "Every method at 30–70% unstructured sparsity of all attention/FFN linear layers of the MMDiT, calibrated with "
        "the same prompts, packages (K = 4) and log-decrease weighting (SparseGPT = the same solver with uniform weights).",
        'methods = ["magnitude", "wanda", "dsnot", "sparsegpt", "obs-diff"]',
        """grid = [ex.Setting(method="dense", num_calib=S["num_calib"])]
grid += [ex.Setting(method=m, sparsity=s, num_calib=S["num_calib"]) for m in methods for s in S["sparsities"]]""",
        """summary = ex.summarize(df, ["method", "sparsity"])
summary.to_csv(f"{S['results']}/01_unstructured.csv", index=False)
ex.format_table(summary[summary.sparsity.isin([0.0, 0.5, 0.6])], ["method", "sparsity"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))""",
        """fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
curves = summary[summary.method != "dense"]
plots.metric_lines(curves, "sparsity", "method", "psnr", ax[0], "PSNR vs dense (dB)")
plots.metric_lines(curves, "sparsity", "method", "prompt_fidelity", ax[1], "prompt fidelity (held-out)")
dense = summary[summary.method == "dense"].iloc[0]
ax[1].axhline(dense.prompt_fidelity_mean, color="k", ls="--", lw=1, label="dense")
plots.save(fig, f"{S['figures']}/01_quality_vs_sparsity.png")""",
        """pruned = df[df.method != "dense"]
assert (abs(pruned.sparsity_actual - pruned.sparsity) < 0.01).all()
assert df.prompt_fidelity.between(0, 1).all() and df.attribute_accuracy.between(0, 1).all() and (df.fid >= 0).all()""",
        chapter={'question': "How much of every attention and FFN weight matrix can be zeroed before the images change, and does OBS-Diff's compensated, timestep-weighted solver beat the calibration-free and compensation-free baselines? The paper (Table 1, Fig. 4) says yes by a wide margin on SD3-Medium: at 50% ImageReward .65 for OBS-Diff against −.11 (Wanda), −.59 (DSnoT) and −2.27 (magnitude), and the gap widens at 60%.", 'how': "Every method prunes the same layers (all linear layers of every MMDiT block) at 30–70% with the same 16 calibration prompts, K = 4 packages and log-decrease weights, so the only difference is the criterion and the weight update. SparseGPT is OBS-Diff's own solver with uniform timestep weights: the pair isolates the weighting.", 'table': 'One row per method and sparsity (50% and 60% shown; every sparsity is in `results/01_unstructured.csv`). Higher is better for PSNR, prompt fidelity and attribute accuracy; lower for FID; `prune_s` is the wall time of the prune on this machine.', 'figure': "Left: PSNR against the dense model's images — the closeness OBS-Diff optimises. Right: prompt fidelity, with the dense model as a dashed line. Bands are one standard deviation over seeds. Look for the sparsity where each curve leaves the dense line, and for the order of the methods at 60–70%.", 'finding': 'for sp in sorted(summary[summary.method != "dense"].sparsity.unique()):\n    print(f"{sp:.0%}")\n    for other in ("wanda", "magnitude", "sparsegpt"):\n        for metric in ("prompt_fidelity", "psnr"):\n            print("   ", ex.versus(summary, {"sparsity": sp}, "method", "obs-diff", other, metric))', 'next': "Change `methods` or the grid's `num_calib` (more calibration prompts), or pass `block_range` in a setting's `extra` to prune only some blocks (as the paper did for SD3.5-Large 2:4). Notebook 02 asks the same question for N:M patterns, notebook 04 whether the weighting matters."})


grid_nb("02_semistructured.ipynb", "02 · Semi-structured N:M sparsity (Table 2 analogue)",
        "2:4 and 4:8 patterns (N of every M consecutive inputs of each row removed) for every unstructured method.",
        'methods = ["magnitude", "wanda", "dsnot", "sparsegpt", "obs-diff"]\npatterns = ["2:4", "4:8"]',
        """grid = [ex.Setting(method="dense", num_calib=S["num_calib"])]
grid += [ex.Setting(method=m, pattern=p, sparsity=0.5, num_calib=S["num_calib"]) for m in methods for p in patterns]""",
        """summary = ex.summarize(df, ["method", "pattern"])
summary.to_csv(f"{S['results']}/02_semistructured.csv", index=False)
ex.format_table(summary, ["method", "pattern"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))""",
        """fig, ax = plt.subplots(figsize=(7, 3.4))
sns.barplot(df[df.method != "dense"], x="method", y="psnr", hue="pattern", errorbar="sd", ax=ax)
ax.set_ylabel("PSNR vs dense (dB)")
plots.save(fig, f"{S['figures']}/02_nm_fidelity.png")""",
        """assert (abs(df[df.method != "dense"].sparsity_actual - 0.5) < 0.01).all()""",
        chapter={'question': 'Does OBS-Diff keep its lead when the sparsity pattern is the hardware-friendly N:M (N of every M consecutive inputs of a row removed)? The paper (Table 2, SD3.5-Large 2:4, blocks 3–25) reports ImageReward .45 for OBS-Diff against −.14 (Wanda), .03 (DSnoT) and −.47 (magnitude), with FID within one point of the dense model.', 'how': 'The same methods and calibration as notebook 01, at 2:4 and 4:8 (both 50%). 4:8 is the looser pattern: each group of eight may keep its four best weights, so it should sit between 2:4 and unstructured 50%.', 'table': 'One row per method and pattern. The dense row is the reference (PSNR infinite).', 'figure': 'PSNR against the dense model per method, 2:4 beside 4:8; error bars are one standard deviation over seeds.', 'finding': 'for pattern in [p for p in summary.pattern.unique() if ":" in str(p)]:\n    print(pattern)\n    for other in ("wanda", "magnitude", "sparsegpt"):\n        for metric in ("prompt_fidelity", "psnr"):\n            print("   ", ex.versus(summary, {"pattern": pattern}, "method", "obs-diff", other, metric))', 'next': '`patterns` takes any of `2:4`, `4:8`; on a GPU notebook 07 times the 2:4 kernels. Compare with the 50% rows of notebook 01 to see what the pattern costs.'})


grid_nb("03_structured.ipynb", "03 · Structured: heads and FFN neurons (Tables 3/4/9 analogues)",
        "Attention heads (exact group-OBS saliency, RRF across the image and text output projections) and FFN neurons "
        "are physically removed from every block but the first and the last; compared with L1-norm, FLAP and the peer "
        "method SlimDiff (our reconstruction: spectral slimming of the query-key and value-output head dimensions and of "
        "the FFN width, with a global allocator; `obslib/slimdiff.py`) and the peer method gradient-flow pruning (our "
        "reconstruction: soft gates on the same heads and neurons, GraSP criterion, trained on the model's own "
        "flow-matching loss for `S['gf_iterations']` iterations; `obslib/gradflow.py`). For OBS-Diff, L1-norm, FLAP and "
        "gradient flow the sparsity is the share of heads and neurons removed per block (identical shapes); for SlimDiff "
        "it is the share of the same blocks' attention and FFN parameters removed — compare at equal `params_drop_%`. "
        "A last table is an ablation of gradient flow's criterion: pruning the groups whose removal raises the "
        "gradient norm (the paper's rule) against those whose removal lowers it.",
        'methods = ["obs-diff", "l1-norm", "flap", "slimdiff", "gradient-flow"]',
        """grid = [ex.Setting(method="dense", num_calib=S["num_calib"])]
gf = {"iterations": S["gf_iterations"], "lr": S["gf_lr"]}  # gradient flow trains; the others are one-shot
grid += [ex.Setting(method=m, pattern="structured", sparsity=s, num_calib=S["num_calib"],
                    extra=gf if m == "gradient-flow" else {}) for m in methods for s in S["structured_sparsities"]]
s_mid = S["structured_sparsities"][len(S["structured_sparsities"]) // 2]
grid += [ex.Setting(method="gradient-flow", pattern="structured", sparsity=s_mid, num_calib=S["num_calib"],
                    extra={**gf, "gradient_criterion": "lower"})]""",
        """crit = df.get("extra_gradient_criterion")
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
ex.format_table(abl, ["extra_gradient_criterion"], ("psnr", "prompt_fidelity", "fid", "prune_s"))""",
        """fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
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
alloc.round(3)""",
        """assert (df[df.method != "dense"].params < df[df.method == "dense"].params.iloc[0]).all()
# every method at 50% / 60% unstructured, 2:4 and 20% structured, from the shared run cache (notebooks 01-03)
mt = ex.methods_table(S["runs_csv"], S["num_calib"])
mt.to_csv(f"{S['results']}/methods_table.csv", index=False)
ex.format_table(mt, ["setting", "method"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity", "prune_s"))""",
        chapter={'question': "Can whole attention heads and FFN neurons be removed — a model that is really smaller and faster — and does OBS's group compensation beat criteria without it? The paper (structured results, SD3.5-Large at 15–30%) keeps FID at 32.6–34.5 while L1-norm collapses (FID 159–346). This chapter adds the two peer methods the study was built to compare with: SlimDiff and gradient-flow pruning (our reconstructions).", 'how': "Heads and neurons are removed from every block but the first and the last (the paper's choice), at 10–30%. L1-norm and FLAP are the paper's and our structured baselines; SlimDiff spends one global budget of attention and FFN parameters; gradient flow trains the targeted blocks for `S['gf_iterations']` iterations while its soft gates close. The last grid row reruns gradient flow at the middle sparsity with the opposite criterion.", 'table': "One row per method and sparsity with `params_drop_%` and `flops_drop_%` of the transformer: compare methods at equal parameter drop (SlimDiff's sparsity counts parameters, the others' heads and neurons). The second table is gradient flow's criterion ablation.", 'figure': 'PSNR against the dense model (left) and prompt fidelity (right) against sparsity; the last table is where SlimDiff spent its budget (share of removed parameters by kind of group and stream).', 'finding': 'for sp in sorted(summary[summary.method != "dense"].sparsity.unique()):\n    r = summary[np.isclose(summary.sparsity, sp)].set_index("method")\n    drops = ", ".join(f"{m} −{r.loc[m, \'params_drop_%\']:.1f}%" for m in r.index if m != "dense")\n    print(f"{sp:.0%} (parameters removed: {drops})")\n    for a, b in (("obs-diff", "l1-norm"), ("slimdiff", "obs-diff"), ("obs-diff", "gradient-flow")):\n        print("   ", ex.versus(summary, {"sparsity": sp}, "method", a, b))\nprint("gradient-flow criterion:", ex.versus(abl, {}, "extra_gradient_criterion", "lower", "raise"))\ntop = alloc.sort_values("share_of_removed", ascending=False).iloc[0]\nprint(f"SlimDiff\'s largest share of removed parameters: {top.kind} ({top.stream}) {top.share_of_removed:.0%}")', 'next': "Give gradient flow more iterations or another learning rate (`S['gf_iterations']`, `S['gf_lr']`), or `gradient_criterion='lower'` for every row. An allocator-matched OBS-Diff — SlimDiff's per-group budget solved with OBS — would separate allocation from the solver. `head_saliency='diag'` gives the public code's approximation."})


grid_nb("04_weighting.ipynb", "04 · Timestep weighting ablation (Table 6 analogue)",
        "OBS-Diff at one sparsity with every weighting scheme: the paper's five and our exponential and cosine decreases.",
        'sparsity = 0.6',
        """grid = [ex.Setting(method="obs-diff", sparsity=sparsity, weighting=w, num_calib=S["num_calib"]) for w in obslib.SCHEMES]""",
        """summary = ex.summarize(df, ["weighting"]).sort_values("prompt_fidelity_mean", ascending=False)
summary.to_csv(f"{S['results']}/04_weighting.csv", index=False)
ex.format_table(summary, ["weighting"], ("psnr", "attribute_accuracy", "fid", "kid"))""",
        """fig, ax = plt.subplots(figsize=(8, 3.4))
sns.barplot(df, x="weighting", y="psnr", errorbar="sd", ax=ax, order=summary.weighting)
ax.tick_params(axis="x", rotation=30)
plots.save(fig, f"{S['figures']}/04_weighting.png")""",
        """assert set(df.weighting) == set(obslib.SCHEMES)""",
        chapter={'question': "Does weighting the calibration steps matter, and is the paper's log-decrease (early, noisy steps weigh more) the best scheme? The paper (Table 6, SD3-Medium 50%) ranks log-decrease first with ImageReward .6438, within .03 of every other scheme (uniform .6355).", 'how': "OBS-Diff at 60% sparsity (where differences show most in notebook 01) with every scheme: the paper's five and our exponential and cosine decreases; everything else as in notebook 01.", 'table': 'One row per weighting, best prompt fidelity first.', 'figure': 'PSNR against the dense model per scheme, with one standard deviation over seeds.', 'finding': 'best = summary.iloc[0].weighting\nprint("best prompt fidelity:", best)\nfor metric in ("prompt_fidelity", "psnr"):\n    print(ex.versus(summary, {}, "weighting", "log-decrease", "uniform", metric))\n    print(ex.versus(summary, {}, "weighting", best, "log-decrease", metric))', 'next': "Change `sparsity`, or `alpha_min`/`alpha_max` through a setting's `extra` (the public defaults are 0.8 / 1.2; a wider range makes the schemes differ more)."})


grid_nb("05_packages.ipynb", "05 · Module packages and how to calibrate them (Table 7 analogue)",
        "K contiguous packages of basic units, each calibrated through the already-pruned earlier packages. More packages "
        "hold fewer Hessians at once but, calibrated the paper's way (`resample`: full sampling for every package), cost "
        "one sampling pass each. `propagate` samples once with the dense model, records what enters the first block, and "
        "calibrates each package by replaying that record through its own blocks only, the earlier packages already "
        "pruned (as SparseGPT does layer by layer); only the latents' trajectory stays dense. `block` = one package per "
        "transformer block, `unit` = one per basic unit (the most packages there can be). Memory is the largest set of "
        "float32 Hessians held at once.",
        'sparsity = 0.5\ncalibrations = ["resample", "propagate"]',
        """den = obslib.load_pipeline(S["model_dir"]).transformer
n_blocks = len(obslib.archs.iter_blocks(den, obslib.archs.SD3))
n_units = len(obslib.packages.layer_units(den, obslib.archs.SD3, list(range(n_blocks))))
ks = [n_blocks if k == "block" else n_units if k == "unit" else k for k in S["packages"]]
grid = [ex.Setting(method="obs-diff", sparsity=sparsity, packages=k, num_calib=S["num_calib"],
                   extra={"calibration": c}) for c in calibrations for k in ks]""",
        """df["calibration"] = df.extra_calibration
summary = ex.summarize(df, ["calibration", "packages"], ex.METRICS + ("prune_s", "calibration_s", "hessian_mb"))
summary.to_csv(f"{S['results']}/05_packages.csv", index=False)
t = ex.format_table(summary, ["calibration", "packages"], ("psnr", "prompt_fidelity", "attribute_accuracy", "prune_s"))
t["calibration_s"] = summary.calibration_s_mean.round(1)
t["hessian_MiB"] = summary.hessian_mb_mean.round(2)
k1 = summary[summary.packages == 1].set_index("calibration").prune_s_mean
t["time_vs_K1"] = (summary.prune_s_mean / summary.calibration.map(k1)).round(2).values
t""",
        """fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
for a, (m, lab) in zip(ax, [("hessian_mb", "peak Hessian memory (MiB)"), ("prune_s", "prune time (s)"), ("psnr", "PSNR vs dense (dB)")]):
    sns.pointplot(df, x="packages", y=m, hue="calibration", errorbar="sd", ax=a, dodge=0.2); a.set_ylabel(lab)
plots.save(fig, f"{S['figures']}/05_packages.png")""",
        """for c, part in summary.groupby("calibration"):
    assert part.hessian_mb_mean.is_monotonic_decreasing or len(part) < 2
one = summary[summary.packages == 1].set_index("calibration")
if len(one) == 2:  # K = 1: propagate samples exactly as resample does (same Hessians, same model)
    assert abs(one.loc["propagate", "psnr_mean"] - one.loc["resample", "psnr_mean"]) < 1e-6""",
        chapter={'question': 'How many module packages, and must every package be calibrated by sampling again? Each package is calibrated through the already-pruned earlier ones, so more packages hold fewer Hessians at once. The paper (Table 7, SD3-Medium 30%) finds memory 30.7 → 22.1 GB and time 572 → 2,595 s from K = 1 to 20 (4.5×, every package re-runs full sampling), with “no clear relation” to quality.', 'how': 'OBS-Diff at 50% with K = 1, 2, 4, 8, one package per block and one per basic unit, each calibrated both ways (`resample`, the paper\'s; `propagate`, ours). The question for propagate: does K = every unit cost at most 1.5× of K = 1 while its quality stays within the seeds\' spread of resample?', 'table': 'One row per calibration and K: quality, prune time (calibration + solve), calibration time, the peak Hessian memory and the time relative to the same calibration\'s K = 1.', 'figure': 'Peak Hessian memory, prune time and PSNR against K, one line per calibration.', 'finding': 's = summary.set_index(["calibration", "packages"])\nk_lo, k_hi = summary.packages.min(), summary.packages.max()\nfor c in summary.calibration.unique():\n    lo, hi = s.loc[(c, k_lo)], s.loc[(c, k_hi)]\n    print(f"{c}: K={k_lo} -> K={k_hi}: Hessian memory {lo.hessian_mb_mean:.1f} -> {hi.hessian_mb_mean:.1f} MiB, "\n          f"prune time {lo.prune_s_mean:.1f} -> {hi.prune_s_mean:.1f} s ({hi.prune_s_mean / lo.prune_s_mean:.2f}x)")\nfor k in sorted(summary.packages.unique()):\n    for metric in ("prompt_fidelity", "psnr"):\n        print(ex.versus(summary, {"packages": k}, "calibration", "propagate", "resample", metric))', 'next': "`S['packages']` takes any K (and `block`, `unit`). On a real model, watch the memory line each package prints (and the record's size in propagate mode: it goes to disk above `--record-ram-mb`); `--resume` makes many packages safe to interrupt. Notebook 07 has the solver's speed, `results/scale.md` the projection to real model sizes."})


grid_nb("06_calibration_robustness.ipynb", "06 · Calibration size and robustness (Fig. 3 and App. D analogues)",
        "Quality against the number of calibration prompts; then the pruned model (calibrated at the default CFG, step "
        "count and Euler sampler) evaluated with other CFG scales, step counts and the Heun sampler, beside the dense model "
        "under the same change.",
        'sparsity = 0.5',
        """grid = [ex.Setting(method="obs-diff", sparsity=sparsity, num_calib=n) for n in S["calib_sizes"]]
robust = []
for method in ("dense", "obs-diff"):
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_guidance=g) for g in S["cfg_values"]]
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_steps=st) for st in S["step_values"]]
    robust += [ex.Setting(method=method, sparsity=sparsity, num_calib=S["num_calib"], eval_sampler="heun")]
df_r = ex.run_grid(robust, S['seeds'], S['runs_csv'], model_dir=S['model_dir'], num_prompts=S['num_eval_prompts'])""",
        """summary = ex.summarize(df, ["num_calib"])
summary.to_csv(f"{S['results']}/06_calibration_size.csv", index=False)
rob = df_r.copy()
rob["change"] = np.select([rob.eval_guidance.notna(), rob.eval_steps.notna(), rob.eval_sampler == "heun"],
                          ["CFG " + rob.eval_guidance.astype(str), "steps " + rob.eval_steps.astype(str), "Heun sampler"], "default")
rsum = ex.summarize(rob, ["change", "method"])
rsum.to_csv(f"{S['results']}/06_robustness.csv", index=False)
display(ex.format_table(summary, ["num_calib"], ("attribute_accuracy", "psnr", "fid", "prompt_fidelity")))
ex.format_table(rsum, ["change", "method"], ("prompt_fidelity", "fid"))""",
        """fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
plots.metric_lines(summary.assign(m="obs-diff"), "num_calib", "m", "psnr", ax[0], "PSNR vs dense (dB)"); ax[0].set_xscale("log", base=2)
sns.barplot(rob, x="change", y="prompt_fidelity", hue="method", errorbar="sd", ax=ax[1]); ax[1].tick_params(axis="x", rotation=30)
plots.save(fig, f"{S['figures']}/06_calibration_robustness.png")""",
        """assert len(summary) == len(S["calib_sizes"])""",
        chapter={'question': 'How many calibration prompts does OBS-Diff need, and does a model pruned under one sampling setting hold up under others? The paper (Fig. 3) sees quality rise steeply up to ~100 prompts, then flatten; App. D (SD3-M 50%) shows the pruned model tracking the dense one under other CFG scales, step counts and the Heun sampler.', 'how': 'OBS-Diff at 50% with 2–128 calibration prompts; then the model pruned with the default settings (16 prompts, CFG 4, 20 Euler steps) evaluated at other CFG scales, step counts and with Heun, beside the dense model under the same change.', 'table': 'First table: quality against the number of calibration prompts. Second: prompt fidelity and FID of dense and pruned under each change of sampling.', 'figure': 'Left: PSNR against the number of calibration prompts (log scale). Right: prompt fidelity of dense and pruned under each change.', 'finding': 'n_lo, n_hi = summary.num_calib.min(), summary.num_calib.max()\nprint(ex.versus(summary, {}, "num_calib", n_hi, n_lo, "psnr"))\nfor change in rsum.change.unique():\n    print(change, "—", ex.versus(rsum, {"change": change}, "method", "dense", "obs-diff"))', 'next': "Add sizes to `S['calib_sizes']`, or evaluate with other samplers (`eval_sampler`). The calibration prompts are the training split's; a held-out set would test calibration drift."})


write("07_speed.ipynb", [
    md("""
# 07 · Speed

**The question.** Does a structurally pruned model actually run faster, and by as much as its FLOPs drop? The paper
reports one SD3.5-Large block at 1024² (batch 4): 1.03 / 1.20 / 1.29 / 1.31× at 15 / 20 / 25 / 30% structured and
1.23× for 2:4 on sparse kernels; no end-to-end timings were published.

Wall time of the dense and the structurally pruned transformer (one CFG-batched forward) and of the whole
pipeline on the CPU, medians over repeats, with the FLOPs ratio beside it. On a machine with CUDA, the
2:4 semi-structured kernels (`torch.sparse.to_sparse_semi_structured`) are timed against dense matmuls;
without a GPU that cell says so and is skipped. Verdicts across chapters: [results/claims.md](../results/claims.md).
"""),
    params('sparsities = [0.1, 0.2, 0.3]'),
    code(SETUP),
    md("""## What runs

OBS-Diff structured at each sparsity (the shapes notebook 03 scores), timed on this machine with
`S['timing_repeats']` repeats after a warm-up; time only on an idle machine (2 cores slow ~20× under load).
The table gives medians with min/max; `flops_ratio_inv` is the speedup the FLOPs alone would predict.
"""),
    code("""table = ex.speed_table(S["model_dir"], sparsities if S["mode"] == "full" else sparsities[1:2], repeats=S["timing_repeats"],
                      num_calib=S["num_calib"])
table.to_csv(f"{S['results']}/07_speed.csv", index=False)
table"""),
    code("""fig, ax = plt.subplots(figsize=(6, 3.2))
t = table.set_index("variant")
t[["transformer_speedup", "pipeline_speedup", "flops_ratio_inv"]].plot.bar(ax=ax)
ax.set_ylabel("× vs dense"); ax.axhline(1, color="k", lw=1)
plots.save(fig, f"{S['figures']}/07_speed.png")"""),
    md("""## Finding

Measured speedups against what the FLOPs predict (the gap is overhead that does not shrink with width:
normalisations, attention softmax, the VAE and text encoders in the pipeline):
"""),
    code("""for _, r in table[table.variant != "dense"].iterrows():
    print(f"{r.variant}: transformer {r.transformer_speedup:.2f}x, pipeline {r.pipeline_speedup:.2f}x, "
          f"FLOPs predict {r.flops_ratio_inv:.2f}x ({r.params:,} parameters)")"""),
    md("""## Try next

Run on a GPU (the 2:4 cell then times the sparse kernels), or raise `S['timing_repeats']`. Batch size and image
size change the balance between the linear layers (which shrink) and everything else.
"""),
    code("""cuda = ex.semi_structured_benchmark()
print(cuda["message"])
if cuda["rows"]:
    pd.DataFrame(cuda["rows"]).to_csv(f"{S['results']}/07_speed_2to4_cuda.csv", index=False)
pd.DataFrame(cuda["rows"])"""),
    code("""assert (table.loc[table.variant != "dense", "params"] < table.loc[table.variant == "dense", "params"].iloc[0]).all()"""),
])
