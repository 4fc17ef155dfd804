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
# pipeline on the CPU, medians over repeats, with the speed-up that the FLOPs alone predict beside it. On a machine
# with CUDA, the 2:4 semi-structured kernels (`torch.sparse.to_sparse_semi_structured`) are timed against dense
# matmuls; without a GPU that cell says so and is skipped. Metrics: [glossary](00_walkthrough.ipynb#Glossary-of-the-metrics);
# verdicts across chapters: [results/claims.md](../results/claims.md).

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
model_dir = None  # another embedded model, e.g. "models/shapes-flux": its tables and figures go to results/<name>/ and figures/<name>/ (default: models/shapes-sd3)
sparsities = [0.1, 0.2, 0.3]
attempts = 3         # measurements of a variant before its numbers are kept as rejected
pause_s = 10.0       # seconds between attempts
batch_prompts = 16   # prompts per pipeline call (the transformer runs twice as many rows: CFG)

# %%
import os
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
from IPython.display import display
from obslib import study
from obslib.study import timing, plots
from obslib.shapes.world import IMAGE_SIZE
S = study.settings(mode, model_dir)  # grid sizes of this mode, the model and output folders
if S["mode"] == "quick":          # a smoke test: one pruned variant, two prompts, one attempt (problems recorded)
    sparsities, attempts, pause_s, batch_prompts = sparsities[1:2], 1, 0.0, 2
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
rel = study.rel
start = timing.idle_check()
print(S["mode"], "->", rel(S["results"]))
print(f"before timing: 1-minute load average {start['load_1m']:.2f} on {start['cpus']} usable cores, other processes "
      f"using {start['busy_share']:.0%} of the CPUs; torch threads {torch.get_num_threads()}")

# %% [markdown]
# ## What runs
#
# OBS-Diff structured at each sparsity (the shapes notebook 03 scores), and chapter 03's equal-parameter variants
# (global OBS-Diff and SlimDiff at each budget). Per variant the pipeline runs once to find its transformer calls (how
# many, at which batch). Dense is timed on its own; every pruned variant is timed **in alternation with dense**, call
# by call (the order swapped every pair), 7 transformer forwards (quick mode: 2; `S['timing_repeats']`) and half as many whole-pipeline
# runs (at least two), each after a warm-up: its speed-up is the median of the per-pair ratios, its spread their
# minimum and maximum, so drift of a shared machine over minutes hits dense and the variant alike.
#
# A measurement is kept only if the machine was idle when it started (load average not above the core count, other
# processes using at most 10% of the CPUs while this one sleeps) and its numbers are plausible: no maximum above
# 1.5× its median, and the pipeline not faster than its own transformer calls. Otherwise it is repeated after a
# pause, up to `attempts` times; a variant still rejected then keeps `accepted = False` and the reasons. The table
# gives medians with min/max, the speed-ups against dense with their spread (per-pair ratios for pruned variants), and
# `flops_ratio_inv`, the speed-up the FLOPs alone predict (FLOPs of the timed call, counted by torch). (Quick mode: one pruned variant, two prompts, one attempt.)

# %%
budgets = S["param_budgets"] if S["mode"] != "quick" else []   # quick: no budget variants
table = timing.speed_table(S["model_dir"], sparsities, repeats=S["timing_repeats"], num_calib=S["num_calib"],
                           batch_prompts=batch_prompts, attempts=attempts, pause_s=pause_s,
                           variants=timing.budget_variants(budgets))
csv = f"{S['results']}/07_speed.csv"
table.to_csv(csv, index=False)
print("wrote", rel(csv))
display(table[["variant", "params_removed", "gflops", "transformer_ms", "transformer_ms_min", "transformer_ms_max",
               "pipeline_s", "transformer_speedup", "pipeline_speedup", "flops_ratio_inv", "transformer_vs_flops",
               "attempts", "load_at_start", "accepted"]].round(3))

# %% [markdown]
# Speed-up against the share of the transformer's parameters that pruning removed, the FLOPs prediction as a dashed
# line. Bars are the spread of each speed-up (dense fastest / pruned slowest .. dense slowest / pruned fastest);
# hollow markers are measurements that failed the checks.

# %%
fig, ax = plt.subplots(figsize=(6.4, 3.6))
x = 100 * table.params_removed
dx = 0.012 * max(x.max(), 1)      # the two series side by side at each setting
ok, pruned = table.accepted.astype(bool), table.kind == "nominal"   # the budget variants: the table and the text
for kind, ls, name in (("nominal", "--", "uniform OBS-Diff"), ("budget", ":", "equal-budget variants")):
    k = (table.kind == kind) | (table.kind == "dense")  # one FLOPs line per series, from dense, sorted by size
    if (table.kind == kind).any():
        line = table[k].sort_values("params_removed")
        ax.plot(100 * line.params_removed, line.flops_ratio_inv, "k" + ls, lw=1.1, label=f"FLOPs predict ({name})")
for part, shift, color, label in (("transformer", -dx, "C0", "transformer forward"), ("pipeline", dx, "C1", "whole pipeline")):
    y = table[f"{part}_speedup"]
    sel = table.kind != "dense"
    err = np.vstack([y - table[f"{part}_speedup_lo"], table[f"{part}_speedup_hi"] - y])[:, sel]
    ax.errorbar(x[sel] + shift, y[sel], yerr=err, color=color, lw=1, capsize=3, ls="none")
    for keep, fill, word in ((ok & table[f"{part}_quoted"], color, "measured"),
                             (~(ok & table[f"{part}_quoted"]) & sel, "none", "not quoted (rejected, or medians disagree)")):
        if keep.any():
            ax.plot(x[keep] + shift, y[keep], "o", color=color, mfc=fill, label=f"{label}, {word}")
for _, r in table[table.kind == "budget"].iterrows():  # the budget variants by name
    ax.annotate(r.variant, (100 * r.params_removed, r.transformer_speedup), fontsize=6, xytext=(3, -9),
                textcoords="offset points")
top = ax.secondary_xaxis("top")  # which setting each point is, off the data
top.set_xticks(x[pruned], [f"{v:.0%}" for v in table.sparsity[pruned]], fontsize=8)
top.set_xlabel("structured sparsity setting", fontsize=8)
ax.axhline(1, color="grey", lw=0.8)
ax.set_xlabel("parameters removed from the transformer (%)")
ax.set_ylabel("speed-up vs dense (×, median wall time)")
ax.set_title(f"OBS-Diff structured on the CPU ({int(table.threads.iloc[0])} threads), transformer batch "
             f"{int(table.cfg_batch.iloc[0])} (CFG), {int(table.steps.iloc[0])} steps", fontsize=10)
ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
plots.save(fig, f"{S['figures']}/07_speed.png")

# %% [markdown]
# ## Finding
#
# For each setting: the measured transformer speed-up against the FLOPs prediction (below / at / above, "at" when
# the prediction lies inside the measured spread), the pipeline's speed-up against what the transformer's own
# speed-up would give it (its share of the dense pipeline's time, Amdahl's law), and how each measurement fared.

# %%
d = table.iloc[0]
share = min(1.0, d.steps * d.transformer_ms / 1000 / d.pipeline_s)
print(f"dense: the {int(d.steps)} transformer calls take {share:.0%} of the pipeline's {d.pipeline_s:.2f} s "
      f"({int(d.steps)} × {d.transformer_ms:.1f} ms)")
for _, r in table[table.kind != "dense"].iterrows():
    amdahl = 1 / (share / r.transformer_speedup + 1 - share)
    flag = "" if r.speedup_accepted else " [rejected]"
    if r.speedup_accepted and not r.transformer_quoted:
        flag = (f" [no speed-up quoted: per-pair median {r.transformer_speedup:.2f}× but median {r.transformer_ms:.1f} ms "
                f"against dense {d.transformer_ms:.1f} ms]")
    print(f"{r.variant}{flag} ({r.params_removed:.1%} of parameters removed): transformer {r.transformer_speedup:.2f}× "
          f"(spread {r.transformer_speedup_lo:.2f}–{r.transformer_speedup_hi:.2f}×), FLOPs predict "
          f"{r.flops_ratio_inv:.2f}× -> {r.transformer_vs_flops} the FLOPs ratio; pipeline {r.pipeline_speedup:.2f}× "
          f"(the transformer's speed-up alone would give {amdahl:.2f}×)")
vs = set(table.transformer_vs_flops[(table.variant != "dense") & table.speedup_accepted])
if not table.speedup_accepted.all():
    print("Rows whose own or dense measurement was rejected are not read against the FLOPs ratio.")
if "below" in vs:
    print("Below the FLOPs ratio: the gap is time that does not shrink with width (normalisations, attention "
          "softmax, launch overhead); this table does not measure those parts separately.")
if "above" in vs:
    print("Above the FLOPs ratio: wall time fell by more than the counted FLOPs, so FLOPs alone do not predict time "
          "at this size (matmul shapes and caches count too); this table does not say which.")
for _, r in table.iterrows():
    state = (f"accepted on attempt {r.attempts}" if r.accepted else
             f"REJECTED after {r.attempts} attempt(s): {r.problems}")
    print(f"  {r.variant}: {state} (load average {r.load_at_start:.2f}, other processes {r.busy_at_start:.0%} at start)")

# %% [markdown]
# ## 2:4 kernels on a GPU
#
# Only on a machine with CUDA: 2:4 semi-structured against dense fp16 matmuls at SD3.5-Large's linear-layer shapes,
# checked like the table above.

# %%
cuda = timing.semi_structured_benchmark()
print(cuda["message"])
if cuda["rows"]:
    cuda_csv = f"{S['results']}/07_speed_2to4_cuda.csv"
    pd.DataFrame(cuda["rows"]).to_csv(cuda_csv, index=False)
    print("wrote", rel(cuda_csv))
    display(pd.DataFrame(cuda["rows"]).round(3))

# %% [markdown]
# ## At real layer shapes
#
# The transformer above is 3.5 M parameters at 48 px. What a user of structured pruning wants is the speed of a real
# block. `make bench-speed` (`python -m obslib.study.bench_speed`, about 20 minutes on 2 cores: a benchmark this
# chapter reads, never reruns) cuts one random-initialised SD3-Medium joint block and one Flux.1 single-stream block,
# at 1024² images' token counts, to the shapes each method gives the embedded models at 10, 20 and 30% of their
# parameters (kept heads, ranks and neurons per part of a block, scaled to the real one), and times each against the
# dense block call by call. How to read it: `speedup` is the median of per-pair ratios (dense / pruned) with its
# range, `flops_speedup` what the FLOPs predict, `efficiency` their ratio (1: time falls as fast as the FLOPs). Below
# the table, each dense call's arithmetic rate (GFLOP/s) and the median efficiency, for the embedded transformer and
# for the real blocks: a small call that runs at a lower rate spends more of its time on work that does not shrink
# with width (normalisations, softmax, reshapes, Python), so its speed-ups fall further below the FLOPs ratio.

# %%
real = timing.real_shape_rows(S["speed_real"])
if real is None:
    print(f"{rel(S['speed_real'])} is not there yet: run `make bench-speed` (about 15 minutes on 2 idle cores).")
else:
    display(real[["block", "variant", "budget", "shapes_from", "params_ratio", "flops_speedup", "dense_ms", "pruned_ms",
                  "speedup", "speedup_lo", "speedup_hi", "efficiency"]].round(3))
    small = d.gflops / (d.transformer_ms / 1000)
    big = real.groupby("block").dense_gflops_per_s.median()
    eff_small = (table.transformer_speedup / table.flops_ratio_inv)[(table.kind != "dense") & table.speedup_accepted.astype(bool)]
    eff_big = real.groupby("block").efficiency.median()
    print(f"Arithmetic rate of the dense call: the embedded transformer {small:.0f} GFLOP/s "
          f"({d.gflops:.2f} GFLOP in {d.transformer_ms:.1f} ms); at real shapes "
          + ", ".join(f"{b} {v:.0f} GFLOP/s" for b, v in big.items()) + f" ({real.attrs['image_tokens']} image tokens, "
          f"{real.attrs['threads']} threads).")
    print(f"Median efficiency (speed-up / FLOPs ratio): the embedded transformer "
          + (f"{eff_small.median():.2f} over its {len(eff_small)} accepted pruned rows" if len(eff_small) else "n/a")
          + "; at real shapes " + ", ".join(f"{b} {v:.2f}" for b, v in eff_big.items()) + ".")
    lower = small < 0.7 * big.min()
    print(("The embedded call runs at well under the real blocks' rate: a larger share of its time is work that does "
           "not shrink with width, which is why its speed-ups say little about a real model's." if lower else
           "The embedded call runs at a rate close to the real blocks' (not overhead-bound on this machine); what "
           "separates its speed-ups from the FLOPs ratio is mostly their spread at a few tens of milliseconds."))
    for b, g in real.groupby("block"):
        for v, h in g.groupby("variant"):
            print(f"{b}, {v}: " + "; ".join(f"{r.budget:.0%} of the parameters → {r.speedup:.2f}× "
                                            f"[{r.speedup_lo:.2f}, {r.speedup_hi:.2f}] (FLOPs predict {r.flops_speedup:.2f}×)"
                                            for _, r in h.sort_values("budget").iterrows()))
    for note in real.attrs["notes"]:
        print("Note:", note)

# %% [markdown]
# ## Answer

# %%
PAPER = {0.15: 1.03, 0.2: 1.20, 0.25: 1.29, 0.3: 1.31}  # one SD3.5-Large block, 1024², batch 4
p = table[table.kind == "nominal"]
n_bad = int((~table.accepted.astype(bool)).sum())
span = lambda a, b, f="{}": f.format(a) if f.format(a) == f.format(b) else f.format(a) + "–" + f.format(b)
print("Every measurement passed the idle and plausibility checks (load average "
      f"{span(table.load_at_start.min(), table.load_at_start.max(), '{:.2f}')} at start, "
      f"{span(table.attempts.min(), table.attempts.max())} attempt(s) per variant)." if n_bad == 0 else
      f"{n_bad} of {len(table)} measurements still failed the idle or plausibility checks after "
      f"{table.attempts.max()} attempt(s) (reasons above), so the speed-ups below are not trustworthy; "
      "rerun on an idle machine.")
q = lambda r: f"{r.transformer_speedup:.2f}×" if r.transformer_quoted else "no quoted speed-up"
print(f"Structurally pruned by OBS-Diff at {' / '.join(f'{s:.0%}' for s in p.sparsity)}, the transformer ran "
      f"{' / '.join(q(r) for _, r in p.iterrows())} (as fast as dense; quoted only where the paired ratio and the medians "
      "agree in direction) where the FLOPs predict "
      f"{' / '.join(f'{v:.2f}' for v in p.flops_ratio_inv)}× ({', '.join(p.transformer_vs_flops)} the prediction), "
      f"and the whole {int(d.steps)}-step pipeline {' / '.join(f'{v:.2f}' for v in p.pipeline_speedup)}×.")
both = [(r, PAPER[round(r.sparsity, 2)]) for _, r in p.iterrows() if round(r.sparsity, 2) in PAPER]
good = [(r, q) for r, q in both if r.speedup_accepted and r.transformer_quoted]
skipped = [f"{r.sparsity:.0%}" for r, q in both if not r.speedup_accepted]
if both and not good:
    print("With rejected measurements nothing follows for the paper's 1.20–1.31× per-block claim at 20–30% structured.")
elif good:
    print("Against the paper's per-block speed-ups: " + "; ".join(
        f"{r.sparsity:.0%} structured measured {r.transformer_speedup:.2f}×, "
        f"{timing.compare_to_flops(r.transformer_speedup_lo, r.transformer_speedup_hi, q)} the paper's {q:.2f}×"
        for r, q in good) + (f" ({', '.join(skipped)} rejected, not compared)" if skipped else "") +
        "; another model, size and device, so this tells whether the claim's direction holds here, not its numbers.")
bv = table[table.kind == "budget"]
if len(bv):
    print("At equal shares of the targeted parameters (chapter 03's variants): " + "; ".join(
        f"{r.variant} ({r.params_removed:.1%} of the transformer) {q(r)} "
        f"(FLOPs predict {r.flops_ratio_inv:.2f}×){'' if r.speedup_accepted else ' [rejected]'}" for _, r in bv.iterrows())
        + ".")
print(f"This CPU study of a {int(d.params) / 1e6:.1f}M-parameter transformer at {IMAGE_SIZE}² pixels says nothing "
      "about GPU kernels (the 2:4 cell " + ("timed them" if cuda["rows"] else "was skipped: no CUDA") +
      ") or about 1024² images, where attention and the linear layers weigh differently.")

# %% [markdown]
# ## Try next
#
# Run on a GPU (the 2:4 cell then times the sparse kernels), or raise `S['timing_repeats']` (now 7 forwards per pair). Batch size and image
# size change the balance between the linear layers (which shrink) and everything else.

# %%
assert (table.loc[table.variant != "dense", "params"] < table.loc[table.variant == "dense", "params"].iloc[0]).all()
