"""Paired comparisons of two settings scored on the same prompts and seeds.

Every method of the study is evaluated on the same held-out prompts with the same sampling seeds, so two
settings are compared by the difference of their per-prompt outcomes, not by whether two independent
intervals overlap (which ignores the pairing and is far too conservative).

The seed is the unit of replication: a seed decides the calibration draw (which pruned model exists) and the
evaluation noise (which images are drawn), so a comparison must say how sure we are about the *method*, not
about a few particular pruned models.

* ``paired_bootstrap``: the difference of means (a − b), its 95% interval and a two-sided p-value from a
  two-level bootstrap: each replicate resamples the seeds with replacement, then the prompts within every
  drawn seed (the same indices for a and b). The interval covers the variance between seeds (calibration draw
  and evaluation noise) as well as between prompts. It does not cover what the seeds share: the model, the
  prompt set, the numerical regime. With few seeds a percentile bootstrap over seeds is somewhat too narrow
  (5 seeds give 126 distinct draws); the held-out replication is the check on that.
* The p-value is read off the same replicates: ``p = 2·min(#(d* ≤ 0), #(d* ≥ 0)) / n_boot``, and the interval
  is the pair of order statistics for which ``p < 1 − level`` exactly when the interval excludes zero, so a
  verdict and the p printed beside it never disagree.
* ``mcnemar_exact``: for 0/1 outcomes (prompt fidelity), the exact two-sided McNemar p over all (seed, prompt)
  pairs. It treats every pair as independent (seeds pooled), so it is descriptive only and never decides.
* ``holm``: Holm's step-down adjustment of a family's p-values (a claim's settings × metrics).
* ``verdict``: ``ahead`` when the whole interval favours a, ``behind`` when it favours b, otherwise
  ``no difference detected``.

``compare`` applies these to rows of ``results/runs.csv`` (which keep per-prompt outcomes in ``pp_*``
columns), ``write_comparisons`` collects the results in ``results/comparisons.csv`` and ``sentence``
states one comparison in words with its numbers.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from ..bootstrap import LEVEL, N_BOOT, bootstrap_test, paired_bootstrap  # noqa: F401 (the study reads them here)

# metric -> (per-prompt column, higher is better, how the difference reads, digits)
PAIRED = {
    "prompt_fidelity": ("pp_fidelity", True, "share of prompts fully right", 3),
    "attribute_accuracy": ("pp_attributes", True, "share of attributes found", 3),
    "psnr": ("pp_psnr", True, "PSNR vs dense, dB", 2),
    "ssim": ("pp_ssim", True, "SSIM vs dense", 3),
    # the per-image MSE behind PSNR (data range 1), in units of 1e-3: its mean is the pooled MSE, so this reading weighs
    # an image by its error (total pixel damage) where the mean of per-image dB weighs every image alike
    "pixel_mse": ("pp_psnr", False, "pixel MSE vs dense, ×10⁻³ (pooled: total pixel damage)", 3),
}
# metric -> how its per-prompt values follow from the stored column (metrics read off another metric's column)
DERIVED = {"pixel_mse": lambda db: 1e3 * 10 ** (-db / 10)}
NAMES = {"prompt_fidelity": "prompt fidelity", "attribute_accuracy": "attribute accuracy", "psnr": "PSNR", "ssim": "SSIM",
         "pixel_mse": "pixel MSE"}
COLUMNS = ["chapter", "context", "a", "b", "metric", "n_prompts", "n_seeds", "mean_a", "mean_b", "diff", "lo", "hi",
           "p", "verdict", "mcnemar_p", "seeds"]
AHEAD, BEHIND, NONE = "ahead", "behind", "no difference detected"


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest p times (m − i + 1), made
    monotone, capped at 1. A verdict survives the family's correction when its adjusted p is below 1 − level."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out


def adjusted_verdict(diff: float, p_adjusted: float, higher: bool = True, level: float = LEVEL) -> str:
    """The verdict after a family's correction: ahead/behind by the sign of the difference where the adjusted p is
    below 1 − level, otherwise no difference detected."""
    if not (np.isfinite(p_adjusted) and p_adjusted < 1 - level) or diff == 0:
        return NONE
    return AHEAD if (diff > 0) == higher else BEHIND


def mcnemar_exact(a, b) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes: 2·P(X ≤ min(n01, n10)) for X ~ Bin(n01 + n10, ½)."""
    a, b = np.asarray(a).astype(bool).ravel(), np.asarray(b).astype(bool).ravel()
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def verdict(lo: float, hi: float, higher: bool = True) -> str:
    """``ahead`` / ``behind`` / ``no difference detected`` for a − b, from its interval alone."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return NONE
    if lo > 0:
        return AHEAD if higher else BEHIND
    if hi < 0:
        return BEHIND if higher else AHEAD
    return NONE


def outcomes(rows: pd.DataFrame, metric: str) -> tuple[np.ndarray, list]:
    """Per-prompt outcomes of one setting's rows (one row per seed) as a (seeds, prompts) array, seeds sorted."""
    col = PAIRED[metric][0]
    if col not in rows:
        raise ValueError(f"rows have no per-prompt column {col!r}; rerun them (results/runs.csv predates per-prompt outcomes)")
    rows = rows.sort_values("seed")
    if rows.seed.duplicated().any():
        raise ValueError(f"more than one row per seed for one setting: {sorted(rows.seed)}")
    x = np.stack([decode(v) for v in rows[col]])
    return (DERIVED[metric](x) if metric in DERIVED else x), list(rows.seed)


def compare(rows_a: pd.DataFrame, rows_b: pd.DataFrame, metrics=("prompt_fidelity", "psnr"), a: str = "a",
            b: str = "b", chapter: str = "", context: str = "", n_boot: int = N_BOOT) -> list[dict]:
    """Paired comparison of two settings (rows of runs.csv, one per seed) on each metric, over their common seeds:
    difference, two-level bootstrap interval and p (``bootstrap_test``, the verdict's rule), and for prompt
    fidelity McNemar's p beside it (descriptive)."""
    common = sorted(set(rows_a.seed) & set(rows_b.seed))
    if not common:
        raise ValueError(f"{a} and {b} share no seed")
    rows_a, rows_b = rows_a[rows_a.seed.isin(common)], rows_b[rows_b.seed.isin(common)]
    out = []
    for m in metrics:
        xa, _ = outcomes(rows_a, m)
        xb, _ = outcomes(rows_b, m)
        if xa.shape != xb.shape:
            raise ValueError(f"{a} and {b} were scored on different prompts: {xa.shape} vs {xb.shape}")
        t = bootstrap_test(xa, xb, n_boot=n_boot)
        higher = PAIRED[m][1]
        out.append({"chapter": chapter, "context": context, "a": a, "b": b, "metric": m, "n_prompts": xa.shape[1],
                    "n_seeds": xa.shape[0], "mean_a": float(xa.mean()), "mean_b": float(xb.mean()), "diff": t["diff"],
                    "lo": t["lo"], "hi": t["hi"], "p": t["p"], "verdict": verdict(t["lo"], t["hi"], higher),
                    "mcnemar_p": mcnemar_exact(xa, xb) if m == "prompt_fidelity" else np.nan,
                    "seeds": " ".join(str(int(x)) for x in common)})
    return out


def compare_in(df: pd.DataFrame, col: str, a, b, where: dict | None = None, labels: tuple[str, str] | None = None,
               **kw) -> list[dict]:
    """``compare`` for the rows where ``col`` is a and b, within the rows matching ``where`` (floats by isclose);
    ``labels`` names a and b in the results (default: their values)."""
    t = df
    for k, v in (where or {}).items():
        t = t[np.isclose(t[k].astype(float), v)] if isinstance(v, float) else t[t[k] == v]
    ra, rb = t[t[col] == a], t[t[col] == b]
    if ra.empty or rb.empty:
        raise ValueError(f"no rows for {col} = {a if ra.empty else b} within {where}")
    name_a, name_b = labels or (str(a), str(b))
    return compare(ra, rb, a=name_a, b=name_b, **kw)


def pvalue(p: float, n_boot: int = N_BOOT) -> str:
    """A bootstrap p as text: two significant digits, '< 0.00025' where no replicate crossed zero."""
    if not np.isfinite(p):
        return ""
    return f"< {1 / n_boot:.2g}" if p == 0 else f"{p:.2g}"


def signed(x: float, digits: int) -> str:
    """A signed number with a true minus sign: +0.070, −1.25."""
    return f"{x:+.{digits}f}".replace("-", "−")


def sentence(r) -> str:
    """One comparison in words: 'At 50%, obs-diff − wanda in prompt fidelity (share of prompts fully right):
    +0.070 [95% +0.030, +0.110], p = 0.001, 64 prompts × 3 seeds — obs-diff ahead.' (p: the two-level
    bootstrap's, the rule of the verdict)."""
    r = dict(r)
    _, _, what, digits = PAIRED[r["metric"]]
    head = f"{r['context']}, " if r.get("context") else ""
    p = f", p = {pvalue(r['p'])}" if np.isfinite(r.get("p", np.nan)) else ""
    tail = {AHEAD: f"{r['a']} ahead", BEHIND: f"{r['a']} behind", NONE: "no difference detected"}[r["verdict"]]
    return (f"{head}{r['a']} − {r['b']} in {NAMES[r['metric']]} ({what}): {signed(r['diff'], digits)} "
            f"[95% {signed(r['lo'], digits)}, {signed(r['hi'], digits)}]{p}, {int(r['n_prompts'])} prompts × "
            f"{int(r['n_seeds'])} seed{'s' if int(r['n_seeds']) != 1 else ''} — {tail}.")


def write_comparisons(rows: list[dict], chapter: str, path: str) -> pd.DataFrame:
    """Replace ``chapter``'s rows of the comparisons table at ``path`` (atomically); returns this chapter's rows."""
    from ..owned import write_text

    new = pd.DataFrame(rows, columns=COLUMNS)
    if (new.chapter != chapter).any():
        raise ValueError(f"rows of another chapter given to write_comparisons({chapter!r})")
    old = read_comparisons(path) if os.path.exists(path) else pd.DataFrame(columns=COLUMNS)
    old = old[old.chapter != chapter]
    allrows = pd.concat([old, new], ignore_index=True) if len(old) else new
    write_text(path, allrows.to_csv(index=False))
    return new.reset_index(drop=True)


def read_comparisons(path: str) -> pd.DataFrame:
    """The comparisons table, its names read as text (a chapter "01" stays "01")."""
    return pd.read_csv(path, dtype={k: str for k in ("chapter", "context", "a", "b", "metric", "verdict", "seeds")},
                       keep_default_na=False, na_values={k: [""] for k in ("p", "diff", "lo", "hi", "mcnemar_p")})


def table(rows: list[dict]) -> pd.DataFrame:
    """Comparisons for display: difference with its interval (seeds and prompts resampled), the bootstrap p that
    decides the verdict, and the verdict."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    digits = df.metric.map(lambda m: PAIRED[m][3])
    df["difference [95%]"] = [f"{signed(d, k)} [{signed(lo, k)}, {signed(hi, k)}]" for d, lo, hi, k in zip(df["diff"], df.lo, df.hi, digits)]
    df["p"] = df.p.map(pvalue)
    return df[["context", "a", "b", "metric", "difference [95%]", "p", "verdict"]]


# per-prompt outcomes are kept in runs.csv as compact strings
def encode(values, digits: int | None = None) -> str:
    """'b0110…' for 0/1 outcomes (digits None; the prefix keeps CSV readers from taking it for a number), else
    values joined by ';' at ``digits`` decimals."""
    v = np.asarray(values)
    if digits is None:
        return "b" + "".join("1" if x else "0" for x in v.astype(bool))
    return ";".join(f"{x:.{digits}f}" for x in v.astype(float))


def decode(s) -> np.ndarray:
    s = str(s)
    if s.startswith("b"):
        return np.array([float(c) for c in s[1:]])
    if ";" in s or "." in s:
        return np.array([float(x) for x in s.split(";")])
    return np.array([float(c) for c in s])


def summary_line(rows: list[dict], metric: str) -> list[str]:
    """One sentence per (context, a) on ``metric``: whom a is ahead of, behind, and not told apart from, each
    with its difference and interval ('At 50%, on prompt fidelity obs-diff is ahead of wanda (+0.070
    [+0.030, +0.110]); shows no detected difference from sparsegpt (+0.010 [−0.020, +0.040]).')."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df[df.metric == metric]
    digits = PAIRED[metric][3]
    out = []
    for (ctx, a), g in df.groupby(["context", "a"], sort=False):
        parts = []
        for v, words in ((AHEAD, "is ahead of"), (BEHIND, "is behind"), (NONE, "shows no detected difference from")):
            h = g[g.verdict == v]
            if len(h):
                parts.append(f"{words} " + ", ".join(
                    f"{b} ({signed(d, digits)} [{signed(lo, digits)}, {signed(hi, digits)}])" for b, d, lo, hi in zip(h.b, h["diff"], h.lo, h.hi)))
        head = f"{ctx}, on " if ctx else "On "
        out.append(f"{head}{NAMES[metric]} {a} " + "; ".join(parts) + ".")
    return out


def interval(r) -> str:
    """A comparison's difference and 95% interval in its metric's unit: '+1.71 dB [−0.53, +3.92]'."""
    d = PAIRED[r["metric"]][3]
    unit = " dB" if r["metric"] == "psnr" else ""
    return f"{signed(r['diff'], d)}{unit} [{signed(r['lo'], d)}, {signed(r['hi'], d)}]"


def against_chance(rows: list[dict], level: float = 0.95) -> dict:
    """How many of ``rows`` (comparisons) come out ahead and behind, against what chance alone gives when no
    difference exists: each side has probability (1 − level) / 2 per comparison, so ``p_ahead`` / ``p_behind`` are
    the binomial tails P(at least that many) — as if the comparisons were independent (comparisons against one
    shared reference are not, so read the tails as a rough guide)."""
    from scipy.stats import binom

    n, q = len(rows), (1 - level) / 2
    ahead, behind = sum(r["verdict"] == AHEAD for r in rows), sum(r["verdict"] == BEHIND for r in rows)
    return {"n": n, "ahead": ahead, "behind": behind, "expected_per_side": n * q,
            "p_ahead": float(binom.sf(ahead - 1, n, q)), "p_behind": float(binom.sf(behind - 1, n, q))}
