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
# # 09 · Which verdicts survive a rerun?
#
# **The question.** Chapters 01–08 each judge their comparisons on three seeds with an interval that resamples the prompts of every seed but never the seeds. A seed decides the calibration draw — which pruned model exists — and the evaluation noise, so those intervals say how sure we are about three particular pruned models, not about the method. Rerun on seeds the study never used, the paper's own claim (the timestep-aware Hessian ahead of the uniform one at 50%) flipped sign. This chapter reruns every comparison `results/claims.md` quotes — the paper's claims and the study's own hypotheses from chapters 01–08 — under rules meant to survive a second reader:
#
# 1. **The seed is the unit of replication.** Every comparison here rests on 5 study seeds, and its 95% interval comes from a *two-level* paired bootstrap: seeds resampled, then prompts within each drawn seed, the same indices for both settings (`obslib.study.compare.bootstrap_test`). Its p-value comes from the same replicates, so a verdict and the p beside it never disagree.
# 2. **A claim is a family.** Its settings × metrics are corrected together by Holm's step-down method; the verdict after Holm decides, the unadjusted one is shown beside it.
# 3. **One numerical regime.** Every row is computed under one stated regime (torch version, thread count, the CPU kernel sets of torch, MKL and oneDNN), which is part of its cache key (`obslib.study.experiments.regime`); a row of another regime is recomputed, never paired. Section 3 measures how far the regime alone moves masks and metrics.
# 4. **Held-out seeds.** Every comparison is scored again on seeds nothing was chosen on; a verdict *replicates* when the held-out estimate agrees.
#
# The paper (OBS-Diff) claims that OBS-Diff beats Wanda, DSnoT and magnitude pruning at 50% and 60% unstructured and 2:4, that it beats L1-norm structured pruning, and (its weighting ablation) that log-decrease timestep weights beat uniform ones; it also reports that more calibration prompts help up to about 100, that more packages cost time but not quality, and that a pruned model keeps its quality under other CFG, steps and samplers. The study's own hypotheses: refitting the kept weights, global allocations (unstructured and structured), other weightings (stronger, one-sided, measured), the structured peers and the decomposition of their gap into allocation and solver. The premise (an early error hurts more) is a family too — chapter 08's halves (pruned weights at 50% unstructured and 20% structured, and the equal-size noise) on the study and held-out seeds, read on prompt fidelity, the mean of per-image dB, the pooled pixel MSE and SSIM — and section 5 reads every other summary from chapter 08's window rows. Metrics and the glossary of the comparisons: [00](00_walkthrough.ipynb#Glossary-of-the-metrics).

# %% tags=["parameters"]
mode = "full"  # "quick" = the tiny grid run by `make test` (also set by OBSLIB_MODE)
model_dir = None  # another embedded model, e.g. "models/shapes-flux": its tables and figures go to results/<name>/ and figures/<name>/ (default: models/shapes-sd3)

# %%
import os
import numpy as np, pandas as pd, matplotlib.pyplot as plt, seaborn as sns
import torch
import obslib
from obslib import study
from obslib.study import experiments as ex, plots, compare as cmp, verdicts as vd, timesteps as ts
S = study.settings(mode, model_dir)  # grid sizes of this mode, the model and output folders
torch.set_num_threads(int(os.environ.get("OBSLIB_THREADS", os.cpu_count())))
sns.set_theme(style="whitegrid", font_scale=0.9)
print(S["mode"], "mode: tables ->", study.rel(S["results"]), "| figures ->", study.rel(S["figures"]))
print("numerical regime of this run:", ex.regime())

# %% [markdown]
# ## 1 · What runs, and why these settings
#
# Each family below is one claim; its comparisons are "a ahead of b" in the claimed direction. The settings are the chapters' own (16 calibration prompts, K = 4 packages, 64 held-out prompts per seed), so the rows are the same ones chapters 01–08 compute under this regime (a chapter rerun after this one reads them from the cache). SparseGPT is OBS-Diff's solver with uniform timestep weights (a test checks that their rows are bit-identical), so OBS-Diff − SparseGPT *is* the paper's weighting claim. The study seeds are 0–4; where a claim's verdict came out close on them (the paper's weighting claim at 50%: Holm p = 0.049 on 5 seeds), five more study seeds (5–9) are spent on it. The held-out seeds 100–102 were fixed before any of their rows existed and never chose anything.

# %%
fams = vd.families(S["num_calib"], S["structured_sparsities"], keys=S["verdict_families"], grid=S)
seeds, heldout = S["verdict_seeds"], S["heldout_seeds"]
pd.DataFrame([{"family": f.key, "claim": f.claim, "source": f.source,
               "comparisons": f"{len(f.pairs)} settings × {len(f.metrics)} metrics"} for f in fams])

# %%
more = S["verdict_more_seeds"]
df = vd.run(fams, list(seeds) + list(heldout), S["runs_csv"], more_seeds=more, model_dir=S["model_dir"],
            num_prompts=S["num_eval_prompts"])
print(len(df), "rows:", len(seeds), "study seeds +", len(heldout), "held-out seeds ×", S["num_eval_prompts"],
      "held-out prompts, one regime:", df.key.str.split("|").str[0].str.split("/").str[-1].unique().tolist())
for k, extra in more.items():
    print(f"family '{k}': {len(extra)} more study seeds ({', '.join(map(str, extra))}), its verdict being close on the first {len(seeds)}")

# %% [markdown]
# ## 2 · Every comparison, on the study seeds and on the held-out seeds
#
# One row per comparison (`n_seeds`: the study seeds it rests on): the difference a − b on the study seeds with its two-level 95% interval, the bootstrap p, the Holm-adjusted p within the claim and both verdicts; then the same on the held-out seeds, and whether it replicates (`yes`: same sign and, for a detected difference, detected again; `weaker`: same sign, not detected on three seeds; `no`: the sign flips, or an undetected difference is detected after all). The table is written to `results/verdicts.csv`; `results/claims.md` quotes it.

# %%
# NBVAL_CHECK_OUTPUT
J = vd.judge(df, fams, seeds, heldout, more_seeds=more)
J.to_csv(f"{S['results']}/verdicts.csv", index=False)
show = J.assign(**{
    "study: a − b [95%]": [f"{cmp.signed(r['diff'], cmp.PAIRED[r.metric][3])} [{cmp.signed(r.lo, cmp.PAIRED[r.metric][3])}, {cmp.signed(r.hi, cmp.PAIRED[r.metric][3])}]" for _, r in J.iterrows()],
    "p / Holm p": [f"{cmp.pvalue(r.p)} / {cmp.pvalue(r.p_holm)}" for _, r in J.iterrows()],
    "held-out: a − b [95%]": [f"{cmp.signed(r.heldout_diff, cmp.PAIRED[r.metric][3])} [{cmp.signed(r.heldout_lo, cmp.PAIRED[r.metric][3])}, {cmp.signed(r.heldout_hi, cmp.PAIRED[r.metric][3])}]" for _, r in J.iterrows()]})
show[["context", "a", "b", "metric", "n_seeds", "study: a − b [95%]", "p / Holm p", "verdict", "verdict_holm",
      "held-out: a − b [95%]", "heldout_verdict", "replicates"]]

# %% [markdown]
# **How to read the figure.** One line per comparison and metric: circles are the study seeds' difference with its two-level interval (filled where detected after Holm), squares the held-out seeds' (filled where the interval excludes zero). A comparison replicates when the square sits on the same side of zero as the circle. The held-out intervals are wider: three seeds against five.

# %%
plots.replication_panels(J, f"{S['figures']}/09_replication.png",
                         title="a − b on the study seeds (circles) and on held-out seeds (squares), 95% two-level intervals")

# %% [markdown]
# **How far apart the seeds are.** The per-seed mean differences below are what the old interval ignored: where the dots of one comparison straddle zero, a three-seed, prompts-only interval could come out "ahead" on one set of seeds and "behind" on another.

# %%
plots.seed_differences(vd.seed_table(df, fams, "prompt_fidelity", heldout), f"{S['figures']}/09_seed_differences.png",
                       title="prompt fidelity, a − b, one dot per seed")

# %% [markdown]
# ## 3 · One claim, one verdict
#
# The families' verdicts: after Holm on the study seeds (the verdict), unadjusted beside it, and the held-out seeds' verdict after Holm. The paper's claims read *reproduced / not reproduced*, the study's own hypotheses *supported / not supported*; *partly* when some comparisons of the family are detected in the claimed direction and none against it.

# %%
# NBVAL_CHECK_OUTPUT
claims = vd.claim_table(J)
claims

# %% [markdown]
# ## 4 · The noise floor: one setting under two numerical regimes
#
# The same prune and evaluation under 1 and 2 torch threads: float32 reductions are summed in another order, the Hessians differ in their last bits, and where two weights' OBS costs are nearly tied the mask can flip — and the images follow. Below, per seed: mask positions that flip, and how far prompt fidelity and PSNR move; then the two regimes compared as if they were two methods. A difference between two methods smaller than this is not one this study can resolve unless both are computed under one regime — which is why the regime is part of every row's key.

# %%
floors, floor_cmp = [], []  # not checked by nbval: two threads may sum in another order from run to run
for pattern, sp in S["noise_floor"]:
    s = ex.Setting(method="obs-diff", pattern=pattern, sparsity=sp, num_calib=S["num_calib"])
    per_seed, c = vd.noise_floor(s, seeds, S["noise_threads"], S["runs_csv"], f"{S['results']}/09_noise_floor.csv",
                                 model_dir=S["model_dir"], num_prompts=S["num_eval_prompts"])
    floors.append(per_seed.assign(setting=f"{sp:.0%} {pattern}" if pattern != "2:4" else "2:4"))
    floor_cmp += c
floors = pd.concat(floors, ignore_index=True)
floors.to_csv(f"{S['results']}/09_noise_floor.csv", index=False)
print(floors[["setting", "seed", "mask_positions_flipped", "share_of_pruned_positions", "prompt_fidelity_a", "prompt_fidelity_b",
              "psnr_a", "psnr_b", "images_changed"]].round(4).to_string(index=False))
cmp.table(floor_cmp)

# %% [markdown]
# ## 5 · The premise on every metric
#
# Chapter 08 pruned the model in one window of steps only and read the damage as the mean of per-image PSNR, which says the *last* steps hurt most. The same per-image values read other ways (`obslib.study.timesteps.premise_metrics`, from chapter 08's rows: 3 seeds × 64 prompts per window) tell another story. The mean of dB weighs every image alike — a typical image; the PSNR of the pooled MSE weighs images by their error — total pixel damage, dominated by the few images that changed a lot; the median and the share of images below 30 dB separate "a few images a lot" from "every image a little"; SSIM reads structure; two columns count prompts whose fidelity verdict differs from the dense image's, and images whose composition changed (the evaluator's reading scores another share of the prompt's attributes than on the dense image: a lower bound, blind to what the evaluator does not read); FID is a distance between distributions, not images. Chapter 08 adds image grids per window and an error of the same size in every window.

# %%
# NBVAL_CHECK_OUTPUT
pm_path = f"{S['results']}/08_premise_metrics.csv"
premise = pd.read_csv(pm_path) if os.path.exists(pm_path) else pd.DataFrame()
if len(premise):
    cols = ["setting", "window"] + [c for c in ts.PREMISE_COLUMNS if c in premise]
    print(premise[cols].rename(columns=ts.PREMISE_COLUMNS).round(3).to_string(index=False))
else:
    print("no chapter 08 rows yet: run 08_timesteps first")

# %% [markdown]
# **How to read the figure.** One panel per reading, windows of equal length from the first steps (left) to the last (right). Where the lines of two readings slope in opposite directions, the premise's verdict depends on the reading.

# %%
if len(premise):
    five = premise[premise.window.str.match(r"steps \d+-\d+") & (premise["last"] - premise["first"] < premise["last"].max() / 2)]
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.2))
    for a, col in zip(ax, ["mean_db", "pooled_db", "below_30db", "ssim"]):
        for setting, g in five.groupby("setting", sort=False):
            a.plot(g.window, g[col], marker="o", label=setting)
        a.set_title(ts.PREMISE_COLUMNS[col], fontsize=9)
        a.tick_params(axis="x", rotation=45, labelsize=8)
    plots.legend_outside(ax[-1], "setting")
    plots.save(fig, f"{S['figures']}/09_premise_metrics.png")

# %% [markdown]
# ## Answer
#
# Generated from the numbers just computed.

# %%
# NBVAL_CHECK_OUTPUT
for _, r in claims.iterrows():
    held = f" On the held-out seeds: {r['verdict (held-out seeds, Holm)']}; {r['replicate']} comparisons replicate" + (
        f" ({r['weaker']} weaker)." if r["weaker"] else ".")
    n = int(J[J.claim == r.claim].n_seeds.max())
    print(f"{r.claim}: {r['verdict (study seeds, Holm)']} on {n} study seed{'s' if n != 1 else ''} after Holm "
          f"(unadjusted: {r['verdict (study seeds, unadjusted)']}).{held}")
bad = J[J.replicates == "no"]
print(f"{int((J.replicates == 'yes').sum())} of {len(J)} comparisons replicate on the held-out seeds, "
      f"{int((J.replicates == 'weaker').sum())} weaker, {len(bad)} do not"
      + (": " + "; ".join(f"{r.context}, {r.a} − {r.b} on {cmp.NAMES[r.metric]}" for r in bad.itertuples()) if len(bad) else "") + ".")
w = J[(J.a == "log-decrease") & (J.b == "uniform")]
for r in w.itertuples():
    k = cmp.PAIRED[r.metric][3]
    print(f"The weighting, {r.context.lower()}, {cmp.NAMES[r.metric]}: {cmp.signed(r.diff, k)} "
          f"[{cmp.signed(r.lo, k)}, {cmp.signed(r.hi, k)}] on the study seeds ({r.verdict_holm} after Holm), "
          f"{cmp.signed(r.heldout_diff, k)} [{cmp.signed(r.heldout_lo, k)}, {cmp.signed(r.heldout_hi, k)}] held out.")

# %%
for setting, g in floors.groupby("setting", sort=False):
    dfid = (g.prompt_fidelity_b - g.prompt_fidelity_a).abs()
    dpsnr = (g.psnr_b - g.psnr_a).abs()
    print(f"Noise floor at {setting}: {S['noise_threads'][0]} against {S['noise_threads'][1]} threads flips "
          f"{g.share_of_pruned_positions.mean():.3%} of the pruned positions and moves a seed's prompt fidelity by up to "
          f"{dfid.max():.3f} and its PSNR by up to {dpsnr.max():.2f} dB.")

# %%
# NBVAL_CHECK_OUTPUT
if len(premise):
    for setting, g in premise.groupby("setting", sort=False):
        halves = g[g.window.isin(["steps 1-10", "steps 11-20"])].set_index("window")
        if len(halves) == 2:
            e, l = halves.loc["steps 1-10"], halves.loc["steps 11-20"]
            worse = lambda col, higher=True: ("neither" if e[col] == l[col] else
                                              "the first" if (e[col] < l[col]) == higher else "the second")
            print(f"{setting}, pruned only in the first half vs only in the second, which half hurts more: the mean of "
                  f"per-image dB says {worse('mean_db')} ({e.mean_db:.1f} vs {l.mean_db:.1f} dB); the pooled MSE says "
                  f"{worse('pooled_db')} ({e.pooled_db:.1f} vs {l.pooled_db:.1f} dB), SSIM {worse('ssim')} "
                  f"({e.ssim:.3f} vs {l.ssim:.3f}), images below 30 dB {worse('below_30db', higher=False)} "
                  f"({e.below_30db:.0%} vs {l.below_30db:.0%}), prompt fidelity {worse('prompt_fidelity')} "
                  f"({e.prompt_fidelity:.3f} vs {l.prompt_fidelity:.3f}), FID to the renders "
                  f"{worse('fid', higher=False)} ({e.fid:.2f} vs {l.fid:.2f}).")

# %%
# NBVAL_CHECK_OUTPUT
runs = pd.read_csv(S["runs_csv"])
probe = runs[runs.get("timestep_weights", pd.Series(dtype=str)).notna()] if "timestep_weights" in runs else runs.iloc[:0]
if len(probe):
    first = [int(np.argmax([float(x) for x in str(w).split()])) == 0 for w in probe.timestep_weights]
    print(f"The sensitivity probe (chapter 08) puts its largest α on step 1 in {sum(first)} of {len(first)} prunes.")

# %% [markdown]
# **Reading it with the error's size held equal.** The pruned weights' error is not the same size at every step, so "where an error hurts" and "how large the error is there" are confounded in the window rows above. Chapter 08 adds Gaussian noise of one relative size — the pruned model's mean relative prediction error — to the dense prediction in each window (`results/08_equal_probe_metrics.csv`); the lines below read it the same ways.

# %%
# NBVAL_CHECK_OUTPUT
ep_path = f"{S['results']}/08_equal_probe_metrics.csv"
eprobe = pd.read_csv(ep_path) if os.path.exists(ep_path) else pd.DataFrame()
readings = (("mean_db", "the mean of per-image dB", True), ("pooled_db", "the pooled MSE", True), ("ssim", "SSIM", True),
            ("below_30db", "images below 30 dB", False), ("prompt_fidelity", "prompt fidelity", True),
            ("composition_changed", "changed compositions", False))


for name, frame in (("pruned weights", premise), ("equal-size noise", eprobe)):
    for setting, g in (frame.groupby("setting", sort=False) if len(frame) else []):
        said = {lab: ts.which_half_hurts_more(g, col, hi) for col, lab, hi in readings}
        said = {k: v for k, v in said.items() if v is not None}
        if said:
            groups = {}
            for lab, v in said.items():
                groups.setdefault(v, []).append(lab)
            who = name if name == setting else f"{name} ({setting})"
            print(f"{who}, which half hurts more: " + "; ".join(f"{v}: {', '.join(labs)}" for v, labs in groups.items()) + ".")
if not len(eprobe):
    print("no equal-size probe rows yet: run 08_timesteps first")

# %% [markdown]
# How to reconcile: the mean of dB answers "how much does a typical image change", the pooled MSE and the share below 30 dB "how much pixel damage in total, and is it concentrated in a few images", prompt fidelity and changed compositions "does the evaluator read another picture". Where the readings name different halves, an early error changes a few images a lot while a late one changes every image a little. Where the equal-size noise names the same half as the pruned weights on a reading, the profile on that reading belongs to the trajectory, not to the size of the pruning error; where it names the other half, the pruned model's error size drives it. The sensitivity probe of chapter 08 scores an error at step t by the pooled MSE of the final latents, so it follows the pooled reading.
#
# ## Try next
#
# Add a family to `obslib.study.verdicts.families` (any pair of settings), or more study seeds where a verdict is close: the held-out seeds check it. `S['noise_threads']` (now 1 and 2) takes any two thread counts; to compare kernel sets, run the chapter under another `ATEN_CPU_CAPABILITY` — its rows get another key.

# %%
assert set(J.n_seeds) <= {len(seeds)} | {len(seeds) + len(v) for v in more.values()} and set(J.heldout_n_seeds) == {len(heldout)}
assert (J.p_holm >= J.p - 1e-12).all() and ((J.p < 0.05) == (J.verdict != cmp.NONE)).all()
