"""Real-shape inference speed of structurally pruned blocks, on the CPU (a benchmark, not a test).

    python -m obslib.study.bench_speed          # 2 cores: about 20 min; writes results/speed_real.md and .json
    python -m obslib.study.bench_speed --tiny   # tiny blocks, a tiny model's shapes: seconds (make test runs it)

The embedded models cannot say how much faster a pruned *real* model runs: their transformer call is mostly fixed
overhead (chapter 07). So:

1. **The shapes.** Each method prunes the embedded model at 10, 20 and 30% of its targeted parameters, once (seed 0):
   structured OBS-Diff with the uniform and with the global allocation, and SlimDiff with its own. What each keeps is
   read off the pruned model's layer shapes per part of a block, summed over the targeted blocks (``kept_shares``):
   the attention's heads, its query-key and value-output widths (SlimDiff lowers per-head ranks instead of removing
   heads), and each FFN's / MLP's neurons.
2. **Scaled to a real block** (``shaped_block``). A random-initialised SD3-Medium joint block (dim 1536, 24 heads x
   64, FFN 6144) and a Flux.1 single-stream block (dim 3072, 24 heads x 128, MLP 12288) are cut to those kept shares,
   physically: heads and neurons by ``obslib.surgery``, SlimDiff's ranks by per-head projections of the query, key,
   value and output weights with its reshaped attention processor. The SD3 block takes the SD3 model's shares, the
   Flux block the Flux model's single-stream shares when that model is given, else the SD3 model's attention and
   image-FFN shares (the table says which). SlimDiff does not slim Flux's single-stream blocks (their fused
   projections), so it has no Flux row.
3. **Timed.** 1024 x 1024 images' tokens (4096 image tokens; SD3: 333 text tokens at the CFG batch of 2; Flux: 512
   text tokens at batch 1, Flux.1-dev's guidance embedding needing one call per step), float32, torch's threads:
   each pruned block against the dense one called alternately (``timing.paired_times``), the median of per-pair
   speed-ups with its range, beside the FLOPs ratio (torch's counter) and the parameter ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

BUDGETS = (0.1, 0.2, 0.3)
TEXT_BATCH = {"sd3-medium-joint": 2, "flux-single": 1}
# the embedded SD3 model's parts that stand for a Flux single-stream block's when no Flux model is given
FLUX_FROM_SD3 = {"single-stream attention": "attention", "single-stream MLP": "image FFN"}


def _variants() -> dict[str, dict]:
    from .budgets import OBS_GLOBAL, OBS_UNIFORM, SLIM_OWN

    return {OBS_UNIFORM: dict(method="obs-diff"), OBS_GLOBAL: dict(method="obs-diff", allocation="global"),
            SLIM_OWN: dict(method="slimdiff")}


def _targeted_units(den):
    from ..archs import iter_blocks, spec_for
    from ..packages import structured_units

    spec = spec_for(den)
    return structured_units(den, spec, list(range(1, len(iter_blocks(den, spec)) - 1)))


def kept_shares(den0, den) -> dict[str, dict[str, float]]:
    """Per part of a block (``budgets.part_of``: attention, image / text FFN, Flux's single-stream attention and MLP),
    the share the pruned denoiser ``den`` keeps of the dense ``den0``'s targeted blocks: for attention its heads
    ("heads") and its query-key and value-output widths ("qk", "vo"); for an FFN its neurons ("neurons")."""
    from ..surgery import head_layout, neuron_layout
    from .budgets import part_of

    sums: dict[str, dict[str, list[float]]] = {}
    for u in _targeted_units(den0):
        part = sums.setdefault(part_of(u), {})
        if u.kind == "heads":
            (h0, hd0, _), (h, hd_vo, _) = head_layout(den0, u), head_layout(den, u)
            q = f"{u.block}.{u.group.inputs[0]}"
            qk0, qk = den0.get_submodule(q).out_features, den.get_submodule(q).out_features
            for key, a, b in (("heads", h, h0), ("qk", qk, qk0), ("vo", h * hd_vo, h0 * hd0)):
                part.setdefault(key, [0.0, 0.0])
                part[key][0] += a
                part[key][1] += b
        else:
            part.setdefault("neurons", [0.0, 0.0])
            part["neurons"][0] += neuron_layout(den, u)[0]
            part["neurons"][1] += neuron_layout(den0, u)[0]
    return {p: {k: a / b for k, (a, b) in d.items()} for p, d in sums.items()}


def allocations(model_dir: str, budgets, num_calib: int, seed: int = 0, variants=None, progress: bool = True) -> list[dict]:
    """One structured prune per variant and budget of the model at ``model_dir``: rows of (variant, budget, part,
    kept shares)."""
    from tqdm.auto import tqdm

    from ..config import PruneConfig
    from ..driver import prune
    from ..io import load_pipeline
    from ..shapes import prompts as world_prompts

    den0 = load_pipeline(model_dir).transformer
    runs = [(v, kw, b) for v, kw in _variants().items() if variants is None or v in variants for b in budgets]
    rows = []
    for v, kw, b in tqdm(runs, desc=f"allocations of {os.path.basename(model_dir.rstrip('/'))}", disable=not progress):
        pipe = load_pipeline(model_dir)
        share = dict(param_budget=b) if kw["method"] == "obs-diff" else dict(sparsity=b)
        prune(pipe, PruneConfig(pattern="structured", prompts=world_prompts("train", num_calib), seed=seed,
                                progress=False, count_flops=False, **kw, **share))
        for part, kept in kept_shares(den0, pipe.transformer).items():
            rows.append({"variant": v, "budget": b, "part": part, **kept})
    return rows


def shaped_block(name: str, shares: dict[str, dict[str, float]], ranks: bool, image_tokens: int, tiny: bool):
    """(dense block, pruned copy, inputs) of the real block ``name`` cut to ``shares`` (``kept_shares``' form, by
    part): whole heads removed, or with ``ranks`` (SlimDiff) per-head query-key / value-output ranks lowered; FFN
    neurons removed. Which heads and neurons go does not matter for timing: the last ones."""
    import torch

    from ..slimdiff import project_attention
    from ..surgery import NoUndo, head_layout, neuron_layout, remove_heads, remove_neurons
    from .bench_gpu import make_block
    from .budgets import part_of

    holder, block, _, inputs = make_block(name, image_tokens, tiny, torch.device("cpu"), torch.float32, TEXT_BATCH[name])
    pruned_holder = copy.deepcopy(holder)
    for u in _targeted_units_of_one(pruned_holder):
        kept = shares[part_of(u)]
        if u.kind == "heads":
            heads, hd, _ = head_layout(pruned_holder, u)
            if ranks:
                project_attention(pruned_holder, u, max(1, round(hd * kept["qk"])), max(1, round(hd * kept["vo"])),
                                  NoUndo())
            else:
                k = heads - max(1, round(heads * kept["heads"]))
                if k:
                    remove_heads(pruned_holder, u, list(range(heads - k, heads)), NoUndo())
        else:
            width = neuron_layout(pruned_holder, u)[0]
            k = width - max(1, round(width * kept["neurons"]))
            if k:
                remove_neurons(pruned_holder, u, list(range(width - k, width)), NoUndo())
    return block, next(iter(pruned_holder.children()))[0], inputs


def _targeted_units_of_one(holder):
    from ..archs import FLUX, SD3
    from ..packages import structured_units

    return structured_units(holder, SD3 if hasattr(holder, "transformer_blocks") else FLUX, [0])


def _flops(block, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        block(**x)
    return fc.get_total_flops()


def time_block(name: str, rows: list[dict], image_tokens: int, repeats: int, tiny: bool, progress: bool = True,
               source: str = "") -> list[dict]:
    """Every (variant, budget) of ``rows`` (``allocations``' rows for this block's parts) shaped and timed against
    the dense block (module docstring, part 3)."""
    import torch
    from tqdm.auto import tqdm

    from .budgets import SLIM_OWN
    from .timing import paired_times

    out, dense_flops = [], None
    cases = sorted({(r["variant"], r["budget"]) for r in rows})
    for v, b in tqdm(cases, desc=f"timing {name}", disable=not progress):
        shares = {r["part"]: r for r in rows if r["variant"] == v and r["budget"] == b}
        dense, pruned, inputs = shaped_block(name, shares, v == SLIM_OWN, image_tokens, tiny)
        x = inputs()
        with torch.no_grad():
            r = paired_times(lambda: pruned(**x), lambda: dense(**x), repeats=repeats, warmup=1)
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        fd = dense_flops = dense_flops or _flops(dense, x)  # every case's dense block is the same (seeded)
        out.append({"block": name, "variant": v, "budget": b, "shapes_from": source, "dense_gflop": fd / 1e9,
                    "params_ratio": n(pruned) / n(dense), "flops_speedup": fd / _flops(pruned, x),
                    "dense_ms": 1000 * r["median_s"] * r["ratio"], "pruned_ms": 1000 * r["median_s"],
                    "speedup": r["ratio"], "speedup_lo": r["ratio_lo"], "speedup_hi": r["ratio_hi"],
                    "pairs": repeats, "threads": torch.get_num_threads(), "batch": TEXT_BATCH[name],
                    "image_tokens": image_tokens, **{f"kept_{p}": s for p, s in _kept_summary(shares).items()}})
    return out


def _kept_summary(shares: dict) -> dict:
    return {f"{part}:{k}": round(v, 4) for part, d in sorted(shares.items())
            for k, v in d.items() if k in ("heads", "qk", "vo", "neurons") and v == v}


def write_md(res: dict, path: str) -> None:
    from ..owned import write_text

    lines = [f"# Real-shape inference speed of structured pruning (CPU, torch {res['torch']}"
             f"{', tiny shapes' if res['tiny'] else ''})", "",
             "Generated by `python -m obslib.study.bench_speed` (see its docstring). One real-size block, random "
             "weights, cut to the shapes each method gives the embedded model at a parameter budget (the model's "
             f"kept shares per part, scaled to the real block); {res['image_tokens']} image tokens, float32 on "
             f"{res['threads']} threads. Speed-up: dense / pruned, the median of {res['repeats']} per-pair ratios "
             "(called alternately) with their range; FLOPs: dense / pruned by torch's counter.", "",
             "| block | method | budget | shapes from | params kept | FLOPs ratio | dense ms | pruned ms | "
             "speed-up [range] | speed-up / FLOPs ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['block']} | {r['variant']} | {r['budget']:.0%} | {r['shapes_from']} | "
                     f"{r['params_ratio']:.3f} | {r['flops_speedup']:.3f} | {r['dense_ms']:.1f} | {r['pruned_ms']:.1f} | "
                     f"{r['speedup']:.3f}× [{r['speedup_lo']:.3f}, {r['speedup_hi']:.3f}] | "
                     f"{r['speedup'] / r['flops_speedup']:.2f} |")
    lines += ["", "Kept shares per part, from the embedded models' prunes (heads; query-key and value-output widths; "
              "neurons):", "", "| model | method | budget | part | heads | qk | vo | neurons |", "|---|---|---|---|---|---|---|---|"]
    for m, rows in res["allocations"].items():
        for r in rows:
            lines.append(f"| {m} | {r['variant']} | {r['budget']:.0%} | {r['part']} | "
                         + " | ".join(f"{r[k]:.3f}" if k in r else "" for k in ("heads", "qk", "vo", "neurons")) + " |")
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m obslib.study.bench_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny blocks (checks the code path in seconds)")
    p.add_argument("--model-dir", default="models/shapes-sd3", help="the embedded SD3 model whose shapes are scaled")
    p.add_argument("--flux-model-dir", default="models/shapes-flux",
                   help="the embedded Flux model (its single-stream shapes); when absent, the SD3 model's stand in")
    p.add_argument("--budgets", default="0.1,0.2,0.3", help="parameter budgets, comma-separated, each in (0, 0.5]")
    p.add_argument("--num-calib", type=int, default=16, help="calibration prompts of each embedded-model prune")
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per comparison (after one untimed pair)")
    p.add_argument("--image-tokens", type=int, default=None, help="image tokens (default 4096: 1024 x 1024; --tiny 64)")
    p.add_argument("--out", default="results/speed_real.md")
    p.add_argument("--json", default="results/speed_real.json")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    def bad(msg: str) -> int:
        print(f"bench_speed: error: {msg}", file=sys.stderr)
        return 2

    try:
        budgets = [float(x) for x in a.budgets.split(",")]
    except ValueError:
        return bad(f"--budgets {a.budgets!r} must be comma-separated numbers in (0, 0.5]")
    if not budgets or not all(0 < b <= 0.5 for b in budgets):
        return bad(f"--budgets {a.budgets!r} must be comma-separated numbers in (0, 0.5]")
    for flag, v in (("--repeats", a.repeats), ("--num-calib", a.num_calib), ("--image-tokens", a.image_tokens)):
        if v is not None and v < 1:
            return bad(f"{flag} {v} must be a positive integer")
    if not os.path.isfile(os.path.join(a.model_dir, "model_index.json")):
        return bad(f"--model-dir {a.model_dir!r} is not a diffusers pipeline directory (no model_index.json)")
    flux = a.flux_model_dir if a.flux_model_dir and os.path.isfile(os.path.join(a.flux_model_dir, "model_index.json")) \
        else None
    import torch

    from ..errors import UsageError
    from ..owned import write_json
    from .budgets import SLIM_OWN

    tokens = a.image_tokens or (64 if a.tiny else 4096)
    progress = not a.no_progress
    t0 = time.perf_counter()
    try:
        allocs = {"SD3": allocations(a.model_dir, budgets, a.num_calib, progress=progress)}
        notes = []
        if flux:
            allocs["Flux"] = [r for r in allocations(flux, budgets, a.num_calib, progress=progress,
                                                      variants=[v for v in _variants() if v != SLIM_OWN])
                              if r["part"].startswith("single-stream")]
            flux_rows, source = allocs["Flux"], "Flux model"
        else:
            flux_rows = [{**r, "part": fp} for r in allocs["SD3"] if r["variant"] != SLIM_OWN
                         for fp, sp in FLUX_FROM_SD3.items() if r["part"] == sp]
            source = "SD3 model"
            notes.append(f"No Flux model at {a.flux_model_dir!r}: the Flux block takes the SD3 model's attention and "
                         "image-FFN shares.")
        notes.append("SlimDiff leaves Flux's single-stream blocks dense (their fused projections): no Flux row.")
        rows = time_block("sd3-medium-joint", [r for r in allocs["SD3"] if r["part"] in ("attention", "image FFN",
                                                                                        "text FFN")],
                          tokens, a.repeats, a.tiny, progress, "SD3 model")
        rows += time_block("flux-single", flux_rows, tokens, a.repeats, a.tiny, progress, source)
    except UsageError as e:
        return bad(str(e))
    res = {"torch": torch.__version__, "tiny": a.tiny, "image_tokens": tokens, "repeats": a.repeats,
           "threads": torch.get_num_threads(), "budgets": budgets, "allocations": allocs, "rows": rows, "notes": notes,
           "seconds": time.perf_counter() - t0}
    write_json(a.json, json.loads(json.dumps(res, default=float)))
    write_md(res, a.out)
    print(open(a.out).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
