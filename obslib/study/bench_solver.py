"""Solver benchmark at real layer shapes: the float32 OBS solver against its own float64 path.

    python -m obslib.study.bench_solver [--repeats 3] [--out results/solver_bench.csv]

Shapes (out x in) are linear layers of SD3-Medium (1536x1536 attention, 6144x1536 FFN up, 1536x6144 FFN
down), SD3.5-Large (2432x2432, 9728x2432) and Flux (3072x3072, 12288x3072); patterns unstructured 50% and
2:4. Each (shape, pattern, dtype) runs in its own process: W and a random SPD Hessian are built, the
resident memory is read, the solve runs ``repeats`` times (median wall time), and the peak extra memory
is the process's peak resident size minus that baseline (what the solve needs beyond W and H, including
about 15 MiB that the BLAS / OpenMP runtime keeps whatever the size; glibc's mmap threshold is fixed so
that freed tensors leave the resident set). The
squared error the solve reports is compared between the two precisions. Timings are from this machine
(its thread count is recorded); run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

SHAPES = {"sd3-medium": [(1536, 1536), (6144, 1536), (1536, 6144)],
          "sd3.5-large": [(2432, 2432), (9728, 2432)],
          "flux": [(3072, 3072), (12288, 3072)]}
PATTERNS = ("unstructured", "2:4")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(rows: int, cols: int, pattern: str, dtype: str, repeats: int, seed: int = 0) -> dict:
    """Run in a fresh process: time and peak extra memory of one solver configuration."""
    import gc
    import time

    import torch

    from ..obs import obs_prune

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    G = torch.randn(cols, 96, generator=g)
    H = G @ G.T  # correlated inputs, float32 like the calibration's; made SPD without a second n x n buffer
    H.diagonal().add_(0.1 * cols)
    del G
    gc.collect()
    base = _rss_bytes()
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    dt = torch.float64 if dtype == "float64" else torch.float32
    times, err = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        W_hat, mask, err = obs_prune(W, H, 0.5, n, m, dtype=dt, return_error=True)
        times.append(time.perf_counter() - t)
        del W_hat, mask
        gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    return {"rows": rows, "cols": cols, "pattern": pattern, "dtype": dtype, "median_s": times[len(times) // 2],
            "min_s": times[0], "max_s": times[-1], "repeats": repeats, "peak_extra_mib": (peak - base) / 2**20,
            "w_plus_h_mib": (W.numel() + H.numel()) * 4 / 2**20, "sq_error": err, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m obslib.study.bench_solver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/solver_bench.csv")
    p.add_argument("--figure", default="figures/solver_bench.png")
    p.add_argument("--one", nargs=4, metavar=("ROWS", "COLS", "PATTERN", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(int(a.one[0]), int(a.one[1]), a.one[2], a.one[3], a.repeats)))
        return 0
    import pandas as pd
    from tqdm.auto import tqdm

    jobs = [(model, r, c, pat, dt) for model, shapes in SHAPES.items() for r, c in shapes for pat in PATTERNS
            for dt in ("float32", "float64")]
    rows = []
    for model, r, c, pat, dt in tqdm(jobs, desc="solver benchmark"):
        # a fixed mmap threshold: freed tensors go back to the OS, so the peak resident size tracks live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        res = subprocess.run([sys.executable, "-m", "obslib.study.bench_solver", "--repeats", str(a.repeats), "--one",
                              str(r), str(c), pat, dt], capture_output=True, text=True, check=True, env=env)
        rows.append({"model": model, **json.loads(res.stdout.strip().splitlines()[-1])})
    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=["model", "rows", "cols", "pattern"], columns="dtype",
                          values=["median_s", "peak_extra_mib", "sq_error"]).reset_index()
    wide.columns = ["_".join(c).strip("_") for c in wide.columns]
    wide["speedup_f32"] = wide.median_s_float64 / wide.median_s_float32
    wide["w_plus_h_mib"] = (wide.rows * wide.cols + wide.cols**2) * 4 / 2**20
    wide["peak_extra_f32_over_w_plus_h"] = wide.peak_extra_mib_float32 / wide.w_plus_h_mib
    wide["rel_error_gap"] = (wide.sq_error_float32 - wide.sq_error_float64).abs() / wide.sq_error_float64
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    df.to_csv(a.out.replace(".csv", "_runs.csv"), index=False)
    wide.to_csv(a.out, index=False)
    _figure(wide, a.figure)
    print(wide.round(3).to_string(index=False))
    return 0


def _figure(wide, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r}x{c}\n{p}" for r, c, p in zip(wide.rows, wide.cols, wide.pattern)]
    x = range(len(wide))
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    w = 0.4
    ax[0].bar([i - w / 2 for i in x], wide.median_s_float32, w, label="float32 (default)")
    ax[0].bar([i + w / 2 for i in x], wide.median_s_float64, w, label="float64")
    ax[0].set_ylabel("solve time, median (s)")
    ax[1].bar([i - w / 2 for i in x], wide.peak_extra_mib_float32, w, label="float32 (default)")
    ax[1].bar([i + w / 2 for i in x], wide.peak_extra_mib_float64, w, label="float64")
    ax[1].plot(list(x), 1.5 * wide.w_plus_h_mib, "k_", markersize=14, label="1.5 x (W + H)")
    ax[1].set_ylabel("peak extra memory (MiB)")
    for a_ in ax:
        a_.set_xticks(list(x))
        a_.set_xticklabels(labels, fontsize=6, rotation=60)
        a_.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    sys.exit(main())
