"""results/claims.md: each claim of the paper, the paper's numbers, ours, and a verdict computed from the
study's CSVs (reproduced / not reproduced / mixed). Run by ``make study`` after the notebooks.

A difference counts only when it exceeds the seeds' spread: "a beats b" needs mean_a - mean_b greater
than the larger of the two standard deviations and, for prompt fidelity, 95% Wilson intervals (pooled over
seeds x prompts) that do not overlap.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(results: str, name: str) -> pd.DataFrame | None:
    f = os.path.join(results, name)
    return pd.read_csv(f) if os.path.exists(f) else None


def _fmt(m, s, d=3):
    return f"{m:.{d}f} ± {s:.{d}f}"


PRIMARY = "psnr"  # faithfulness to the dense model; prompt fidelity is reported beside it


def _beats(a, b, metric=PRIMARY, higher=True):
    """a ahead of b beyond the seeds' spread (and, for prompt fidelity, with disjoint 95% intervals)."""
    from .experiments import separated

    return separated(a, b, metric, higher) == 1


def _peer_row(s) -> dict:
    """Structured OBS-Diff against the two peer methods (our reconstructions), at each sparsity setting."""
    dense = s[s.method == "dense"]
    base = float(dense.params_mean.iloc[0]) if len(dense) and "params_mean" in s else None
    cells, lead, trail = [], [], []
    for sp in sorted(set(s[s.method != "dense"].sparsity)):
        t = s[np.isclose(s.sparsity, sp)].set_index("method")
        if "obs-diff" not in t.index:
            continue
        part = []
        for m in ("obs-diff", "slimdiff", "gradient-flow"):
            if m in t.index:
                r = t.loc[m]
                drop = f", −{100 * (1 - r.params_mean / base):.1f}% params" if base else ""
                part.append(f"{m} {r.psnr_mean:.2f} dB / {r.prompt_fidelity_mean:.3f}{drop}")
        cells.append(f"{sp:.0%}: " + ", ".join(part))
        for peer in ("slimdiff", "gradient-flow"):
            if peer not in t.index:
                continue
            for metric in ("psnr", "prompt_fidelity"):
                if _beats(t.loc[peer], t.loc["obs-diff"], metric):
                    lead.append(f"{peer} on {metric.replace('_', ' ')} at {sp:.0%}")
                elif _beats(t.loc["obs-diff"], t.loc[peer], metric):
                    trail.append(f"{peer} on {metric.replace('_', ' ')} at {sp:.0%}")
    verdict = ("OBS-Diff ahead of " + "; ".join(trail) if trail else "OBS-Diff ahead of neither peer") + \
        (" — behind " + "; ".join(lead) if lead else "") + " (beyond the seeds' spread, for prompt fidelity also beyond the 95% intervals over prompts; elsewhere within them)"
    return {"claim": "Structured OBS-Diff against the peer methods (our reconstructions of SlimDiff and gradient flow)",
            "paper": "not compared in the OBS-Diff paper; SlimDiff reports near-dense quality at ~100M fewer parameters "
                     "(SD, UNet); gradient flow argues iterative soft pruning beats one-shot structural pruning",
            "ours": "PSNR vs dense / prompt fidelity (parameters removed from the transformer) " + "; ".join(cells),
            "verdict": verdict}


def claim_rows(results: str) -> list[dict]:
    rows = []
    u = _load(results, "01_unstructured.csv")
    if u is not None:
        for sp in (0.5, 0.6):
            t = u[np.isclose(u.sparsity, sp) & (u.method != "dense")].set_index("method")
            if "obs-diff" not in t.index:
                continue
            order = t.sort_values(f"{PRIMARY}_mean", ascending=False)
            ours = ", ".join(f"{m} {r.psnr_mean:.2f} dB / {r.prompt_fidelity_mean:.3f}" for m, r in order.iterrows())
            others = [m for m in ("wanda", "dsnot", "magnitude") if m in t.index]
            ahead = {lab: all(_beats(t.loc["obs-diff"], t.loc[m], metric) for m in others)
                     for lab, metric in (("PSNR", PRIMARY), ("prompt fidelity", "prompt_fidelity"))}
            mag_last = all(t.loc["magnitude"][f"{PRIMARY}_mean"] <= t.loc[m][f"{PRIMARY}_mean"] for m in others if m != "magnitude")
            if all(ahead.values()) and mag_last:
                verdict = "reproduced"
            elif any(ahead.values()):
                verdict = ("mixed: OBS-Diff is ahead of every baseline beyond the seeds' spread (and intervals) on "
                           + " and ".join(k for k, v in ahead.items() if v)
                           + "".join(f", not on {k}" for k, v in ahead.items() if not v)
                           + ("" if mag_last else "; magnitude is not last on PSNR"))
            else:
                verdict = ("mixed (OBS-Diff first, but not beyond the seeds' spread and the prompt-fidelity intervals of every baseline)"
                           if order.index[0] == "obs-diff" else "not reproduced")
            paper = {0.5: "SD3-M IR: OBS-Diff .647 > Wanda −.108 > DSnoT −.594 > Magnitude −2.27",
                     0.6: "SD3-M IR: OBS-Diff .121 > Wanda −2.06 > DSnoT −2.23 > Magnitude −2.28"}[sp]
            rows.append({"claim": f"Method ordering at {sp:.0%} unstructured (OBS-Diff best, magnitude worst)",
                         "paper": paper, "ours": f"PSNR vs dense / prompt fidelity: {ours}", "verdict": verdict})
        if {"sparsegpt", "obs-diff"} <= set(u.method):
            t = u[np.isclose(u.sparsity, 0.6)].set_index("method")
            if len(t):
                rows.append({"claim": "Timestep-aware (log-decrease) Hessian beats the uniform one (SparseGPT) at 60%",
                             "paper": "not compared in the paper (weighting ablation only)",
                             "ours": f"PSNR vs dense: OBS-Diff {_fmt(t.loc['obs-diff'].psnr_mean, t.loc['obs-diff'].psnr_std, 2)}, "
                                     f"SparseGPT {_fmt(t.loc['sparsegpt'].psnr_mean, t.loc['sparsegpt'].psnr_std, 2)}",
                             "verdict": "reproduced" if _beats(t.loc["obs-diff"], t.loc["sparsegpt"], "psnr") else
                             ("not reproduced" if _beats(t.loc["sparsegpt"], t.loc["obs-diff"], "psnr") else "mixed (within seed spread)")})
    w = _load(results, "04_weighting.csv")
    if w is not None and "log-decrease" in set(w.weighting):
        t = w.set_index("weighting")
        best = t.psnr_mean.idxmax()
        ld = t.loc["log-decrease"]
        within = all(abs(ld.psnr_mean - r.psnr_mean) <= max(ld.psnr_std, r.psnr_std) for _, r in t.iterrows())
        verdict = "reproduced" if best == "log-decrease" and not within else ("mixed (all schemes within seed spread)" if within else "not reproduced")
        rows.append({"claim": "Log-decrease is the best weighting scheme",
                     "paper": "IR at 50%: log-decrease .6438, linear-decrease .6384, uniform .6355, log-increase .6244, linear-increase .6174",
                     "ours": "PSNR vs dense: " + ", ".join(f"{k} {r.psnr_mean:.2f}±{r.psnr_std:.2f}" for k, r in t.sort_values("psnr_mean", ascending=False).iterrows()),
                     "verdict": verdict})
    kk = _load(results, "05_packages.csv")
    if kk is not None and "calibration" not in kk:
        kk["calibration"] = "resample"
    k = None if kk is None else kk[kk.calibration == "resample"].sort_values("packages")
    if k is not None and len(k) > 1:
        mem_down = bool(np.all(np.diff(k.hessian_mb_mean) <= 1e-9))
        time_up = bool(k.prune_s_mean.iloc[-1] > k.prune_s_mean.iloc[0])
        q = k.psnr_mean
        flat = (q.max() - q.min()) <= 2 * k.psnr_std.max()
        verdict = "reproduced" if mem_down and time_up and flat else ("mixed" if (mem_down and time_up) else "not reproduced")
        rows.append({"claim": "More packages: less memory, more time, no clear quality trend",
                     "paper": "K=1 30.7 GB 572 s IR .857; K=4 24.1 GB 897 s .844; K=10 22.8 GB 1539 s .843; K=20 22.1 GB 2595 s .856",
                     "ours": "resample (the paper's calibration): " + "; ".join(
                         f"K={int(r.packages)}: {r.hessian_mb_mean:.2f} MiB, {r.prune_s_mean:.1f} s, PSNR {r.psnr_mean:.2f} dB"
                         for _, r in k.iterrows()),
                     "verdict": verdict})
    p = None if kk is None else kk[kk.calibration == "propagate"].sort_values("packages")
    if p is not None and len(p) > 1 and len(k):
        lo, hi = p.iloc[0], p.iloc[-1]
        same = all(not _beats(r, k.set_index("packages").loc[r.packages], m) and
                   not _beats(k.set_index("packages").loc[r.packages], r, m)
                   for _, r in p.iterrows() if r.packages in set(k.packages) for m in ("psnr", "prompt_fidelity"))
        ratio = hi.prune_s_mean / lo.prune_s_mean
        ratio_rs = k.iloc[-1].prune_s_mean / k.iloc[0].prune_s_mean
        rows.append({"claim": "Ours: propagated calibration (dense sampling once) keeps the cost of many packages near K = 1 "
                              "(goal: every unit within 1.5x) at resample's quality",
                     "paper": "not in the paper (every package re-runs sampling: K=20 costs 4.5x K=1)",
                     "ours": f"K={int(lo.packages)} -> K={int(hi.packages)}: propagate {lo.prune_s_mean:.1f} -> "
                             f"{hi.prune_s_mean:.1f} s ({ratio:.2f}x), resample {k.iloc[0].prune_s_mean:.1f} -> "
                             f"{k.iloc[-1].prune_s_mean:.1f} s ({ratio_rs:.2f}x); quality "
                             + ("within the seeds' spread and intervals of resample at every K" if same else
                                "differs from resample at some K"),
                     "verdict": ("met" if ratio <= 1.5 and same else
                                 f"partly met: quality as resample, cost {ratio:.2f}x of K=1 (goal 1.5x)" if same else
                                 "not met")})
    c = _load(results, "06_calibration_size.csv")
    if c is not None and len(c) > 2:
        c = c.sort_values("num_calib")
        top = c.psnr_mean.max()
        knee = int(c[c.psnr_mean >= top - c.psnr_std.max()].num_calib.min())
        rows.append({"claim": "About 100 calibration prompts suffice (quality flat beyond)",
                     "paper": "quality rises steeply up to ~100 prompts, then flat (SD3-M)",
                     "ours": "PSNR vs dense: " + ", ".join(f"{int(r.num_calib)}: {r.psnr_mean:.2f}" for _, r in c.iterrows())
                             + f"; within one std of the best from {knee} prompts",
                     "verdict": "reproduced (saturates, at a smaller count for our smaller model)" if knee < c.num_calib.max() else "not reproduced"})
    s = _load(results, "03_structured.csv")
    if s is not None and {"obs-diff", "l1-norm"} <= set(s.method):
        rows_s, ok, behind = [], [], []
        for sp in sorted(set(s[s.method != "dense"].sparsity)):
            t = s[np.isclose(s.sparsity, sp)].set_index("method")
            ok.append(_beats(t.loc["obs-diff"], t.loc["l1-norm"]))
            if _beats(t.loc["l1-norm"], t.loc["obs-diff"], "prompt_fidelity"):
                behind.append(f"{sp:.0%}")
            cell = lambda m: f"{t.loc[m].psnr_mean:.2f} / {t.loc[m].prompt_fidelity_mean:.3f}"
            rows_s.append(f"{sp:.0%}: OBS-Diff {cell('obs-diff')} vs L1 {cell('l1-norm')}"
                          + (f" vs FLAP {cell('flap')}" if "flap" in t.index else ""))
        if all(ok) and not behind:
            verdict = "reproduced on PSNR (L1-norm degrades but does not collapse here)"
        elif all(ok):
            verdict = (f"mixed: OBS-Diff is ahead of L1-norm on PSNR at every sparsity but behind it on prompt fidelity "
                       f"at {', '.join(behind)} (closer pixels, more attributes lost)")
        else:
            verdict = "mixed" if any(ok) else "not reproduced"
        rows.append({"claim": "Structured OBS-Diff far ahead of L1-norm",
                     "paper": "SD3.5-L at 15–30%: OBS-Diff FID 32.6–34.5, L1-norm collapses (FID 159–346, IR ≈ −2)",
                     "ours": "PSNR vs dense (dB) / prompt fidelity " + "; ".join(rows_s),
                     "verdict": verdict})
    if s is not None and "obs-diff" in set(s.method) and {"slimdiff", "gradient-flow"} & set(s.method):
        rows.append(_peer_row(s))
    n = _load(results, "02_semistructured.csv")
    if n is not None:
        t = n[n.pattern == "2:4"].set_index("method")
        if "obs-diff" in t.index:
            others = [m for m in ("magnitude", "wanda", "dsnot") if m in t.index]
            best = all(_beats(t.loc["obs-diff"], t.loc[m]) for m in others)
            rows.append({"claim": "OBS-Diff best at 2:4",
                         "paper": "SD3.5-L IR: OBS-Diff .449, DSnoT .031, Wanda −.136, Magnitude −.471",
                         "ours": "PSNR vs dense (dB): " + ", ".join(f"{m} {r.psnr_mean:.2f}" for m, r in t.sort_values("psnr_mean", ascending=False).iterrows()),
                         "verdict": "reproduced" if best else ("mixed" if t.psnr_mean.idxmax() == "obs-diff" else "not reproduced")})
    r = _load(results, "06_robustness.csv")
    if r is not None and len(r) > 2:
        p = r[r.method == "obs-diff"].set_index("change")
        if len(p):
            spread = float(p.psnr_mean.max() - p.psnr_mean.min())
            rows.append({"claim": "Robust to CFG, step count and sampler changed after calibration",
                         "paper": "SD3-M 50%, IR dense→pruned: CFG 5 .83→.53, 7 .85→.64, 9 .83→.70; steps 15 .70→.49, 50 .94→.72; Heun .92→.72",
                         "ours": "PSNR of the 50% model vs the dense model under the same change: "
                                 + ", ".join(f"{k} {v:.2f} dB" for k, v in p.psnr_mean.items()),
                         "verdict": ("reproduced (PSNR within %.1f dB across changes)" % spread) if spread <= 3.0 else
                                    ("mixed (PSNR varies by %.1f dB across changes)" % spread)})
    if u is not None and {"wanda", "obs-diff"} <= set(u.method):
        t = u[np.isclose(u.sparsity, 0.5)].set_index("method")
        ratio = t.loc["obs-diff"].prune_s_mean / t.loc["wanda"].prune_s_mean
        rows.append({"claim": "Pruning cost: OBS-Diff about 2× Wanda (magnitude ≈ 0)",
                     "paper": "SD3-M 50% on an RTX 4090: Magnitude ≈0, Wanda 7.3 min, DSnoT 14.3 min, OBS-Diff 15.0 min (2.05×)",
                     "ours": f"CPU, seconds: " + ", ".join(f"{m} {t.loc[m].prune_s_mean:.1f}" for m in ("magnitude", "wanda", "dsnot", "obs-diff") if m in t.index)
                             + f" (OBS-Diff/Wanda {ratio:.2f}×; calibration runs dominate both)",
                     "verdict": "reproduced" if 1.5 <= ratio <= 3.0 else
                                (f"not reproduced: OBS-Diff costs {ratio:.2f}× Wanda here, because calibration runs dominate "
                                 "and the OBS solve of a tiny model is cheap")})
    return rows


def write_claims(results: str = os.path.join(ROOT, "results"), out: str | None = None) -> str:
    rows = claim_rows(results)
    lines = ["# Claims of the paper against this study", "",
             "Measured on the embedded shapes-sd3 model (CPU). The primary quality number is PSNR of the pruned model's images "
             "against the dense model's (same prompts and seeds), with the evaluator's prompt fidelity beside it; the paper used ImageReward/FID on SD3-class models, so only orderings and "
             "trends are compared, not values. Every number of ours is a mean over seeds; a difference counts only when "
             "it exceeds the seeds' standard deviation and, for prompt fidelity, the two 95% Wilson intervals (pooled over "
             "seeds x 64 prompts) do not overlap. Generated by `obslib.claims` from the CSVs in results/.", "",
             "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in ("claim", "paper", "ours", "verdict")) + " |")
    text = "\n".join(lines) + "\n"
    out = out or os.path.join(results, "claims.md")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return text


if __name__ == "__main__":
    print(write_claims())
