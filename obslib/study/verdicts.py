"""The verdicts the study quotes, rerun on at least five study seeds and replicated on held-out seeds.

A *family* is one claim: its comparisons (settings × metrics), each "a ahead of b" in the claimed direction. Every
family is scored twice under one numerical regime (``experiments.regime``, part of every row's cache key):

* on the study seeds (``STUDY_SEEDS``), with the two-level paired bootstrap of ``obslib.study.compare`` (seeds, then
  prompts) and Holm's correction within the family; the verdict after Holm decides, the unadjusted one is beside it;
* on held-out seeds (``HELDOUT_SEEDS``) that nothing in the study was chosen on, the same way.

A comparison *replicates* when its held-out estimate has the same sign as on the study seeds and, for a detected
difference, the held-out unadjusted interval excludes zero too (a held-out set of three seeds has less power, so
"same sign, not detected" is reported apart, as ``weaker``); an undetected one replicates when the held-out one is not
detected after Holm either. The paper's claims read ``reproduced`` / ``not reproduced``, the study's own hypotheses
``supported`` / ``not supported``; both ``partly`` when some comparisons of the family are detected in the claimed
direction and none against it.

``families(num_calib)`` lists the claims and their settings; ``run`` computes the rows (cached in ``results/runs.csv``
like every chapter's); ``judge`` turns them into one row per comparison; ``claim_table`` into one row per claim.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .compare import AHEAD, BEHIND, NONE, PAIRED, adjusted_verdict, bootstrap_test, holm, outcomes, verdict
from .experiments import Setting, run_grid

STUDY_SEEDS = (0, 1, 2, 3, 4)
HELDOUT_SEEDS = (100, 101, 102)
METRICS = ("prompt_fidelity", "psnr")
BASELINES = ("wanda", "dsnot", "magnitude")


@dataclass(frozen=True)
class Pair:
    context: str  # the setting, named in every sentence ('At 50% unstructured')
    a: str
    b: str
    setting_a: Setting
    setting_b: Setting
    # a row's key after its setting's: "" for a study row (``run_grid``), a window of steps for a row of chapter 08's
    # error injection (``timesteps.window_tail``: the setting's error active in that window only)
    tail_a: str = ""
    tail_b: str = ""


@dataclass
class Family:
    key: str  # a short name to pick families by ('baselines 50%')
    claim: str
    source: str  # "paper" (the paper's claim) or "ours" (the study's own hypothesis)
    paper: str  # what the paper reports
    pairs: list[Pair] = field(default_factory=list)
    metrics: tuple[str, ...] = METRICS
    expect: str = AHEAD  # the claimed outcome of every comparison: a ahead of b, or NONE (a claim of no difference)


def families(num_calib: int = 16, structured=(0.1, 0.2, 0.3), keys=None, grid: dict | None = None) -> list[Family]:
    """The claims rerun on the study and held-out seeds (``keys``: only those families): OBS-Diff against the paper's
    baselines (50%, 60% unstructured, 2:4, structured against L1-norm), the timestep-aware against the uniform Hessian
    (SparseGPT: the same solver with uniform weights) at 50%, 60%, 2:4, refit and the allocations; with ``grid`` (the
    study's settings, ``obslib.study.settings``: model, gradient-flow, sensitivity, package, calibration-size and
    robustness grids) also the chapters' other claims (``CHAPTER_FAMILIES``), on the chapters' own settings so that
    their rows are shared."""
    def st(method, pattern="unstructured", sparsity=0.5):
        return Setting(method=method, pattern=pattern, sparsity=sparsity, num_calib=num_calib)

    out = []
    for key, ctx, pattern, sp, paper in (
            ("baselines 50%", "At 50% unstructured", "unstructured", 0.5,
             "SD3-M ImageReward: OBS-Diff .647 > Wanda −.108 > DSnoT −.594 > Magnitude −2.27"),
            ("baselines 60%", "At 60% unstructured", "unstructured", 0.6,
             "SD3-M ImageReward: OBS-Diff .121 > Wanda −2.06 > DSnoT −2.23 > Magnitude −2.28"),
            ("baselines 2:4", "At 2:4", "2:4", 0.5, "SD3.5-L ImageReward: OBS-Diff .449, DSnoT .031, Wanda −.136, Magnitude −.471")):
        out.append(Family(key, f"{ctx[3:]}: OBS-Diff ahead of Wanda, DSnoT and magnitude", "paper", paper,
                          [Pair(ctx, "obs-diff", b, st("obs-diff", pattern, sp), st(b, pattern, sp)) for b in BASELINES]))
    out.append(Family("structured l1", "Structured (heads and neurons): OBS-Diff ahead of L1-norm", "paper",
                      "SD3.5-L at 15–30%: OBS-Diff FID 32.6–34.5, L1-norm collapses (FID 159–346)",
                      [Pair(f"At {s:.0%} structured", "obs-diff", "l1-norm", st("obs-diff", "structured", s),
                            st("l1-norm", "structured", s)) for s in structured]))
    out.append(Family("weighting 50%", "50% unstructured: log-decrease timestep weights ahead of uniform ones (OBS-Diff against "
                      "SparseGPT, the same solver with uniform weights)", "paper",
                      "ImageReward at 50%: log-decrease .6438, uniform .6355 (the paper's weighting ablation)",
                      [Pair("At 50% unstructured", "log-decrease", "uniform", st("obs-diff"), st("sparsegpt"))]))
    out.append(Family("weighting 60% 2:4", "60% unstructured and 2:4: log-decrease timestep weights ahead of uniform ones", "ours",
                      "not in the paper (its ablation is at 50%)",
                      [Pair(ctx, "log-decrease", "uniform", st("obs-diff", p, sp), st("sparsegpt", p, sp))
                       for ctx, p, sp in (("At 60% unstructured", "unstructured", 0.6), ("At 2:4", "2:4", 0.5))]))
    refit = {"refit_iterations": 20}
    out.append(Family("refit", "Ours: refitting the kept weights on the fixed mask (--refit) ahead of OBS-Diff's sequential "
                      "update", "ours", "not in the paper (OBS-Diff uses SparseGPT's sequential update)",
                      [Pair(ctx, "refit", "obs-diff", Setting(**{**st("obs-diff", p, sp).__dict__, "extra": refit}),
                            st("obs-diff", p, sp))
                       for ctx, p, sp in (("At 50% unstructured", "unstructured", 0.5), ("At 60% unstructured", "unstructured", 0.6),
                                          ("At 70% unstructured", "unstructured", 0.7), ("At 2:4", "2:4", 0.5))]))
    out.append(Family("allocation unstructured", "Ours: a global per-layer allocation (--allocation global) ahead of the "
                      "uniform one, OBS-Diff unstructured", "ours", "not in the paper (every layer at the same sparsity)",
                      [Pair(f"At {sp:.0%} unstructured", "global", "uniform",
                            Setting(**{**st("obs-diff", "unstructured", sp).__dict__, "extra": {"allocation": "global"}}),
                            st("obs-diff", "unstructured", sp)) for sp in (0.5, 0.6, 0.7)]))

    def budget(method, b, **extra):
        return Setting(method=method, pattern="structured", sparsity=b, num_calib=num_calib, extra=extra)

    out.append(Family("weighting 4:8", "4:8: the timestep-aware Hessian (OBS-Diff) ahead of the uniform one (SparseGPT)",
                      "ours", "not compared in the paper (weighting ablation only, at 50% unstructured)",
                      [Pair("At 4:8", "log-decrease", "uniform", st("obs-diff", "4:8"), st("sparsegpt", "4:8"))]))

    out.append(Family("structured allocation", "Ours: a global structured allocation (every head and neuron by OBS cost "
                      "per parameter) ahead of the uniform one", "ours", "not in the paper (the same share from every block)",
                      [Pair(f"At {b:.0%} of the parameters", "OBS-Diff · global", "OBS-Diff · uniform",
                            budget("obs-diff", b, param_budget=b, allocation="global"), budget("obs-diff", b, param_budget=b))
                       for b in structured]))
    out.append(Family("structured slimdiff", "Structured, at equal parameter counts: OBS-Diff (uniform, as the paper runs "
                      "it) ahead of the peer SlimDiff (our reconstruction)", "ours", "not compared in the OBS-Diff paper",
                      [Pair(f"At {b:.0%} of the parameters", "OBS-Diff · uniform", "SlimDiff · its allocation",
                            budget("obs-diff", b, param_budget=b), budget("slimdiff", b)) for b in structured]))
    if grid is not None:
        out += _chapter_families(st, budget, num_calib, structured, grid, keys)
    if keys is not None:
        unknown = set(keys) - {f.key for f in out}
        if unknown:
            raise ValueError(f"unknown families {sorted(unknown)}; allowed: {', '.join(f.key for f in out)}")
        out = [f for f in out if f.key in keys]
    return out


CHAPTER_FAMILIES = ("weighting schemes 60%", "weighting strength 60%", "one-sided weighting 60%",
                    "sensitivity vs uniform", "sensitivity vs log-decrease", "structured slimdiff nominal",
                    "structured gradient flow", "allocation part obs", "allocation part slimdiff", "solver part",
                    "packages", "calibration size", "robustness", "premise")


def _chapter_families(st, budget, num_calib: int, structured, grid: dict, keys) -> list[Family]:
    """The families of chapters 03–06 and 08 (``CHAPTER_FAMILIES``; only those in ``keys`` when given: some need the
    model loaded), each on the settings its chapter runs (``grid``: ``obslib.study.settings``)."""
    from .timesteps import strength_settings
    from ..weighting import PAPER_SCHEMES

    want = set(CHAPTER_FAMILIES if keys is None else keys)
    out = []
    w60 = Setting(method="obs-diff", sparsity=0.6, num_calib=num_calib)

    def wt(base, w):
        return Setting(**{**base.__dict__, "weighting": w})

    out.append(Family("weighting schemes 60%", "At 60% unstructured: every weighting of the paper's ablation ahead of "
                      "uniform weighting (chapter 04)", "ours", "not at this sparsity in the paper (its ablation, at 50%: "
                      "log-decrease .6438, linear-decrease .6384, uniform .6355, log-increase .6244, linear-increase .6174)",
                      [Pair("At 60% unstructured", w, "uniform", wt(w60, w), wt(w60, "uniform"))
                       for w in PAPER_SCHEMES if w != "uniform"]))
    strong = strength_settings(w60, schemes=("log-decrease",), ratios=[r for r in grid["strength_ratios"] if r != 1.5],
                               one_sided=())
    out.append(Family("weighting strength 60%", "Stronger decreasing weightings ahead of uniform (60% unstructured)", "ours",
                      "not in the paper (only α in [0.8, 1.2])",
                      [Pair("At 60% unstructured", f"log-decrease ×{s.extra['alpha_max'] / s.extra['alpha_min']:.3g}",
                            "uniform", s, wt(w60, "uniform")) for s in strong]))
    sided = strength_settings(w60, schemes=(), ratios=(), one_sided=("first-half", "second-half"))
    out.append(Family("one-sided weighting 60%", "One-sided weightings (only the first / only the second half of the "
                      "steps) ahead of uniform (60%)", "ours", "not in the paper",
                      [Pair("At 60% unstructured", f"{s.weighting} only", "uniform", s, wt(w60, "uniform")) for s in sided]))
    sens = [(f"At {sp:.0%} unstructured" if p == "unstructured" else f"At {p}", Setting(
        method="obs-diff", pattern=p, sparsity=sp, num_calib=num_calib)) for p, sp in grid["sensitivity"]]
    for key, b, claim in (("sensitivity vs uniform", "uniform", "A measured weighting (sensitivity: α_t from the harm of an "
                           "error at step t) ahead of uniform"),
                          ("sensitivity vs log-decrease", "log-decrease", "The measured weighting ahead of the paper's "
                           "log-decrease")):
        out.append(Family(key, claim, "ours", "not in the paper (ours)",
                          [Pair(ctx, "sensitivity", b, wt(s, "sensitivity"), wt(s, b)) for ctx, s in sens]))
    out.append(Family("structured slimdiff nominal", "Structured, at the same nominal sparsity (--sparsity): OBS-Diff "
                      "ahead of the peer SlimDiff (our reconstruction; SlimDiff's sparsity counts parameters, OBS-Diff's "
                      "heads and neurons)", "ours", "not compared in the OBS-Diff paper",
                      [Pair(f"At {s:.0%} structured", "obs-diff", "slimdiff", st("obs-diff", "structured", s),
                            st("slimdiff", "structured", s)) for s in structured]))
    gf = {"iterations": grid["gf_iterations"], "lr": grid["gf_lr"], "gradient_criterion": "lower"}
    mid = structured[len(structured) // 2]
    out.append(Family("structured gradient flow", "Structured: OBS-Diff ahead of the peer gradient flow (our "
                      f"reconstruction, {grid['gf_iterations']} iterations, the 'lower' criterion its ablation prefers)",
                      "ours", "not compared in the OBS-Diff paper",
                      [Pair(f"At {mid:.0%} structured", "obs-diff", "gradient-flow", st("obs-diff", "structured", mid),
                            Setting(method="gradient-flow", pattern="structured", sparsity=mid, num_calib=num_calib,
                                    extra=gf))]))
    if want & {"allocation part obs", "solver part"}:
        from .budgets import slimdiff_shares

        on_slim = {b: budget("obs-diff", b, unit_sparsity=slimdiff_shares(grid["model_dir"], b, num_calib)) for b in structured}
    else:
        on_slim = {b: None for b in structured}
    ctx = "At {:.0%} of the parameters"
    out.append(Family("allocation part obs", "Allocation part: OBS-Diff on SlimDiff's allocation ahead of OBS-Diff "
                      "uniform", "ours", "not in either paper",
                      [Pair(ctx.format(b), "OBS-Diff · SlimDiff's allocation", "OBS-Diff · uniform", on_slim[b],
                            budget("obs-diff", b, param_budget=b)) for b in structured]))
    out.append(Family("allocation part slimdiff", "Allocation part: SlimDiff's own allocation ahead of SlimDiff uniform",
                      "ours", "not in either paper (SlimDiff's abstract credits its allocator)",
                      [Pair(ctx.format(b), "SlimDiff · its allocation", "SlimDiff · uniform", budget("slimdiff", b),
                            budget("slimdiff", b, allocation="uniform")) for b in structured]))
    out.append(Family("solver part", "Solver part: SlimDiff's closed forms ahead of OBS on the same allocation", "ours",
                      "not in either paper",
                      [Pair(ctx.format(b), "SlimDiff · its allocation", "OBS-Diff · SlimDiff's allocation",
                            budget("slimdiff", b), on_slim[b]) for b in structured]))
    if "packages" in want:
        k_hi = units_of(grid["model_dir"])
        p50 = Setting(method="obs-diff", sparsity=0.5, num_calib=num_calib)
        out.append(Family("packages", f"More packages: one per unit (K = {k_hi}) keeps the quality of one (K = 1), 50% "
                          "unstructured", "paper",
                          "K=1 30.7 GB 572 s IR .857; K=4 24.1 GB 897 s .844; K=20 22.1 GB 2595 s .856 (resample): "
                          "no quality trend", [
                              Pair(f"{cal.capitalize()} calibration", f"K = {k_hi}", "K = 1",
                                   Setting(**{**p50.__dict__, "packages": k_hi, "extra": {"calibration": cal}}),
                                   Setting(**{**p50.__dict__, "packages": 1, "extra": {"calibration": cal}}))
                              for cal in ("resample", "propagate")], expect=NONE))
    sizes = sorted(grid["verdict_calib_sizes"])
    out.append(Family("calibration size", f"More calibration prompts ahead of fewer ({sizes[-1]} against each smaller "
                      "set; the paper: quality rises, then flattens)", "paper",
                      "quality rises steeply up to ~100 prompts, then flat (SD3-M)",
                      [Pair("At 50% unstructured", f"{sizes[-1]} prompts", f"{n} prompts",
                            Setting(method="obs-diff", sparsity=0.5, num_calib=sizes[-1]),
                            Setting(method="obs-diff", sparsity=0.5, num_calib=n)) for n in sizes[:-1]]))
    from ..shapes.model import DEFAULT_SAMPLING

    changes = [("At the default sampling", {})]
    changes += [(f"At CFG {g:g}", {"eval_guidance": g}) for g in grid["cfg_values"]
                if g != DEFAULT_SAMPLING["guidance_scale"]]
    changes += [(f"At {n} steps", {"eval_steps": n}) for n in grid["step_values"]
                if n != DEFAULT_SAMPLING["num_inference_steps"]]
    changes += [("With Heun", {"eval_sampler": "heun"})]
    out.append(Family("robustness", "Under other CFG, steps and samplers the dense model stays ahead of the pruned one "
                      "(OBS-Diff, 50% unstructured): the gap the paper reports under every change", "ours", "SD3-M 50%, IR dense→pruned: CFG 5 .83→.53, 7 .85→.64, "
                      "9 .83→.70; steps 15 .70→.49, 50 .94→.72; Heun .92→.72",
                      [Pair(c, "dense", "obs-diff", Setting(method="dense", sparsity=0.5, num_calib=num_calib, **kw),
                            Setting(method="obs-diff", sparsity=0.5, num_calib=num_calib, **kw)) for c, kw in changes],
                      metrics=("prompt_fidelity",)))
    out.append(premise_family(num_calib, grid["inject_structured"]))
    return [f for f in out if f.key in want]


PREMISE_METRICS = ("prompt_fidelity", "psnr", "pixel_mse", "ssim")


def premise_family(num_calib: int, structured: float) -> Family:
    """The premise behind decreasing weights, read on every paired metric: an error in the first half of the steps
    hurts the final image more than the same model's error in the second half — "pruned only in steps 11-20" ahead
    of "pruned only in steps 1-10" (chapter 08's error injection), for OBS-Diff at 50% unstructured and at
    ``structured``, and for noise of one relative size in both halves (chapter 08's equal-size probe). PSNR is the
    mean of per-image dB (a typical image), pixel MSE its pooled reading (total pixel damage): the two can disagree,
    so both are in the family."""
    from .timesteps import EQUAL_PROBE, window_label, window_tail
    from ..shapes.model import DEFAULT_SAMPLING
    from ..windows import halves

    early, late = halves(DEFAULT_SAMPLING["num_inference_steps"])
    u50 = Setting(method="obs-diff", sparsity=0.5, num_calib=num_calib)
    s_st = Setting(method="obs-diff", pattern="structured", sparsity=structured, num_calib=num_calib)
    pairs = [Pair(f"Halves, {ctx}", window_label(late), window_label(early), s, s, window_tail(late, probe),
                  window_tail(early, probe))
             for ctx, s, probe in (("50% unstructured", u50, ""), (f"{structured:.0%} structured", s_st, ""),
                                   ("equal-size noise", u50, EQUAL_PROBE))]
    return Family("premise", "Premise: an error at the early (noisy) steps harms the final image more than one at the "
                  "late steps (pruned only in the second half ahead of pruned only in the first half)", "paper",
                  "argued from error accumulation (the motivation of log-decrease weights), not measured", pairs,
                  metrics=PREMISE_METRICS)


def units_of(model_dir: str) -> int:
    """The number of basic units (one package each at the finest split) of the model at ``model_dir``."""
    from ..archs import iter_blocks, spec_for
    from ..io import load_pipeline
    from ..packages import layer_units

    den = load_pipeline(model_dir).transformer
    spec = spec_for(den)
    return len(layer_units(den, spec, list(range(len(iter_blocks(den, spec))))))


def settings_of(fams: list[Family]) -> list[Setting]:
    """Every setting whose study rows the families need, once, dense first (its images are every PSNR's reference)."""
    seen, out = set(), [Setting(method="dense", num_calib=fams[0].pairs[0].setting_a.num_calib)] if fams else []
    for f in fams:
        for p in f.pairs:
            for s, tail in ((p.setting_a, p.tail_a), (p.setting_b, p.tail_b)):
                if not tail and s.key(0) not in seen:
                    seen.add(s.key(0))
                    out.append(s)
    return out


INJECTION_CSV, PROBE_CSV = "08_injection_runs.csv", "08_equal_probe_runs.csv"  # chapter 08's window rows


def _window_rows(fams: list[Family], seeds, folder: str, **ev_kwargs) -> list[pd.DataFrame]:
    """The window rows the families' pairs name (chapter 08's error injection and equal-size probe, cached in its
    CSVs in ``folder``), on ``seeds``."""
    from .timesteps import EQUAL_PROBE, run_equal_probe, run_injection

    want: dict[str, tuple[dict, set]] = {}
    for f in fams:
        for p in f.pairs:
            for s, tail in ((p.setting_a, p.tail_a), (p.setting_b, p.tail_b)):
                if tail:
                    parts = dict(x.split("=", 1) for x in tail.strip("|").split("|"))
                    settings, windows = want.setdefault(parts.get("probe", ""), ({}, set()))
                    settings[s.key(0)] = s
                    windows.add(tuple(int(x) for x in parts["window"].split("-")))
    out = []
    for probe, (settings, windows) in want.items():
        fn, name = {"": (run_injection, INJECTION_CSV), EQUAL_PROBE: (run_equal_probe, PROBE_CSV)}[probe]
        out.append(fn(list(settings.values()), list(seeds), sorted(windows), os.path.join(folder, name), **ev_kwargs))
    return out


def run(fams: list[Family], seeds, runs_csv: str, more_seeds: dict | None = None, **ev_kwargs) -> pd.DataFrame:
    """The rows of every setting of ``fams`` on ``seeds``, and of the families named in ``more_seeds`` (family key ->
    further study seeds, for verdicts that came out close) on those too (cached in ``runs_csv``; see
    ``experiments.run_grid``); window rows (pairs with a ``tail``) come from chapter 08's caches beside ``runs_csv``."""
    folder = os.path.dirname(runs_csv)
    parts = [run_grid(settings_of(fams), list(seeds), runs_csv, **ev_kwargs)]
    parts += _window_rows(fams, seeds, folder, **ev_kwargs)
    for f in fams:
        extra = [sd for sd in (more_seeds or {}).get(f.key, []) if sd not in set(seeds)]
        if extra:
            parts.append(run_grid(settings_of([f]), extra, runs_csv, **ev_kwargs))
            parts += _window_rows([f], extra, folder, **ev_kwargs)
    return pd.concat(parts, ignore_index=True).drop_duplicates("key").reset_index(drop=True)


def rows_of(df: pd.DataFrame, s: Setting, tail: str = "") -> pd.DataFrame:
    """The rows of ``df`` computed for setting ``s`` (with ``tail``: its window rows), on any seed."""
    keys = df.key.astype(str).str.split("|", n=1).str[1]
    return df[keys.isin({s.key(int(sd)) + tail for sd in df.seed.unique()})]


def _score(df: pd.DataFrame, fam: Family, seeds) -> list[dict]:
    out = []
    sub = df[df.seed.isin(list(seeds))]
    for p in fam.pairs:
        ra, rb = rows_of(sub, p.setting_a, p.tail_a), rows_of(sub, p.setting_b, p.tail_b)
        for m in fam.metrics:
            xa, sa = outcomes(ra, m)
            xb, sb = outcomes(rb, m)
            if sa != sb or sorted(sa) != sorted(int(x) for x in seeds):
                raise ValueError(f"{fam.claim}: {p.a} and {p.b} need rows on seeds {list(seeds)}; have {sa} and {sb}")
            t = bootstrap_test(xa, xb)
            out.append({"context": p.context, "a": p.a, "b": p.b, "metric": m, **t,
                        "verdict": verdict(t["lo"], t["hi"], PAIRED[m][1]), "n_seeds": len(sa)})
    ph = holm([r["p"] for r in out])
    for r, q in zip(out, ph):
        r["p_holm"] = float(q)
        r["verdict_holm"] = adjusted_verdict(r["diff"], q, PAIRED[r["metric"]][1])
    return out


def replicates(study: dict, held: dict) -> str:
    """'yes' / 'weaker' / 'no' (module docstring) for one comparison on the study and the held-out seeds."""
    same_sign = np.sign(study["diff"]) == np.sign(held["diff"])
    if study["verdict_holm"] == NONE:
        return "yes" if held["verdict_holm"] == NONE else "no"
    if same_sign and held["verdict"] == study["verdict_holm"]:
        return "yes"
    return "weaker" if same_sign else "no"


def judge(df: pd.DataFrame, fams: list[Family], seeds=STUDY_SEEDS, heldout=HELDOUT_SEEDS,
          more_seeds: dict | None = None) -> pd.DataFrame:
    """One row per comparison of every family: difference, two-level interval, p, Holm-adjusted p and both verdicts
    on the study seeds (``seeds``, plus ``more_seeds[family key]`` for a family whose verdict came out close), the
    same on the held-out seeds, and whether it replicates."""
    rows = []
    for f in fams:
        mine = list(seeds) + [sd for sd in (more_seeds or {}).get(f.key, []) if sd not in set(seeds)]
        st, ho = _score(df, f, mine), (_score(df, f, heldout) if heldout else None)
        for i, r in enumerate(st):
            row = {"family": f.key, "claim": f.claim, "source": f.source, "paper": f.paper, "expect": f.expect, **r}
            if ho is not None:
                h = ho[i]
                row.update({f"heldout_{k}": h[k] for k in ("diff", "lo", "hi", "p", "p_holm", "verdict", "verdict_holm", "n_seeds")})
                row["replicates"] = replicates(r, h)
            rows.append(row)
    return pd.DataFrame(rows)


def family_verdict(verdicts, source: str, expect: str = AHEAD) -> str:
    """A claim's word from its comparisons' verdicts after Holm, each a ahead of b in the claimed direction; for a
    claim of no difference (``expect`` NONE) the claim holds while no comparison is told apart — which is not an
    equivalence test, and says so."""
    yes, no = ("reproduced", "not reproduced") if source == "paper" else ("supported", "not supported")
    v = list(verdicts)
    if expect == NONE:
        if v and all(x == NONE for x in v):
            return f"{yes} as far as this study resolves (no difference detected; not an equivalence test)"
        return f"{no}: a difference is detected"
    if v and all(x == AHEAD for x in v):
        return yes
    if AHEAD in v and BEHIND in v:
        return f"mixed: {yes} on some comparisons, {no} on others"
    if any(x == BEHIND for x in v):
        return no
    if all(x == NONE for x in v):
        return f"{no} (no difference detected)"
    return f"partly {yes}"


def claim_expect(g: pd.DataFrame) -> str:
    """A family's claimed outcome from its rows of results/verdicts.csv (files written before the column: ahead)."""
    return str(g["expect"].iloc[0]) if "expect" in g and isinstance(g["expect"].iloc[0], str) and g["expect"].iloc[0] else AHEAD


def claim_table(j: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: its verdict after Holm on the study seeds, the same on the held-out seeds, and how many of
    its comparisons replicate."""
    rows = []
    for claim, g in j.groupby("claim", sort=False):
        src = g.source.iloc[0]
        row = {"claim": claim, "source": src, "comparisons": len(g),
               "verdict (study seeds, Holm)": family_verdict(g.verdict_holm, src, claim_expect(g)),
               "verdict (study seeds, unadjusted)": family_verdict(g.verdict, src, claim_expect(g))}
        if "replicates" in g:
            row["verdict (held-out seeds, Holm)"] = family_verdict(g.heldout_verdict_holm, src, claim_expect(g))
            row["replicate"] = f"{int((g.replicates == 'yes').sum())} of {len(g)}"
            row["weaker"] = int((g.replicates == "weaker").sum())
        rows.append(row)
    return pd.DataFrame(rows)


def noise_floor(setting: Setting, seeds, threads, runs_csv: str, floor_csv: str | None = None,
                **ev_kwargs) -> tuple[pd.DataFrame, list[dict]]:
    """The same setting under two numerical regimes (torch thread counts ``threads``, e.g. (1, 2)): per seed, how many
    mask positions of the pruned layers flip between the two prunes and how far the metrics move; and the paired
    comparison of the two regimes' rows as if they were two methods (``compare.compare``) — the size of difference
    that float rounding alone makes. The rows are cached in ``runs_csv`` under their own regime's key; a seed whose
    line ``floor_csv`` (this function's earlier output) already holds for these two regimes is not pruned again."""
    import os

    import torch

    from . import experiments as ex
    from .compare import compare

    if len(threads) != 2:
        raise ValueError(f"threads must name two thread counts; got {threads}")
    label = f"{setting.sparsity:.0%} {setting.pattern}" if setting.pattern != "2:4" else "2:4"
    n0 = torch.get_num_threads()
    rows, masks, regimes = {}, {}, {}
    try:
        for t in threads:
            torch.set_num_threads(int(t))
            regimes[t] = ex.regime()
        done = pd.read_csv(floor_csv) if floor_csv and os.path.exists(floor_csv) else pd.DataFrame()
        if len(done) and "setting" in done:
            done = done[(done.setting == label) & (done.regime_a == regimes[threads[0]])
                        & (done.regime_b == regimes[threads[1]])]
        cached = {int(r.seed): r._asdict() for r in done.itertuples(index=False)} if len(done) else {}
        todo = [sd for sd in seeds if sd not in cached]
        for t in threads:
            torch.set_num_threads(int(t))
            ex.forget_pruned()
            ev = ex.Evaluator(**ev_kwargs)  # dense reference images of this regime
            rows[t] = run_grid([setting], list(seeds), runs_csv, evaluator=ev, progress=False).assign(regime=ex.regime())
            for sd in todo:
                ex.forget_pruned()
                pipe, _ = ex.pruned_pipeline(ev.model_dir, setting, sd)
                masks[t, sd] = {n: (p == 0) for n, p in pipe.transformer.named_parameters() if p.dim() == 2}
    finally:
        torch.set_num_threads(n0)
        ex.forget_pruned()
    ta, tb = threads
    per_seed = []
    for sd in seeds:
        if sd in cached:
            per_seed.append({k: v for k, v in cached[sd].items() if k != "setting"})
            continue
        ma, mb = masks[ta, sd], masks[tb, sd]
        flipped = sum(int((ma[n] != mb[n]).sum()) for n in ma)
        pruned = sum(int(ma[n].sum()) for n in ma)
        ra, rb = (rows[t][rows[t].seed == sd].iloc[0] for t in threads)
        pa, pb = (np.array([float(x) for x in r.pp_psnr.split(";")]) for r in (ra, rb))
        per_seed.append({"seed": sd, "regime_a": ra.regime, "regime_b": rb.regime, "mask_positions_flipped": flipped,
                         "share_of_pruned_positions": flipped / max(pruned, 1),
                         "prompt_fidelity_a": ra.prompt_fidelity, "prompt_fidelity_b": rb.prompt_fidelity,
                         "psnr_a": ra.psnr, "psnr_b": rb.psnr, "mean_abs_image_psnr_change": float(np.mean(np.abs(pa - pb))),
                         "images_changed": float(np.mean(pa != pb))})
    cmp_rows = compare(rows[tb], rows[ta], a=f"{tb} threads", b=f"{ta} threads", chapter="09 noise floor",
                       context=f"{setting.method} at {label}")
    return pd.DataFrame(per_seed), cmp_rows


def seed_table(df: pd.DataFrame, fams: list[Family], metric: str, heldout=HELDOUT_SEEDS) -> pd.DataFrame:
    """One row per comparison of ``fams`` on ``metric`` and seed: that seed's mean difference a − b (the spread the
    two-level interval covers)."""
    rows = []
    for f in fams:
        for p in f.pairs:
            xa, sa = outcomes(rows_of(df, p.setting_a, p.tail_a), metric)
            xb, sb = outcomes(rows_of(df, p.setting_b, p.tail_b), metric)
            common = sorted(set(sa) & set(sb))
            for sd in common:
                rows.append({"comparison": f"{p.context}: {p.a} − {p.b}", "seed": sd, "heldout": sd in set(heldout),
                             "diff": float(xa[sa.index(sd)].mean() - xb[sb.index(sd)].mean())})
    return pd.DataFrame(rows)
