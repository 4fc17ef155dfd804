"""Chapter 03's experiments at equal parameter counts: which structured method at which budget, and why.

Every variant removes the same share of the targeted layers' parameters (``--param-budget``); variants differ in the
solver (OBS-Diff's closed-form group OBS, SlimDiff's spectral closed forms, L1-norm without compensation) and in the
allocation (uniform: every block alike; global: OBS costs per parameter; SlimDiff's own greedy allocator). The
decomposition crosses the two solvers with two allocations — uniform and SlimDiff's (OBS-Diff solving SlimDiff's
per-group budget, turned into whole heads and neurons) — so the structured gap splits into an allocation part and a
solver part, each a paired comparison on the same prompts and seeds.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..allocation import shares_for_params
from ..archs import iter_blocks, spec_for
from .compare import NONE, compare_in
from ..config import PruneConfig
from .experiments import Setting
from ..io import load_pipeline
from ..packages import structured_units
from ..shapes import prompts as world_prompts
from ..slimdiff import removed_by_unit

OBS_UNIFORM, OBS_GLOBAL, OBS_SLIM = "OBS-Diff · uniform", "OBS-Diff · global", "OBS-Diff · SlimDiff's allocation"
SLIM_OWN, SLIM_UNIFORM, L1 = "SlimDiff · its allocation", "SlimDiff · uniform", "L1-norm · uniform"
VARIANTS = (OBS_UNIFORM, OBS_GLOBAL, OBS_SLIM, SLIM_OWN, SLIM_UNIFORM, L1)


def slimdiff_shares(model_dir: str, budget: float, num_calib: int, seed: int = 0) -> dict[str, float]:
    """SlimDiff's per-unit budget at ``budget`` (its own allocation, calibration seed ``seed``) as shares of whole heads
    and neurons per unit: the unit sparsity map with which OBS-Diff solves SlimDiff's allocation."""
    from ..driver import prune

    pipe = load_pipeline(model_dir)
    den = pipe.transformer
    spec = spec_for(den)
    units = structured_units(den, spec, list(range(1, len(iter_blocks(den, spec)) - 1)))  # first and last block kept
    rep = prune(load_pipeline(model_dir), PruneConfig(method="slimdiff", pattern="structured", sparsity=budget,
                                                      prompts=world_prompts("train", num_calib), seed=seed,
                                                      progress=False, count_flops=False))
    return shares_for_params(den, units, removed_by_unit(rep))


def budget_grid(model_dir: str, budgets, num_calib: int) -> list[Setting]:
    """The variants of the module docstring at each budget (SlimDiff's own allocation is the nominal SlimDiff row:
    its sparsity is already a parameter budget)."""
    grid = []
    for b in budgets:
        grid += [Setting(method="obs-diff", pattern="structured", sparsity=b, num_calib=num_calib,
                         extra={"param_budget": b}),
                 Setting(method="obs-diff", pattern="structured", sparsity=b, num_calib=num_calib,
                         extra={"param_budget": b, "allocation": "global"}),
                 Setting(method="obs-diff", pattern="structured", sparsity=b, num_calib=num_calib,
                         extra={"unit_sparsity": slimdiff_shares(model_dir, b, num_calib)}),
                 Setting(method="slimdiff", pattern="structured", sparsity=b, num_calib=num_calib),
                 Setting(method="slimdiff", pattern="structured", sparsity=b, num_calib=num_calib,
                         extra={"allocation": "uniform"}),
                 Setting(method="l1-norm", pattern="structured", sparsity=b, num_calib=num_calib,
                         extra={"param_budget": b})]
    return grid


def variant(row) -> str:
    """The variant label of a grid row (see ``VARIANTS``)."""
    alloc = row.get("extra_allocation")
    alloc = alloc if isinstance(alloc, str) else None
    has_map = isinstance(row.get("extra_unit_sparsity"), (dict, str))
    if row["method"] == "obs-diff":
        return OBS_SLIM if has_map else OBS_GLOBAL if alloc == "global" else OBS_UNIFORM
    if row["method"] == "slimdiff":
        return SLIM_UNIFORM if alloc == "uniform" else SLIM_OWN
    return L1


def label(df: pd.DataFrame) -> pd.DataFrame:
    """The grid's rows with a ``variant`` column and ``budget`` (the share of targeted parameters asked for)."""
    df = df.copy()
    if "targeted_removed" in df and "sparsity_actual" in df:  # SlimDiff's own sparsity counts parameters already
        slim = df.method == "slimdiff"
        df.loc[slim, "targeted_removed"] = df.loc[slim, "targeted_removed"].fillna(df.loc[slim, "sparsity_actual"])
    df["variant"] = [variant(r) for _, r in df.iterrows()]
    df["budget"] = df["sparsity"].astype(float)
    return df


# (a, b, what the difference measures): a - b on the same prompts and seeds
DECOMPOSITION = (
    (OBS_UNIFORM, SLIM_OWN, "the whole gap: OBS-Diff as the paper runs it − SlimDiff as it runs itself"),
    (OBS_SLIM, OBS_UNIFORM, "allocation, OBS solver: SlimDiff's allocation − uniform"),
    (SLIM_OWN, SLIM_UNIFORM, "allocation, SlimDiff solver: its allocation − uniform"),
    (SLIM_UNIFORM, OBS_UNIFORM, "solver, uniform allocation: SlimDiff − OBS-Diff"),
    (SLIM_OWN, OBS_SLIM, "solver, SlimDiff's allocation: SlimDiff − OBS-Diff"),
    (OBS_GLOBAL, OBS_UNIFORM, "allocation, OBS solver: global OBS − uniform"),
    (OBS_GLOBAL, SLIM_OWN, "OBS-Diff's best allocation − SlimDiff"),
    (OBS_UNIFORM, L1, "compensation: OBS-Diff − L1-norm, both uniform"),
)


def decomposition(df: pd.DataFrame, budgets, chapter: str, metrics=("prompt_fidelity", "psnr")) -> list[dict]:
    """Paired comparisons of ``DECOMPOSITION`` at each budget; each result carries ``part`` (what it measures)."""
    out = []
    for b in budgets:
        for a, o, part in DECOMPOSITION:
            for r in compare_in(df, "variant", a, o, where={"budget": float(b)}, metrics=metrics, chapter=chapter,
                                context=f"At {b:.0%} of the parameters"):
                out.append({**r, "part": part})
    return out


def decomposition_table(C: list[dict], metric: str) -> pd.DataFrame:
    """One row per part, one column per budget: the difference and interval on ``metric``, with its verdict."""
    from .compare import interval

    rows = [{"part": r["part"], "budget": r["context"].replace("At ", "").replace(" of the parameters", ""),
             "cell": f"{interval(r)} {r['verdict']}"} for r in C if r["metric"] == metric]
    t = pd.DataFrame(rows)
    return t.pivot(index="part", columns="budget", values="cell").reindex([p for _, _, p in DECOMPOSITION])


def best_by_budget(summary: pd.DataFrame, C: list[dict], metric: str = "prompt_fidelity") -> pd.DataFrame:
    """Per budget, the variant with the highest mean ``metric`` and the variants not told apart from it (paired)."""
    rows = []
    for b, g in summary.groupby("budget"):
        top = g.sort_values(f"{metric}_mean", ascending=False).iloc[0]
        ctx = f"At {b:.0%} of the parameters"
        tied = sorted({r["b"] if r["a"] == top.variant else r["a"] for r in C
                       if r["context"] == ctx and r["metric"] == metric and r["verdict"] == NONE
                       and top.variant in (r["a"], r["b"])})
        rows.append({"budget": b, "best": top.variant, f"{metric}": top[f"{metric}_mean"],
                     "not told apart from it (paired)": ", ".join(tied) or "—"})
    return pd.DataFrame(rows)


def params_share(df: pd.DataFrame, dense_params: float) -> np.ndarray:
    """The share of the transformer's parameters each row removed (in %)."""
    return 100 * (1 - df["params"].to_numpy(float) / dense_params)


def part_of(u) -> str:
    """The part of the model a structured unit belongs to (Flux's single-stream blocks apart)."""
    from ..surgery import unit_name

    single = "single-stream " if u.block.startswith("single_transformer_blocks") else ""
    if u.kind == "heads":
        return f"{single}attention"
    return f"{single}MLP" if single else ("text FFN" if "context" in unit_name(u) else "image FFN")


def spending(model_dir: str, budget: float, num_calib: int, seed: int = 0, variants=None) -> pd.DataFrame:
    """Where each allocation takes its parameters at ``budget``: per variant (``variants``: a subset of the four
    below) and part of the model (attention, image FFN, text FFN; Flux's single-stream attention and MLP), the
    parameters removed, their share of the removed total, and the whole heads removed (one prune each, seed
    ``seed``)."""
    from ..driver import prune
    from ..surgery import targeted_layers, targeted_size, unit_name

    den0 = load_pipeline(model_dir).transformer
    spec = spec_for(den0)
    units = structured_units(den0, spec, list(range(1, len(iter_blocks(den0, spec)) - 1)))
    sizes0 = {unit_name(u): targeted_size(den0, targeted_layers(den0, spec, [u], True), "parameters") for u in units}
    runs = {OBS_UNIFORM: dict(method="obs-diff", param_budget=budget),
            OBS_GLOBAL: dict(method="obs-diff", param_budget=budget, allocation="global"),
            SLIM_OWN: dict(method="slimdiff", sparsity=budget),
            SLIM_UNIFORM: dict(method="slimdiff", sparsity=budget, allocation="uniform")}
    runs = {k: v for k, v in runs.items() if variants is None or k in variants}
    heads = den0.config.num_attention_heads
    rows = []
    for name, kw in runs.items():
        pipe = load_pipeline(model_dir)
        prune(pipe, PruneConfig(pattern="structured", prompts=world_prompts("train", num_calib), seed=seed,
                                progress=False, count_flops=False, **kw))
        den = pipe.transformer
        for u in units:
            gone = sizes0[unit_name(u)] - targeted_size(den, targeted_layers(den, spec, [u], True), "parameters")
            rows.append({"allocation": name, "where": part_of(u), "params_removed": gone,
                         # whole heads (OBS-Diff); SlimDiff lowers ranks instead: no whole heads to count
                         "heads_removed": (round(gone * heads / sizes0[unit_name(u)]) if u.kind == "heads" else 0)
                         if kw["method"] == "obs-diff" else np.nan})
    df = pd.DataFrame(rows).groupby(["allocation", "where"], as_index=False)[["params_removed", "heads_removed"]].sum(min_count=1)
    df["share_of_removed"] = df.params_removed / df.groupby("allocation").params_removed.transform("sum")
    return df


def map_heads(grid: list[Setting], heads: int) -> pd.DataFrame:
    """Per budget, the heads that OBS-Diff on SlimDiff's allocation removes from each block (SlimDiff lowers query-key
    ranks instead; its attention budget, rounded to whole heads, is what this variant removes)."""
    rows = []
    for s in grid:
        m = s.extra.get("unit_sparsity")
        if m:
            rows.append({"budget": s.sparsity, "heads removed per block": [round(v * heads) for k, v in sorted(m.items())
                                                                          if k.endswith(".attn")]})
    return pd.DataFrame(rows)


def recommend(summary: pd.DataFrame, C: list[dict]) -> list[dict]:
    """Per budget, the variant to use: among the best on prompt fidelity and those not told apart from it (paired),
    the one with the highest PSNR; with the comparisons that decide it."""
    out = []
    fid = best_by_budget(summary, C, "prompt_fidelity").set_index("budget")
    for b, g in summary.groupby("budget"):
        top = fid.loc[b, "best"]
        tied = [t for t in fid.loc[b, "not told apart from it (paired)"].split(", ") if t and t != "—"]
        pool = g[g.variant.isin([top] + tied)].sort_values("psnr_mean", ascending=False)
        pick = pool.iloc[0].variant
        ctx = f"At {b:.0%} of the parameters"
        vs = [r for r in C if r["context"] == ctx and pick in (r["a"], r["b"])]
        out.append({"budget": b, "use": pick, "best_fidelity": top, "tied_on_fidelity": tied, "comparisons": vs})
    return out


def head_choices(model_dir: str, sparsity: float, num_calib: int, seeds, num_prompts: int) -> pd.DataFrame:
    """Uniform structured OBS-Diff at ``sparsity`` once per calibration seed: the heads it removes from each block
    (``block:head`` pairs, the block by its module name), its mean layer error, and its prompt fidelity and PSNR on ``num_prompts`` held-out
    prompts. Shows whether the per-layer objective, which picks the heads, separates choices the images do."""
    from .experiments import Evaluator, pruned_pipeline, run_setting

    ev, s, rows = Evaluator(model_dir, num_prompts), Setting(pattern="structured", sparsity=sparsity, num_calib=num_calib), []
    for seed in seeds:
        row = run_setting(ev, s, seed)
        _, rep = pruned_pipeline(model_dir, s, seed)  # the model just evaluated (kept by pruned_pipeline)
        heads = [(e["name"].split(".attn")[0], h) for e in rep["layers"] if e.get("heads_removed") for h in e["removed_heads"]]
        rows.append({"seed": seed, "heads_removed": " ".join(f"{b}:{h}" for b, h in heads),
                     "mean_rel_error": row["mean_rel_error"], "prompt_fidelity": row["prompt_fidelity"], "psnr": row["psnr"]})
    return pd.DataFrame(rows)
