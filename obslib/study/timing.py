"""Wall-time measurements that are checked before they are written (chapter 07 and any speed number in results/).

A measurement is kept only when the machine was idle when it started and the numbers are plausible:

* idle: the 1-minute load average is not above the number of usable cores (this process never runs more threads
  than that, so only other work can push it higher), and other processes use at most ``MAX_BUSY`` of the CPUs
  during a short window in which this process sleeps (``/proc/stat``; the load average lags by a minute);
* plausible (``timing_problems``): no maximum above ``MAX_SPREAD`` × its median, and the whole pipeline is not
  faster than the transformer calls it makes (``steps`` CFG-batched forwards at the batch timed alone).

A rejected measurement is repeated (``measure_checked``) up to a number of attempts; when all are rejected the
last one is kept with ``accepted=False`` and the reasons, never silently as if it were good.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pandas as pd
import torch

MAX_SPREAD = 1.5  # a maximum above this many times its median rejects a measurement
MAX_BUSY = 0.10   # share of all CPUs that other processes may use while the machine counts as idle

from ..paths import DEFAULT_MODEL

# (median, maximum) column pairs that timing_problems checks when a row has them
SPREAD_COLUMNS = (("transformer_ms", "transformer_ms_max"), ("pipeline_s", "pipeline_s_max"),
                  ("dense_ms", "dense_ms_max"), ("sparse_2to4_ms", "sparse_2to4_ms_max"))


# ------------------------------------------------------------------------------------------ measuring
def median_time(fn, repeats: int = 7, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Median, min and max wall time (seconds) of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = clock()
        fn()
        ts.append(clock() - t)
    return {"median_s": float(np.median(ts)), "min_s": float(np.min(ts)), "max_s": float(np.max(ts)), "repeats": repeats}


def paired_times(fn, ref_fn, repeats: int = 7, warmup: int = 1, clock=time.perf_counter) -> dict:
    """``fn`` timed in alternation with ``ref_fn`` (the order swapped every pair): ``fn``'s median/min/max seconds, and
    the median, min and max of the per-pair ratios ref time / fn time (a speed-up of ``fn`` over ``ref_fn`` that a
    machine's drift over minutes cannot bias)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        ref_fn(), fn()
    mine, theirs = [], []
    for i in range(repeats):
        for f, out in ((fn, mine), (ref_fn, theirs)) if i % 2 else ((ref_fn, theirs), (fn, mine)):
            t = clock()
            f()
            out.append(clock() - t)
    ratios = [r / m for r, m in zip(theirs, mine)]
    return {"median_s": float(np.median(mine)), "min_s": float(np.min(mine)), "max_s": float(np.max(mine)),
            "ratio": float(np.median(ratios)), "ratio_lo": float(np.min(ratios)), "ratio_hi": float(np.max(ratios)),
            "repeats": repeats}


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (``os.getloadavg()[0]``); NaN where the system has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) - idle, sum(vals[:8])  # guest time is already inside user time


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def cpu_busy_share(window_s: float = 0.5, sleep=time.sleep) -> float:
    """Share of all CPUs that other processes kept busy during ``window_s`` seconds in which this one sleeps (its
    own CPU time in the window, e.g. thread pools still spinning, is subtracted); NaN without /proc/stat or for a
    zero window."""
    if window_s <= 0:
        return float("nan")
    a, own = _cpu_times(), _own_cpu_s()
    sleep(window_s)
    b, own = _cpu_times(), _own_cpu_s() - own
    if a is None or b is None or b[1] <= a[1]:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return min(1.0, max(0.0, (b[0] - a[0] - own * ticks) / (b[1] - a[1])))


def idle_problems(load_1m: float, busy_share: float, cpus: int, max_load: float | None = None,
                  max_busy: float | None = MAX_BUSY) -> list[str]:
    """Why the machine is not idle (empty when it is). ``max_load`` defaults to ``cpus``; None thresholds are off
    and NaN readings (no load average, no /proc/stat) are not held against the machine."""
    out = []
    max_load = float(cpus) if max_load is None else max_load
    if math.isfinite(load_1m) and load_1m > max_load:
        out.append(f"machine not idle: 1-minute load average {load_1m:.2f} > {max_load:g} ({cpus} usable cores)")
    if max_busy is not None and math.isfinite(busy_share) and busy_share > max_busy:
        out.append(f"machine not idle: other processes used {busy_share:.0%} of the CPUs (limit {max_busy:.0%})")
    return out


def idle_check(window_s: float = 0.5, max_load: float | None = None, max_busy: float | None = MAX_BUSY) -> dict:
    """Load average and other processes' CPU share now, with ``idle_problems``' reasons."""
    load, cpus = load_average(), usable_cpus()
    busy = cpu_busy_share(window_s) if max_busy is not None else float("nan")
    return {"load_1m": load, "busy_share": busy, "cpus": cpus,
            "problems": idle_problems(load, busy, cpus, max_load=max_load, max_busy=max_busy)}


# ------------------------------------------------------------------------------------------ checking
def timing_problems(row, steps: int | None = None, max_spread: float = MAX_SPREAD) -> list[str]:
    """Reasons a measurement row is implausible (empty when it is plausible).

    ``row`` (dict or Series) may hold any of SPREAD_COLUMNS' (median, max) pairs: a median that is not a positive
    finite time, or a maximum above ``max_spread`` × its median, is a problem. With ``steps`` (or a ``steps``
    column) and both ``pipeline_s`` and ``transformer_ms``, a pipeline median below ``steps`` × the transformer
    median is one too: the pipeline makes those calls at the same CFG batch, plus text encoders and the VAE.
    """
    row = dict(row)
    out = []
    for med, mx in SPREAD_COLUMNS:
        if med not in row:
            continue
        m = float(row[med])
        if not (math.isfinite(m) and m > 0):
            out.append(f"{med} is {m!r}, not a positive time")
            continue
        if mx in row:
            x = float(row[mx])
            if not math.isfinite(x):
                out.append(f"{mx} is {x!r}")
            elif x > max_spread * m:
                out.append(f"{mx} {x:.4g} is {x / m:.2f}× its median {m:.4g} (limit {max_spread:g}×)")
    if steps is None and row.get("steps") is not None:
        steps = int(row["steps"])
    if steps is not None and "pipeline_s" in row and "transformer_ms" in row:
        p, t = float(row["pipeline_s"]), float(row["transformer_ms"])
        calls = steps * t / 1000
        if math.isfinite(p) and math.isfinite(t) and p < calls:
            out.append(f"pipeline {p:.3f} s is faster than its own {steps} transformer calls "
                       f"({steps} × {t:.1f} ms = {calls:.3f} s)")
    return out


def measure_checked(measure, steps: int | None = None, attempts: int = 3, pause_s: float = 5.0, idle=None,
                    sleep=time.sleep, max_spread: float = MAX_SPREAD) -> dict:
    """``measure()`` (a dict of times) repeated until the machine was idle before it and ``timing_problems``
    finds nothing, at most ``attempts`` times with ``pause_s`` seconds between attempts.

    Returns the last measurement with ``attempts`` (how many were made), ``load_at_start`` and ``busy_at_start``
    (the idle check just before it), ``accepted`` and ``problems`` (its reasons, "; "-joined, empty when
    accepted) and ``earlier_problems`` (the rejected attempts' reasons). ``idle()`` returns a dict like
    ``idle_check``'s (default: ``idle_check()``); ``sleep`` is injectable for tests."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    idle = idle or idle_check
    earlier = []
    for attempt in range(1, attempts + 1):
        machine = idle()
        row = dict(measure())
        problems = list(machine.get("problems", [])) + timing_problems(row, steps, max_spread)
        row.update(attempts=attempt, load_at_start=float(machine.get("load_1m", float("nan"))),
                   busy_at_start=float(machine.get("busy_share", float("nan"))), accepted=not problems,
                   problems="; ".join(problems), earlier_problems=" | ".join(earlier))
        if not problems:
            return row
        earlier.append(f"attempt {attempt}: " + "; ".join(problems))
        if attempt < attempts:
            sleep(pause_s)
    return row


def compare_to_flops(lo: float, hi: float, predicted: float) -> str:
    """'below', 'at' or 'above': where a measured speed-up whose spread is [lo, hi] lies against the FLOPs
    prediction ('at' when the prediction falls inside the spread)."""
    if hi < predicted:
        return "below"
    if lo > predicted:
        return "above"
    return "at"


# ------------------------------------------------------------------------------------------ the tables
def pipeline_calls(pipe, prompts) -> dict:
    """Run the pipeline once (``generate`` with its defaults; also a warm-up) and record its transformer calls:
    ``steps`` (how many), ``batch`` and ``context`` (text tokens) of the first, whether all had that shape, and
    ``inputs``: the first call's keyword arguments (tensors copied), what a timed transformer call replays — for any
    architecture (SD3's latents and pooled text, Flux's packed tokens and position ids)."""
    from ..evaluate import generate

    shapes, first = [], {}

    def hook(module, args, kwargs):
        shapes.append((tuple(kwargs["hidden_states"].shape), tuple(kwargs["encoder_hidden_states"].shape)))
        if not first:
            first.update({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    h = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(pipe, prompts, 0, progress=False)
    finally:
        h.remove()
    if not shapes:
        raise RuntimeError("the pipeline made no transformer call")
    return {"steps": len(shapes), "batch": shapes[0][0][0], "context": shapes[0][1][1],
            "same_shape": all(s == shapes[0] for s in shapes), "inputs": first}


def budget_variants(budgets) -> dict[str, dict]:
    """The equal-parameter variants of chapter 03 that change shapes differently: OBS-Diff's global allocation and
    SlimDiff, at each share of the targeted parameters (``speed_table``'s ``variants``)."""
    out = {}
    for b in budgets:
        out[f"OBS-Diff global {b:.0%} params"] = {"param_budget": b, "allocation": "global"}
        out[f"SlimDiff {b:.0%} params"] = {"method": "slimdiff", "sparsity": b}
    return out


def speed_table(model_dir: str | None = None, sparsities=(0.1, 0.2, 0.3), repeats: int = 7, num_calib: int = 32,
                batch_prompts: int = 16, attempts: int = 3, pause_s: float = 10.0, idle_window_s: float = 0.5,
                max_spread: float = MAX_SPREAD, progress: bool = True, idle=None,
                variants: dict[str, dict] | None = None) -> pd.DataFrame:
    """Dense vs structurally pruned (OBS-Diff) wall times on this machine, each variant checked and repeated.
    ``sparsities``: OBS-Diff structured at these nominal shares of heads and neurons (rows of kind "nominal");
    ``variants``: more pruned models, label -> structured ``PruneConfig`` fields (kind "budget"; e.g.
    ``budget_variants``).

    Per variant: one transformer forward at the pipeline's CFG batch and text length (found by running the
    pipeline once, ``pipeline_calls``; ``steps`` is its number of transformer calls) timed ``repeats`` times, and
    the whole pipeline (``generate`` on ``batch_prompts`` held-out prompts, default steps and guidance) timed
    ``max(2, repeats // 2)`` times, each after a warm-up; median/min/max of both. ``measure_checked`` repeats a
    rejected variant up to ``attempts`` times; see its columns. Speed-ups are against the dense row, with a spread
    from the extremes (dense min / variant max .. dense max / variant min) and ``transformer_vs_flops``:
    ``compare_to_flops`` of that spread against ``flops_ratio_inv`` (dense FLOPs / variant FLOPs)."""
    from tqdm.auto import tqdm

    from ..config import PruneConfig
    from ..driver import prune
    from ..evaluate import generate
    from ..flops import call_flops
    from ..io import load_pipeline
    from ..sampling import calls_per_step
    from ..shapes import prompts as world_prompts

    model_dir = model_dir or DEFAULT_MODEL
    idle = idle or (lambda: idle_check(idle_window_s))
    ps = world_prompts("heldout", batch_prompts)
    rows = []
    todo = [("dense", "dense", None)] + [(f"structured {s:.0%}", "nominal", {"sparsity": s}) for s in sparsities]
    todo += [(label, "budget", kw) for label, kw in (variants or {}).items()]
    ref, inputs = None, None
    for label, kind, kw in tqdm(todo, desc="speed", disable=not progress):
        pipe = load_pipeline(model_dir)
        if kw is not None:
            prune(pipe, PruneConfig(**{"pattern": "structured", "prompts": world_prompts("train", num_calib),
                                       "progress": False, "count_flops": False, **kw}))
        calls = pipeline_calls(pipe, ps)
        # one call per step on the CFG batch (SD3), or two on the prompts alone (true CFG: prompt, then negative)
        width = batch_prompts * (2 if calls_per_step(pipe) == 1 else 1)
        if calls["batch"] != width or not calls["same_shape"]:
            raise RuntimeError(f"the pipeline's transformer calls are not {width} wide ({batch_prompts} prompts) "
                               f"with one shape: { {k: v for k, v in calls.items() if k != 'inputs'} }")
        den = pipe.transformer
        b, n_ctx = calls["batch"], calls["context"]
        if inputs is None:  # one set of transformer inputs for every variant (their calls have the same shapes)
            inputs = calls["inputs"]

        def fwd(d=den):
            with torch.no_grad():
                d(**inputs)

        def gen(p=pipe):
            generate(p, ps, 0, progress=False)

        def measure():
            if ref is None:  # dense: on its own
                tf = median_time(fwd, repeats)
                tp = median_time(gen, max(2, repeats // 2))
                return {"transformer_ms": 1000 * tf["median_s"], "transformer_ms_min": 1000 * tf["min_s"],
                        "transformer_ms_max": 1000 * tf["max_s"], "pipeline_s": tp["median_s"],
                        "pipeline_s_min": tp["min_s"], "pipeline_s_max": tp["max_s"]}
            # a pruned variant: alternated call by call with dense, so drift of the machine hits both alike
            tf = paired_times(fwd, ref[0], repeats)
            tp = paired_times(gen, ref[1], max(2, repeats // 2))
            return {"transformer_ms": 1000 * tf["median_s"], "transformer_ms_min": 1000 * tf["min_s"],
                    "transformer_ms_max": 1000 * tf["max_s"], "pipeline_s": tp["median_s"],
                    "pipeline_s_min": tp["min_s"], "pipeline_s_max": tp["max_s"],
                    "paired_transformer_speedup": tf["ratio"], "paired_transformer_speedup_lo": tf["ratio_lo"],
                    "paired_transformer_speedup_hi": tf["ratio_hi"], "paired_pipeline_speedup": tp["ratio"],
                    "paired_pipeline_speedup_lo": tp["ratio_lo"], "paired_pipeline_speedup_hi": tp["ratio_hi"]}

        m = measure_checked(measure, steps=calls["steps"], attempts=attempts, pause_s=pause_s, idle=idle,
                            max_spread=max_spread)
        if ref is None:
            ref = (fwd, gen)  # dense stays loaded: every variant is timed against it
        s = 0.0 if kw is None else kw.get("param_budget", kw.get("sparsity", 0.0))
        rows.append({"variant": label, "kind": kind, "sparsity": s,
                     "params": sum(p.numel() for p in den.parameters()),
                     "gflops": call_flops(den, ((), inputs)) / 1e9,  # the timed call's own
                     **m, "steps": calls["steps"], "cfg_batch": b, "context_tokens": n_ctx, "repeats": repeats,
                     "threads": torch.get_num_threads()})
    return add_speedups(pd.DataFrame(rows))


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speed-up columns against the first (dense) row; see ``speed_table``."""
    df = df.copy()
    d = df.iloc[0]
    df["params_removed"] = 1 - df.params / d.params
    df["flops_ratio_inv"] = d.gflops / df.gflops
    for part, unit in (("transformer", "ms"), ("pipeline", "s")):
        med = f"{part}_{unit}"
        df[f"{part}_speedup"] = d[med] / df[med]
        df[f"{part}_speedup_lo"] = d[f"{med}_min"] / df[f"{med}_max"]
        df[f"{part}_speedup_hi"] = d[f"{med}_max"] / df[f"{med}_min"]
        for sfx in ("", "_lo", "_hi"):  # variants timed in alternation with dense: their per-pair ratios
            col = f"paired_{part}_speedup{sfx}"
            if col in df:
                df[f"{part}_speedup{sfx}"] = df[col].fillna(df[f"{part}_speedup{sfx}"])
    df["transformer_vs_flops"] = [compare_to_flops(lo, hi, f) for lo, hi, f in
                                  zip(df.transformer_speedup_lo, df.transformer_speedup_hi, df.flops_ratio_inv)]
    df["speedup_accepted"] = df.accepted.astype(bool) & bool(d.accepted)
    # a speed-up is quoted only where the per-pair ratio and the two medians agree in direction (a paired median of
    # 1.17x beside a pruned median slower than dense's says the machine drifted, not that pruning sped it up)
    for part, unit in (("transformer", "ms"), ("pipeline", "s")):
        by_medians = d[f"{part}_{unit}"] / df[f"{part}_{unit}"]
        df[f"{part}_medians_ratio"] = by_medians
        df[f"{part}_quoted"] = df.speedup_accepted & ((df[f"{part}_speedup"] > 1) == (by_medians > 1))
    return df


def semi_structured_benchmark(shapes=((1536, 1536), (1536, 6144), (6144, 1536), (4096, 4096)), tokens: int = 8192,
                              repeats: int = 50, attempts: int = 3, pause_s: float = 2.0) -> dict:
    """2:4 sparse (cuSPARSELt/CUTLASS through torch) vs dense fp16 matmuls on CUDA, median/min/max of CUDA-event
    times, each shape checked and repeated like ``speed_table``'s variants; skipped without a GPU.
    Returns ``{"message": str, "rows": [dict, ...]}`` (no rows without CUDA)."""
    if not torch.cuda.is_available():
        return {"message": "No CUDA device here: the 2:4 kernel timing is skipped (run 07_speed on a GPU machine).",
                "rows": []}
    from torch.sparse import to_sparse_semi_structured

    from ..baselines import nm_mask

    def host_load():  # GPU kernels: the host's load is recorded, not held against the measurement
        return idle_check(window_s=0.0, max_load=float("inf"), max_busy=None)

    rows = []
    for out_f, in_f in shapes:
        W = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        W = W.masked_fill(nm_mask(W.abs().float(), 2, 4), 0)
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
        Ws = to_sparse_semi_structured(W)

        def measure():
            out = {}
            for name, w in (("dense_ms", W), ("sparse_2to4_ms", Ws)):
                for _ in range(5):
                    torch.nn.functional.linear(x, w)
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
                for a, b in ev:
                    a.record()
                    torch.nn.functional.linear(x, w)
                    b.record()
                torch.cuda.synchronize()
                ts = [a.elapsed_time(b) for a, b in ev]
                out.update({name: float(np.median(ts)), f"{name}_min": float(np.min(ts)), f"{name}_max": float(np.max(ts))})
            return out

        m = measure_checked(measure, attempts=attempts, pause_s=pause_s, idle=host_load)
        err = float((torch.nn.functional.linear(x, Ws) - torch.nn.functional.linear(x, W)).abs().max())
        rows.append({"out": out_f, "in": in_f, "tokens": tokens, **m, "speedup": m["dense_ms"] / m["sparse_2to4_ms"],
                     "max_abs_diff": err, "device": torch.cuda.get_device_name()})
    return {"message": f"2:4 kernels timed on {torch.cuda.get_device_name()}", "rows": rows}


def real_shape_rows(path: str) -> pd.DataFrame | None:
    """The real-shape benchmark's rows (``bench_speed``, results/speed_real.json) with ``efficiency`` = measured
    speed-up / FLOPs ratio and the dense block's achieved GFLOP/s; None when the benchmark has not been run."""
    import json

    if not os.path.isfile(path):
        return None
    with open(path) as f:
        res = json.load(f)
    df = pd.DataFrame(res["rows"])
    df["efficiency"] = df.speedup / df.flops_speedup
    df["dense_gflops_per_s"] = df.dense_gflop / (df.dense_ms / 1000)
    df.attrs.update({k: res[k] for k in ("image_tokens", "repeats", "threads", "notes", "tiny")})
    return df


def propagate_floor(model_dir: str, packages: int, num_calib: int, sparsity: float = 0.5, repeats: int = 3,
                    seed: int = 0, warmup: int = 1) -> pd.DataFrame:
    """What propagate calibration cannot avoid, timed in one process: per round (the three in turn), OBS-Diff's prune
    with K = 1 (propagate), with ``packages`` packages (propagate), and one calibration sampling pass with no Hessian
    hooks, of which ``blocks_s`` is the time inside the denoiser's blocks (forward hooks around each block).

    Any propagate schedule samples once and then runs the (pruned) blocks over the recorded trajectory at least once
    more, so K = 1's prune time plus ``blocks_s`` is its floor on this machine: ``floor_ratio`` = 1 + blocks_s /
    k1_s, beside the measured ``ratio`` = kK_s / k1_s. ``warmup`` untimed rounds come first."""
    from ..archs import iter_blocks, spec_for
    from ..config import PruneConfig
    from ..driver import prune
    from ..io import load_pipeline
    from ..sampling import collect_stats
    from ..shapes import prompts as world_prompts

    calib_prompts = world_prompts("train", num_calib)

    def prune_s(k: int) -> float:
        rep = prune(load_pipeline(model_dir), PruneConfig(sparsity=sparsity, packages=k, calibration="propagate",
                                                          prompts=calib_prompts, seed=seed, progress=False,
                                                          count_flops=False))
        return rep["timings"]["total_s"]

    def sampling() -> tuple[float, float]:
        pipe = load_pipeline(model_dir)
        den = pipe.transformer
        inside, start, handles = [0.0], [0.0], []

        def enter(m, a):
            start[0] = time.perf_counter()

        def leave(m, a, o):
            inside[0] += time.perf_counter() - start[0]

        for _, block in iter_blocks(den, spec_for(den)):
            handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
        try:
            t = time.perf_counter()
            collect_stats(pipe, [], calib_prompts, seed=seed)
            total = time.perf_counter() - t
        finally:
            for h in handles:
                h.remove()
        return total, inside[0]

    rows = []
    for r in range(warmup + repeats):
        k1, kk = prune_s(1), prune_s(packages)
        total, blocks = sampling()
        if r >= warmup:
            rows.append({"round": r - warmup, "k1_s": k1, "kK_s": kk, "sampling_s": total, "blocks_s": blocks})
    df = pd.DataFrame(rows)
    df["ratio"], df["floor_ratio"] = df.kK_s / df.k1_s, 1 + df.blocks_s / df.k1_s
    return df
