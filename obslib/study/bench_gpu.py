"""GPU benchmark, ready for the first GPU a session is lent (a benchmark, not a test).

    python -m obslib.study.bench_gpu              # on a CUDA machine: ~5 min on one H100, writes results/gpu.md
    python -m obslib.study.bench_gpu --tiny       # CPU, tiny shapes: checks the code path (make test runs it)

Three measurements, each at real SD3-Medium / Flux.1 shapes (random weights from the real block configurations,
``bench_scale.BLOCKS``; 1024 x 1024 images' 4096 image tokens, the CFG-doubled batch of 2):

1. **A real-size prune.** ``--blocks`` SD3-Medium joint blocks with half-precision weights (bfloat16), run one after
   another for ``--steps`` denoiser calls with obslib's calibration hooks (float32 Hessians), then every targeted
   layer solved by OBS (50% unstructured, float32): calibration seconds per call, solve seconds per block, peak GPU
   memory. The CPU projection of ``results/scale.md`` is what this replaces.
2. **2:4 semi-structured linears.** Dense ``F.linear`` against ``torch.sparse.to_sparse_semi_structured`` weights
   (float16, a 2:4 mask) at the SD3-Medium and Flux layer shapes on the 2 x 4429 / 2 x 4608 tokens: the median of
   per-pair time ratios (dense / sparse), called alternately. CUDA only (the kernels are cuSPARSELt / CUTLASS).
3. **Structured blocks.** A dense SD3-Medium joint block and a Flux single-stream block against copies with 10, 20
   and 30% of their heads and FFN neurons physically removed (``obslib.surgery``: the shapes structured OBS-Diff
   produces at a uniform allocation), in bfloat16 on CUDA (float32 on CPU): median per-pair speed-up, beside the
   FLOPs ratio.

Writes ``--out`` (markdown) and ``--json``; the device, torch version and dtypes go in both.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np

TINY_BLOCKS = {  # --tiny: the same code on shapes a CPU runs in seconds
    "sd3-medium-joint": dict(kind="joint", dim=64, heads=4, head_dim=16, text_tokens=8),
    "flux-single": dict(kind="single", dim=64, heads=4, head_dim=16, text_tokens=8),
}
SHARES = (0.1, 0.2, 0.3)
LINEAR_SHAPES = {  # (out, in) of the targeted linears: SD3-Medium (dim 1536), Flux.1 (dim 3072)
    "SD3-Medium": [(1536, 1536), (6144, 1536), (1536, 6144)],
    "Flux.1": [(3072, 3072), (12288, 3072), (3072, 12288)],
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _paired(fn, ref, device, repeats: int) -> dict:
    """``timing.paired_times`` with the device synchronised around every call."""
    from .timing import paired_times

    def wrap(f):
        def call():
            f()
            _sync(device)
        return call

    return paired_times(wrap(fn), wrap(ref), repeats=repeats, warmup=2)


def _blocks(tiny: bool) -> dict:
    from . import bench_scale

    return TINY_BLOCKS if tiny else bench_scale.BLOCKS


def make_block(name: str, image_tokens: int, tiny: bool, device, dtype, batch: int = 2):
    """(holder module whose one block is named as in a denoiser, block, layers, inputs()) of a real-size block."""
    import torch

    from . import bench_scale

    saved = bench_scale.BLOCKS
    bench_scale.BLOCKS = _blocks(tiny)
    try:
        block, layers, inputs = bench_scale._block(name, image_tokens, batch)
    finally:
        bench_scale.BLOCKS = saved
    block = block.to(device, dtype)
    where = "transformer_blocks" if _blocks(tiny)[name]["kind"] == "joint" else "single_transformer_blocks"
    holder = torch.nn.Module()
    setattr(holder, where, torch.nn.ModuleList([block]))

    def on_device():
        return {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                (tuple(t.to(device, dtype) for t in v) if isinstance(v, tuple) else v) for k, v in inputs().items()}

    return holder, block, layers, on_device


def prune_time(n_blocks: int, steps: int, image_tokens: int, tiny: bool, device, dtype) -> dict:
    """Part 1: ``n_blocks`` SD3-Medium joint blocks calibrated for ``steps`` calls and solved (module docstring)."""
    import torch

    from ..hessian import Calibration, weight_matrix
    from ..obs import obs_prune

    made = [make_block("sd3-medium-joint", image_tokens, tiny, device, dtype) for _ in range(n_blocks)]
    layers = {f"{i}.{n}": m for i, (_, _, ls, _) in enumerate(made) for n, m in ls.items()}
    inputs = made[0][3]
    holder = torch.nn.ModuleList([b for _, b, _, _ in made])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calib = Calibration(holder[0], layers, [1.0] * steps)  # the first block's calls count the steps
    _sync(device)
    t = time.perf_counter()
    with calib, torch.no_grad():
        calib.begin_run()
        for _ in range(steps):
            x = inputs()
            for b in holder:
                ctx, img = b(**x)
                x = {**x, "hidden_states": img, "encoder_hidden_states": ctx}
        calib.end_run()
    _sync(device)
    cal_s = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    for n, m in layers.items():
        W = weight_matrix(m).float()
        w_hat, _ = obs_prune(W, calib.stats[n].H.to(device), 0.5)
        m.weight.data.copy_(w_hat.to(m.weight.dtype).reshape(m.weight.shape))
    _sync(device)
    solve_s = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values()) / sum(m.weight.numel() for m in layers.values())
    return {"blocks": n_blocks, "steps": steps, "image_tokens": image_tokens, "layers": len(layers), "sparsity": zeros,
            "calibration_s_per_call": cal_s, "solve_s_per_block": solve_s / n_blocks, "peak_gib": peak,
            "weights_dtype": str(dtype).replace("torch.", ""), "hessian_dtype": "float32"}


def semi_structured(tokens: dict, repeats: int, device) -> list[dict]:
    """Part 2: dense against 2:4 semi-structured linears (module docstring); empty off CUDA."""
    import torch
    import torch.nn.functional as F

    if device.type != "cuda":
        return []
    from torch.sparse import to_sparse_semi_structured

    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for model, shapes in LINEAR_SHAPES.items():
        x = torch.randn(tokens[model], shapes[0][1], generator=g).to(device, torch.float16)
        for out_f, in_f in shapes:
            if x.shape[1] != in_f:
                x = torch.randn(tokens[model], in_f, generator=g).to(device, torch.float16)
            W = torch.randn(out_f, in_f, generator=g).to(device, torch.float16)
            keep = W.abs().view(out_f, -1, 4).topk(2, dim=-1).indices
            mask = torch.zeros_like(W.view(out_f, -1, 4), dtype=torch.bool).scatter_(-1, keep, True).view(out_f, in_f)
            Wd = W * mask
            Ws = to_sparse_semi_structured(Wd)
            r = _paired(lambda: F.linear(x, Ws), lambda: F.linear(x, Wd), device, repeats)
            rows.append({"model": model, "shape": f"{out_f}×{in_f}", "tokens": tokens[model],
                         "dense_ms": 1000 * r["median_s"] * r["ratio"], "sparse_ms": 1000 * r["median_s"],
                         "speedup": r["ratio"], "speedup_lo": r["ratio_lo"], "speedup_hi": r["ratio_hi"]})
    return rows


def _remove(holder, share: float) -> None:
    """Remove ``share`` of every head and neuron group of the holder's block (the last ones: for timing, which ones
    does not matter), physically."""
    from ..archs import FLUX, SD3
    from ..packages import structured_units
    from ..surgery import NoUndo, head_layout, neuron_layout, remove_heads, remove_neurons

    spec = SD3 if hasattr(holder, "transformer_blocks") else FLUX
    for u in structured_units(holder, spec, [0]):
        if u.kind == "heads":
            heads = head_layout(holder, u)[0]
            k = int(round(share * heads))
            remove_heads(holder, u, list(range(heads - k, heads)), NoUndo())
        else:
            width = neuron_layout(holder, u)[0]
            k = int(round(share * width))
            remove_neurons(holder, u, list(range(width - k, width)), NoUndo())


def structured(image_tokens: int, repeats: int, tiny: bool, device, dtype, shares=SHARES) -> list[dict]:
    """Part 3: dense blocks against blocks with ``shares`` of their heads and neurons removed (module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for name in ("sd3-medium-joint", "flux-single"):
        holder, block, _, inputs = make_block(name, image_tokens, tiny, device, dtype)
        x = inputs()

        def flops(b):
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                b(**x)
            return fc.get_total_flops()

        dense_flops = flops(block)
        for share in shares:
            h = copy.deepcopy(holder)
            _remove(h, share)
            pruned = next(iter(h.children()))[0]
            with torch.no_grad():
                r = _paired(lambda: pruned(**x), lambda: block(**x), device, repeats)
            rows.append({"block": name, "share_removed": share,
                         "params_ratio": sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in block.parameters()),
                         "flops_ratio_inv": dense_flops / flops(pruned), "pruned_ms": 1000 * r["median_s"],
                         "speedup": r["ratio"], "speedup_lo": r["ratio_lo"], "speedup_hi": r["ratio_hi"]})
    return rows


def write_md(res: dict, path: str) -> None:
    from ..owned import write_text

    p = res["prune"]
    lines = [f"# GPU benchmark ({res['device']}, torch {res['torch']}{', tiny shapes' if res['tiny'] else ''})", "",
             "Generated by `python -m obslib.study.bench_gpu`. Random weights from the real block configurations; "
             "speed-ups are medians of per-pair ratios (dense / pruned, called alternately), with their range.", "",
             "## 1 · A real-size prune (SD3-Medium joint blocks)", "",
             f"{p['blocks']} blocks, {p['steps']} calls of {p['image_tokens']} image tokens (CFG batch 2), weights in "
             f"{p['weights_dtype']}, Hessians in {p['hessian_dtype']}, 50% unstructured: calibration "
             f"{p['calibration_s_per_call']:.3f} s per call, solve {p['solve_s_per_block']:.2f} s per block "
             f"({p['layers']} layers, {p['sparsity']:.1%} of their weights zero), peak GPU memory "
             f"{'not measured (CPU)' if p['peak_gib'] != p['peak_gib'] else format(p['peak_gib'], '.2f') + ' GiB'}.", "",
             "## 2 · 2:4 semi-structured linears (float16)", ""]
    if res["semi_structured"]:
        lines += ["| model | shape (out×in) | tokens | dense ms | 2:4 ms | speed-up [range] |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['shape']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
                  f"{r['speedup']:.2f}× [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}] |" for r in res["semi_structured"]]
    else:
        lines.append("Not run: 2:4 semi-structured kernels need CUDA.")
    lines += ["", "## 3 · Structured blocks (heads and FFN neurons removed)", "",
              "| block | removed | params kept | FLOPs ratio (dense/pruned) | pruned ms | speed-up [range] |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['share_removed']:.0%} | {r['params_ratio']:.3f} | {r['flops_ratio_inv']:.3f} | "
              f"{r['pruned_ms']:.3f} | {r['speedup']:.2f}× [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}] |"
              for r in res["structured"]]
    write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m obslib.study.bench_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the code path in seconds)")
    p.add_argument("--blocks", type=int, default=4, help="SD3-Medium joint blocks pruned in part 1")
    p.add_argument("--steps", type=int, default=8, help="calibration calls in part 1")
    p.add_argument("--repeats", type=int, default=21, help="timed pairs per comparison")
    p.add_argument("--out", default="results/gpu.md")
    p.add_argument("--json", default="results/gpu.json")
    a = p.parse_args(argv)
    import torch

    from ..errors import UsageError
    from ..owned import write_json

    for flag, v in (("--blocks", a.blocks), ("--steps", a.steps), ("--repeats", a.repeats)):
        if v < 1:
            print(f"bench_gpu: error: {flag} {v} must be a positive integer", file=sys.stderr)
            return 2
    cuda = torch.cuda.is_available() and not a.tiny
    if not cuda and not a.tiny:
        print("bench_gpu: error: no CUDA device; allowed without one: --tiny (CPU, tiny shapes)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = 64 if a.tiny else 4096
    text = {m: 2 * (tokens + _blocks(a.tiny)[b]["text_tokens"]) for m, b in
            (("SD3-Medium", "sd3-medium-joint"), ("Flux.1", "flux-single"))}
    try:
        t0 = time.perf_counter()
        res = {"device": torch.cuda.get_device_name(device) if cuda else "CPU", "torch": torch.__version__,
               "tiny": a.tiny, "prune": prune_time(a.blocks, a.steps, tokens, a.tiny, device, dtype),
               "semi_structured": semi_structured(text, a.repeats, device),
               "structured": structured(tokens, a.repeats, a.tiny, device, dtype)}
        res["seconds"] = time.perf_counter() - t0
    except UsageError as e:
        print(f"bench_gpu: error: {e}", file=sys.stderr)
        return 2
    write_json(a.json, json.loads(json.dumps(res, default=float)))
    write_md(res, a.out)
    print(open(a.out).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
