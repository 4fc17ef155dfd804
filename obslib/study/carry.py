"""Chapter 10: which verdicts carry over from the embedded SD3 model to a second, differently built model.

The same families as chapter 09 (``verdicts.families``), cut to the comparisons that fit the chapter's time budget
(``restrict``), are run and judged on each model by the same code: the same study and held-out seeds, two-level
intervals and Holm's correction within each family (now over the comparisons kept). ``carry_table`` puts the two
models' verdicts side by side, claim by claim. Each model's rows live in its own run cache (``study.settings``), and
every row's key names its model (``experiments.cache_tag``), so the two never meet in one comparison.
"""
from __future__ import annotations

import os

import pandas as pd

from .verdicts import Family, claim_table


def restrict(fams: list[Family], contexts: dict) -> list[Family]:
    """The families named in ``contexts`` (family key -> the pairs to keep, named by their context or either side's
    label, or None for all), in ``contexts``' order, each with only those pairs."""
    by_key = {f.key: f for f in fams}
    unknown = [k for k in contexts if k not in by_key]
    if unknown:
        raise ValueError(f"unknown families {unknown}; allowed: {', '.join(by_key)}")
    out = []
    for key, keep in contexts.items():
        f = by_key[key]
        names = [{p.context, p.a, p.b} for p in f.pairs]
        pairs = [p for p, n in zip(f.pairs, names) if keep is None or n & set(keep)]
        missing = set(keep or ()) - set().union(*names)
        if missing:
            raise ValueError(f"family {key!r} has no comparison {sorted(missing)}; it has "
                             f"{', '.join(sorted(set().union(*names)))}")
        out.append(Family(f.key, f.claim, f.source, f.paper, pairs, f.metrics, f.expect))
    return out


def _word(v: str) -> str:
    """A verdict's direction, whatever the claim's source: the words of the paper's claims and of ours aligned."""
    return (v.replace("not reproduced", "not supported").replace("reproduced", "supported"))


def carry_table(judged: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per claim: each model's verdict after Holm on the study seeds, its held-out replication, and whether
    the models agree — on the claim's word, and comparison by comparison (the same verdict after Holm on the same
    setting and metric). ``judged``: model label -> ``verdicts.judge`` output on the same families."""
    names = list(judged)
    tables = {m: claim_table(j).set_index("claim") for m, j in judged.items()}
    rows = []
    for claim in tables[names[0]].index:
        row = {"claim": claim, "source": tables[names[0]].loc[claim, "source"]}
        for m in names:
            t = tables[m].loc[claim]
            row[f"{m}: verdict"] = t["verdict (study seeds, Holm)"]
            if "replicate" in t:
                row[f"{m}: replicate"] = t["replicate"]
        words = {_word(row[f"{m}: verdict"]) for m in names}
        row["claim agrees"] = "yes" if len(words) == 1 else "no"
        key = ["context", "a", "b", "metric"]
        per = [judged[m][judged[m].claim == claim].set_index(key).verdict_holm for m in names]
        common = per[0].index.intersection(per[1].index)
        same = int((per[0].loc[common] == per[1].loc[common]).sum())
        row["comparisons agreeing"] = f"{same} of {len(common)}"
        rows.append(row)
    return pd.DataFrame(rows)


def disagreements(judged: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The comparisons whose verdict after Holm differs between the models, with both differences."""
    (na, ja), (nb, jb) = judged.items()
    key = ["claim", "context", "a", "b", "metric"]
    m = ja.merge(jb, on=key, suffixes=(f" ({na})", f" ({nb})"))
    diff = m[m[f"verdict_holm ({na})"] != m[f"verdict_holm ({nb})"]]
    return diff[key + [f"diff ({na})", f"verdict_holm ({na})", f"diff ({nb})", f"verdict_holm ({nb})"]]


def prune_cost(df: pd.DataFrame, fams: list[Family], family: str) -> pd.DataFrame:
    """Per comparison of ``family``: the median prune time of a and of b over the seeds both have, and the median of
    the per-seed ratios a / b (e.g. one package per unit against one package)."""
    from .verdicts import rows_of

    rows = []
    for f in fams:
        for p in f.pairs if f.key == family else ():
            ra = rows_of(df, p.setting_a).set_index("seed").prune_s
            rb = rows_of(df, p.setting_b).set_index("seed").prune_s
            common = ra.index.intersection(rb.index)
            rows.append({"context": p.context, "a": p.a, "b": p.b, "seeds": len(common),
                         "prune_s a": float(ra.loc[common].median()), "prune_s b": float(rb.loc[common].median()),
                         "a / b": float((ra.loc[common] / rb.loc[common]).median())})
    return pd.DataFrame(rows)


def mask_agreement(model_dir: str, a, b, seed: int = 0) -> dict:
    """Prune the model at ``model_dir`` with settings ``a`` and ``b`` (``experiments.Setting``; calibration seed
    ``seed``) and compare their masks over the layers either pruned: the positions pruned under ``a``, and the share
    of them that ``b`` decides otherwise (e.g. propagate against resample, both with one package per unit)."""
    from .experiments import pruned_pipeline

    masks = []
    for s in (a, b):
        pipe, _ = pruned_pipeline(model_dir, s, seed, False)
        masks.append({n: (p.detach() == 0) for n, p in pipe.transformer.named_parameters() if p.dim() == 2})
    ma, mb = masks
    names = [n for n in ma if bool(ma[n].any()) or bool(mb[n].any())]
    pruned = sum(int(ma[n].sum()) for n in names)
    differ = sum(int((ma[n] != mb[n]).sum()) for n in names)
    return {"layers": len(names), "positions pruned": pruned, "positions decided otherwise": differ,
            "share": differ / max(pruned, 1)}


def tiny_flux_model(path: str, vae_from: str) -> str:
    """A tiny random Flux pipeline (2 double- and 2 single-stream blocks, 8 heads; ``obslib.shapes.flux``) around the
    VAE of ``vae_from``, with the trained Flux model's sampling defaults: what quick mode runs the chapter on, so
    that ``make test`` exercises the second architecture without the trained model. Built once; reused after."""
    from ..io import load_pipeline, save_pipeline
    from ..shapes.flux import DEFAULT_SAMPLING, build_flux_pipeline

    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, "model_index.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    vae = load_pipeline(vae_from).vae
    pipe = build_flux_pipeline(vae, 0, num_layers=2, num_single_layers=2)  # first and last block excluded: 2 left
    size = vae.config.sample_size
    defaults = {**DEFAULT_SAMPLING, "calibration_prompts": "shapes-train", "image_size": size, "height": size,
                "width": size}
    save_pipeline(pipe, path, extra_json={"obslib_defaults.json": defaults,
                                          "obslib_training.json": [{"arch": "flux", "steps": 0, "tiny": True}]})
    return path
