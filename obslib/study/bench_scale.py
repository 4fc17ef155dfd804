"""Real-size benchmark and projection (a benchmark, not a test).

    python -m obslib.study.bench_scale [--steps 2] [--image-tokens 4096]

One SD3-Medium ``JointTransformerBlock`` (dim 1536, 24 heads x 64, FFN 6144) and one Flux
``FluxSingleTransformerBlock`` (dim 3072, 24 heads x 128, MLP 12288), random-initialised from their real
configurations, are calibrated on 1024x1024-sized token counts (4096 image tokens; 333 text tokens for SD3,
512 for Flux; the CFG-doubled batch of 2) for a few denoiser calls with the package's hooks, then every
targeted layer is solved (OBS, 50% unstructured, float32). Each block runs in its own process with glibc's
mmap threshold fixed, so the peak resident size tracks live memory; measured: the Hessian memory the
driver prints against the peak, calibration time per call, solve time per layer, and the FLOPs of each part
(torch's counter for the forward; 2 n_tokens in^2 per hooked layer for the Hessians; in^3 + 2 out in^2 per
solve). ``results/scale.json`` holds the measurements, ``results/scale.md`` the projection to whole models.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BLOCKS = {
    "sd3-medium-joint": dict(kind="joint", dim=1536, heads=24, head_dim=64, text_tokens=333),
    "flux-single": dict(kind="single", dim=3072, heads=24, head_dim=128, text_tokens=512),
}
# whole models: (blocks of each kind, the benchmarked block that stands for them)
MODELS = {
    "SD3-Medium": [(24, "sd3-medium-joint", 1.0)],
    "SD3.5-Large": [(38, "sd3-medium-joint", (2432 / 1536) ** 2)],  # dim 2432: linear layers scale ~dim^2
    "Flux.1": [(38, "flux-single", 1.0), (19, "flux-single", 1.0)],  # 19 double-stream blocks ~ one single-stream block each
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _block(name: str, image_tokens: int, batch: int = 2):
    """(block, its targeted layers by name, a function drawing one call's inputs) of a real-size block; ``batch``:
    the denoiser call's batch (2: a CFG-doubled prompt)."""
    import torch

    from ..archs import FLUX, SD3, block_units

    torch.manual_seed(0)
    c = BLOCKS[name]
    dim, b = c["dim"], batch
    n_txt = c["text_tokens"]
    if c["kind"] == "joint":
        from diffusers.models.attention import JointTransformerBlock

        block = JointTransformerBlock(dim, c["heads"], c["head_dim"]).eval()
        spec = SD3

        def inputs():
            return dict(hidden_states=torch.randn(b, image_tokens, dim), encoder_hidden_states=torch.randn(b, n_txt, dim),
                        temb=torch.randn(b, dim))
    else:
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock

        block = FluxSingleTransformerBlock(dim, c["heads"], c["head_dim"]).eval()
        spec = FLUX
        ids = torch.cat([torch.zeros(n_txt, 3), torch.randint(0, 64, (image_tokens, 3)).float()])
        hd = c["head_dim"]  # Flux.1's rotary axes (16, 56, 56); smaller heads (bench_gpu --tiny) split alike
        axes = [16, 56, 56] if hd == 128 else [hd - 2 * (3 * hd // 8), 3 * hd // 8, 3 * hd // 8]
        rope = FluxPosEmbed(theta=10000, axes_dim=axes)(ids)

        def inputs():
            return dict(hidden_states=torch.randn(b, image_tokens, dim), encoder_hidden_states=torch.randn(b, n_txt, dim),
                        temb=torch.randn(b, dim), image_rotary_emb=rope)
    where = "transformer_blocks.0" if c["kind"] == "joint" else "single_transformer_blocks.0"  # its units' row
    names = [n[len(where) + 1:] for unit in block_units(where, block, spec) for n in unit]
    return block, {n: block.get_submodule(n) for n in names}, inputs


def run_block(name: str, steps: int, image_tokens: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..hessian import Calibration, weight_matrix
    from ..obs import obs_prune

    block, layers, inputs = _block(name, image_tokens)
    c = BLOCKS[name]
    hess_mib = sum(weight_matrix(m).shape[1] ** 2 * 4 for m in layers.values()) / 2**20
    x = inputs()
    tokens = {}

    def count(n):
        def hook(mod, inp, out):
            tokens[n] = inp[0].reshape(-1, inp[0].shape[-1]).shape[0]
        return hook

    hs = [m.register_forward_hook(count(n)) for n, m in layers.items()]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        block(**x)
    for h in hs:
        h.remove()
    fwd_flops = fc.get_total_flops()
    t = time.perf_counter()
    with torch.no_grad():
        block(**x)
    t_fwd = time.perf_counter() - t
    hess_flops = sum(2 * tokens[n] * weight_matrix(m).shape[1] ** 2 for n, m in layers.items())
    del x
    base = _rss()
    calib = Calibration(block, layers, [1.0] * steps)
    t = time.perf_counter()
    with calib, torch.no_grad():
        calib.begin_run()
        for _ in range(steps):
            block(**inputs())
        calib.end_run()
    t_cal = (time.perf_counter() - t) / steps
    peak_cal = (_peak() - base) / 2**20
    solve = {}
    for n, m in layers.items():
        W = weight_matrix(m)
        t = time.perf_counter()
        obs_prune(W, calib.stats[n].H, 0.5)
        solve[n] = {"shape": list(W.shape), "seconds": time.perf_counter() - t,
                    "flops": W.shape[1] ** 3 + 2 * W.shape[0] * W.shape[1] ** 2}
    return {"block": name, **c, "image_tokens": image_tokens, "batch": 2, "steps": steps, "threads": torch.get_num_threads(),
            "layers": len(layers), "hessian_mib_printed": hess_mib, "calibration_peak_extra_mib": peak_cal,
            "forward_s": t_fwd, "forward_flops": fwd_flops, "calibration_s_per_call": t_cal,
            "hessian_flops_per_call": hess_flops, "solve": solve,
            "solve_s": sum(v["seconds"] for v in solve.values()), "solve_flops": sum(v["flops"] for v in solve.values()),
            "params": sum(p.numel() for p in block.parameters())}


def _hess_flops(stats: dict, steps: int) -> int:
    """FLOPs per call of the X^T X products: 2 rows in^2 for each distinct accumulator."""
    return sum(2 * (st.tokens // steps) * st.xtx.shape[0] ** 2 for st in {id(v): v for v in stats.values()}.values())


def token_study(name: str, steps: int, image_tokens: int, grid: list[int], solve: bool = True) -> dict:
    """``--calib-tokens`` at real size, on one block: the accumulation with each N of ``grid`` (and all tokens,
    with and without the shared accumulator) over the same ``steps`` calls, timed; then each layer's Hessian
    error against all tokens, and the OBS 50% solve on each: mask agreement with the all-token solve and the
    layer error both give on the all-token Hessian (the real objective)."""
    import torch

    from ..hessian import Calibration, unique_mb, weight_matrix
    from ..obs import obs_prune, reconstruction_error

    block, layers, inputs = _block(name, image_tokens)
    xs = [inputs() for _ in range(steps)]

    def accumulate(tokens, share=True):
        calib = Calibration(block, layers, [1.0] * steps, tokens=tokens, share_inputs=share)
        t = time.perf_counter()
        with calib, torch.no_grad():
            calib.begin_run()
            for x in xs:
                block(**x)
            calib.end_run()
        return calib, (time.perf_counter() - t) / steps

    with torch.no_grad():
        block(**xs[0])  # warm-up
        t = time.perf_counter()
        for x in xs:
            block(**x)
        t_fwd = (time.perf_counter() - t) / steps
    _, t_noshare = accumulate(None, share=False)
    full, t_full = accumulate(None)
    uniq = {id(st): st for st in full.stats.values()}
    ref = {}
    if solve:
        for n, m in layers.items():
            W = weight_matrix(m)
            W_hat, mask = obs_prune(W, full.stats[n].H, 0.5)
            ref[n] = (mask, reconstruction_error(W, W_hat, full.stats[n].H))
    rows = []
    for N in grid:
        calib, t_n = accumulate(N)
        row = {"block": name, "tokens": N, "calibration_s_per_call": t_n, "accumulation_s_per_call": t_n - t_fwd,
               "hessian_mib": unique_mb(calib.stats), "hessian_flops_per_call": _hess_flops(calib.stats, steps),
               "rows_per_call": {n: calib.stats[n].tokens // steps for n in layers}}
        per = {}
        for n, m in layers.items():
            Hf, Hn = full.stats[n].H, calib.stats[n].H
            e = {"hessian_rel_error": float((Hn - Hf).norm() / Hf.norm())}
            if solve:
                W = weight_matrix(m)
                W_hat, mask = obs_prune(W, Hn, 0.5)
                e["mask_agreement"] = float((mask == ref[n][0]).float().mean())
                e["layer_error"] = reconstruction_error(W, W_hat, Hf)
                e["layer_error_full"] = ref[n][1]
            per[n] = e
        row["layers"] = per
        rows.append(row)
    return {"block": name, "image_tokens": image_tokens, "steps": steps, "threads": torch.get_num_threads(),
            "forward_s_per_call": t_fwd, "full_s_per_call": t_full, "full_unshared_s_per_call": t_noshare,
            "accumulators": len(uniq), "layers": len(layers), "hessian_mib_unshared":
            sum(weight_matrix(m).shape[1] ** 2 * 4 for m in layers.values()) / 2**20,
            "hessian_mib_shared": unique_mb(full.stats), "hessian_flops_shared": _hess_flops(full.stats, steps),
            "hessian_flops_unshared": sum(2 * (st.tokens // steps) * st.xtx.shape[0] ** 2 for st in
                                          [full.stats[n] for n in layers]),
            "full_rows_per_call": {n: full.stats[n].tokens // steps for n in layers}, "grid": rows}


def projection(meas: dict, prompts: int = 100, steps: int = 25, packages: int = 1,
               gpu_tflops_bf16: float = 400.0, gpu_tflops_fp32: float = 40.0, gpu_solve_tflops: float = 20.0,
               gpus=(1, 8), hess_scale: dict | None = None, setting: str = "all tokens") -> list[dict]:
    """Whole-model projection from per-block FLOPs and the stated GPU throughputs (see results/scale.md);
    ``hess_scale``: per block, the Hessian FLOPs of a calibration setting over those of all tokens, one
    accumulator per layer (measured by ``token_study``)."""
    rows = []
    for model, parts in MODELS.items():
        fwd = hess = solve = hmib = 0.0
        for count, block, scale in parts:
            m = meas[block]
            fwd += count * m["forward_flops"] * scale
            hess += count * m["hessian_flops_per_call"] * scale * (hess_scale or {}).get(block, 1.0)
            solve += count * m["solve_flops"] * scale ** 1.5
            hmib += count * m["hessian_mib_printed"] * scale
        calls = prompts * steps  # CFG-doubled batch of 2 per call, as measured
        for n in gpus:
            t_sample = packages * calls * fwd / (gpu_tflops_bf16 * 1e12) / n
            t_hess = calls * hess / (gpu_tflops_fp32 * 1e12) / n
            t_solve = solve / (gpu_solve_tflops * 1e12) / n
            comm = hmib / packages * 2 * (n - 1) / n if n > 1 else 0.0  # ring all-reduce, MiB per GPU per package
            rows.append({"model": model, "setting": setting, "gpus": n, "packages": packages, "sampling_s": t_sample,
                         "hessian_s": t_hess, "solve_s": t_solve, "total_s": t_sample + t_hess + t_solve,
                         "hessians_gib_per_package_all_layers": hmib / packages / 1024,
                         "allreduce_mib_per_gpu_per_package": comm})
    return rows


MAX_ERROR_RATIO = 1.02  # recommend the fewest tokens whose worst layer error is within 2% of all tokens'


def token_rows(study: dict) -> list[dict]:
    """One row per block and N: the Hessian error, mask agreement and layer error against all tokens, and the time."""
    import numpy as np

    rows = []
    for name, st in study.items():
        base = st["full_unshared_s_per_call"] - st["forward_s_per_call"]
        rows.append({"block": name, "tokens": "all, one accumulator per layer", "hessian_rel_error_median": 0.0,
                     "hessian_rel_error_max": 0.0, "mask_agreement_mean": 1.0, "mask_agreement_min": 1.0,
                     "layer_error_ratio_median": 1.0, "layer_error_ratio_max": 1.0,
                     "accumulation_s_per_call": base, "accumulation_speedup": 1.0, "hessian_flops_ratio": 1.0})
        rows.append({"block": name, "tokens": "all, shared accumulators", "hessian_rel_error_median": 0.0,
                     "hessian_rel_error_max": 0.0, "mask_agreement_mean": 1.0, "mask_agreement_min": 1.0,
                     "layer_error_ratio_median": 1.0, "layer_error_ratio_max": 1.0,
                     "accumulation_s_per_call": st["full_s_per_call"] - st["forward_s_per_call"],
                     "accumulation_speedup": base / max(st["full_s_per_call"] - st["forward_s_per_call"], 1e-9),
                     "hessian_flops_ratio": st["hessian_flops_shared"] / st["hessian_flops_unshared"]})
        for r in st["grid"]:
            he = [v["hessian_rel_error"] for v in r["layers"].values()]
            ma = [v.get("mask_agreement", np.nan) for v in r["layers"].values()]
            ratio = [v["layer_error"] / v["layer_error_full"] if v.get("layer_error_full") else np.nan
                     for v in r["layers"].values()]
            rows.append({"block": name, "tokens": r["tokens"], "hessian_rel_error_median": float(np.median(he)),
                         "hessian_rel_error_max": float(np.max(he)), "mask_agreement_mean": float(np.mean(ma)),
                         "mask_agreement_min": float(np.min(ma)), "layer_error_ratio_median": float(np.median(ratio)),
                         "layer_error_ratio_max": float(np.max(ratio)),
                         "accumulation_s_per_call": r["accumulation_s_per_call"],
                         "accumulation_speedup": base / max(r["accumulation_s_per_call"], 1e-9),
                         "hessian_flops_ratio": r["hessian_flops_per_call"] / st["hessian_flops_unshared"]})
    return rows


def recommend(rows: list[dict]) -> int | None:
    """The fewest tokens per image and step whose worst layer error stays within ``MAX_ERROR_RATIO`` of all
    tokens' in every block measured; None when no N of the grid does."""
    ns = sorted({r["tokens"] for r in rows if isinstance(r["tokens"], int)})
    for n in ns:
        rs = [r for r in rows if r["tokens"] == n]
        if rs and all(r["layer_error_ratio_max"] <= MAX_ERROR_RATIO for r in rs):
            return n
    return None


def _at_quarter_tokens(rows: list[dict], model: str) -> float:
    r = next(r for r in rows if r["model"] == model and r["gpus"] == 1)
    return (r["sampling_s"] + r["hessian_s"]) / 4 + r["solve_s"]


def _projection_table(rows: list[dict]) -> list[str]:
    out = ["| model | setting | GPUs | sampling (s) | Hessian accumulation (s) | solves (s) | total (s) | Hessians of all "
           "layers (GiB) | all-reduce per GPU per package (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r.get('setting', 'all tokens')} | {r['gpus']} | {r['sampling_s']:.0f} | "
                   f"{r['hessian_s']:.0f} | {r['solve_s']:.0f} | {r['total_s']:.0f} | "
                   f"{r['hessians_gib_per_package_all_layers']:.1f} | {r['allreduce_mib_per_gpu_per_package']:.0f} |")
    return out


def write_md(meas: dict, rows: list[dict], path: str, study: dict | None = None) -> None:
    """results/scale.md: the measured blocks, the token study (when run) and the projections, in words from the
    numbers."""
    lines = ["# Scale: real-size blocks measured on this machine, projected to whole models", "",
             "Measured by `python -m obslib.study.bench_scale` (one process per block, "
             f"{next(iter(meas.values()))['threads']} CPU threads, float32, "
             f"{next(iter(meas.values()))['image_tokens']} image tokens = a 1024x1024 image, CFG batch 2).", "",
             "| block | layers | Hessians printed (MiB) | measured peak during calibration (MiB) | forward (s) | calibration per call (s) | solve, all layers (s) | forward GFLOP | Hessian GFLOP / call | solve GFLOP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in meas.values():
        lines.append(f"| {m['block']} | {m['layers']} | {m['hessian_mib_printed']:.0f} | {m['calibration_peak_extra_mib']:.0f} | "
                     f"{m['forward_s']:.2f} | {m['calibration_s_per_call']:.2f} | {m['solve_s']:.1f} | "
                     f"{m['forward_flops'] / 1e9:.0f} | {m['hessian_flops_per_call'] / 1e9:.0f} | {m['solve_flops'] / 1e9:.0f} |")
    lines += ["", "Slowest solves: " + "; ".join(
        f"{m['block']} {n} {v['shape'][0]}x{v['shape'][1]} {v['seconds']:.1f} s"
        for m in meas.values() for n, v in sorted(m["solve"].items(), key=lambda kv: -kv[1]["seconds"])[:2]), ""]
    rec = None
    if study:
        trows = token_rows(study)
        rec = recommend(trows)
        any_st = next(iter(study.values()))
        lines += ["## Fewer tokens in the Hessians (`--calib-tokens N`) and one accumulator per input", "",
                  f"`python -m obslib.study.bench_scale --tokens ...`: the same {any_st['steps']} calls of each block "
                  f"(random inputs, {any_st['image_tokens']} image tokens per image, CFG batch 2) accumulated with all "
                  "tokens and with a seeded random subset of N tokens per image and call (text streams have fewer "
                  "tokens than most N and stay whole); each layer then solved by OBS at 50% on each Hessian. "
                  "Errors are against all tokens: the Hessian's relative Frobenius error, the share of the 50% mask "
                  "that agrees, and the layer error both solutions give on the all-token Hessian (the objective the "
                  "solver is meant to minimise) as a ratio (1 = as good as all tokens). Accumulation time = "
                  "calibration time per call minus the block's forward.", "",
                  "| block | tokens per image | Hessian error (median / max) | mask agreement (mean / min) | layer error "
                  "ratio (median / max) | accumulation per call (s) | speed-up of the accumulation | Hessian FLOPs |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in trows:
            lines.append(f"| {r['block']} | {r['tokens']} | {r['hessian_rel_error_median']:.3f} / "
                         f"{r['hessian_rel_error_max']:.3f} | {r['mask_agreement_mean']:.3f} / {r['mask_agreement_min']:.3f} "
                         f"| {r['layer_error_ratio_median']:.4f} / {r['layer_error_ratio_max']:.4f} | "
                         f"{r['accumulation_s_per_call']:.2f} | {r['accumulation_speedup']:.2f}x | "
                         f"{r['hessian_flops_ratio']:.1%} |")
        shared = [r for r in trows if r["tokens"] == "all, shared accumulators"]
        lines += ["", "Reading (generated from the table):",
                  "- one accumulator for the layers that read one tensor: " + "; ".join(
                      f"{r['block']} {r['hessian_flops_ratio']:.0%} of the Hessian FLOPs, accumulation "
                      f"{r['accumulation_speedup']:.2f}x as fast" for r in shared) + " (identical Hessians: "
                  "tests/test_hessian.py).",
                  f"- recommended: `--calib-tokens {rec}` — the fewest tokens of the grid whose worst layer error stays "
                  f"within {MAX_ERROR_RATIO - 1:.0%} of all tokens' in every block" if rec else
                  f"- no N of the grid keeps every layer's error within {MAX_ERROR_RATIO - 1:.0%} of all tokens': "
                  "keep all tokens",
                  "- confounder: the inputs are random (isotropic), not a real model's activations, whose second "
                  "moments are dominated by a few directions and are estimated from fewer tokens; and here the "
                  f"Hessians average {any_st['steps']} calls, where a real calibration averages 100 prompts x 25 "
                  "steps, so a token subset's error is smaller there. Check on your model with `obslib evaluate`.", ""]
    lines += ["## Projection (K = 1, the paper's calibration: 100 prompts x 25 steps, CFG batch 2)", ""]
    lines += _projection_table(rows)
    lines += ["", "Assumptions (stated, not measured here; no GPU was available to this run):",
              "- sampling at 400 TFLOP/s sustained (bf16 on an H100: ~40% of the dense peak); Hessian accumulation "
              "X^T X in float32 at 40 TFLOP/s; the float32 solves at 20 TFLOP/s effective (panel updates are narrow);",
              "- every block of a model costs what the measured block costs (SD3.5-Large's dim-2432 blocks scaled by "
              "(2432/1536)^2 for the forward and the Hessians, ^3 for the solves; Flux's 19 double-stream blocks counted "
              "as one single-stream block each); embeddings, the VAE and the text encoders are left out;",
              "- a setting with fewer tokens or shared accumulators scales the Hessian FLOPs of every block by the "
              "ratio measured for its kind of block in the token study above;",
              "- K packages multiply only the sampling (resample mode re-runs sampling per package); with --calibration "
              "propagate each extra package costs a replay of its own blocks instead of a whole sampling pass (notebook 05);",
              "- N GPUs shard the prompts (sampling and accumulation / N) and the layer solves (/ N); the all-reduce is a "
              "ring over the package's Hessian sums (2 (N-1)/N of their size per GPU).",
              "- Sanity check against the paper: SD3-Medium at K = 1 took 572 s on one GPU with 512x512 calibration "
              "(1024 image tokens, a quarter of the tokens here), K = 20 2,595 s. Scaling the token-linear terms "
              "above by 1/4 gives "
              f"{_at_quarter_tokens(rows, 'SD3-Medium'):.0f} s for SD3-Medium at K = 1 on one GPU (all tokens): the "
              "same order. The paper's own K-scaling ((2,595 - 572) / 19 = 106 s per extra package of re-sampling) "
              "implies ~466 s of its K = 1 time is not sampling: there too accumulation and solves dominate."]
    first = {r["model"]: r for r in rows if r["gpus"] == 1 and r.get("setting", "all tokens") == "all tokens"}
    best = {r["model"]: r for r in rows if r["gpus"] == 1 and r.get("setting", "all tokens") != "all tokens"}
    if best:
        lines.append("- Reading: with " + next(iter(best.values()))["setting"] + ", one GPU: " + "; ".join(
            f"{m} {first[m]['total_s']:,.0f} s -> {best[m]['total_s']:,.0f} s ({first[m]['total_s'] / best[m]['total_s']:.1f}x; "
            f"Hessians now {best[m]['hessian_s'] / best[m]['total_s']:.0%} of the total)" for m in best) + ".")
    else:
        lines.append("- Reading: on these assumptions the float32 Hessian accumulation, not the sampling, dominates at "
                     "1024x1024 (X^T X over every targeted layer costs more FLOPs per call than the block's own forward).")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _projections(meas: dict, study: dict | None) -> list[dict]:
    rows = projection(meas, setting="all tokens")
    if study:
        rec = recommend(token_rows(study))
        label = f"--calib-tokens {rec}, shared accumulators" if rec else "shared accumulators"
        scale = {}
        for name, st in study.items():
            flops = next((r["hessian_flops_per_call"] for r in st["grid"] if r["tokens"] == rec),
                         st["hessian_flops_shared"])
            scale[name] = flops / st["hessian_flops_unshared"]
        rows += projection(meas, hess_scale=scale, setting=label)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m obslib.study.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--image-tokens", type=int, default=4096)
    p.add_argument("--tokens", default="256,512,1024,2048",
                   help="the token study's grid of --calib-tokens values ('' skips the study)")
    p.add_argument("--out", default="results/scale.json")
    p.add_argument("--md", default="results/scale.md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--one-tokens", help=argparse.SUPPRESS)
    p.add_argument("--skip-blocks", action="store_true", help="keep the block measurements in --out; run the token study")
    p.add_argument("--reproject", action="store_true", help="rewrite the projection from the measurements in --out")
    a = p.parse_args(argv)
    grid = [int(x) for x in a.tokens.split(",") if x.strip()]
    from ..io import write_json

    if a.one:
        print(json.dumps(run_block(a.one, a.steps, a.image_tokens)))
        return 0
    if a.one_tokens:
        print(json.dumps(token_study(a.one_tokens, a.steps, a.image_tokens, grid)))
        return 0
    old = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
    if a.reproject:
        meas, study = old["blocks"], old.get("tokens")
    else:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

        def sub(flag, name):
            r = subprocess.run([sys.executable, "-m", "obslib.study.bench_scale", flag, name, "--steps", str(a.steps),
                                "--image-tokens", str(a.image_tokens), "--tokens", a.tokens], capture_output=True,
                               text=True, env=env, check=True)
            return json.loads(r.stdout.strip().splitlines()[-1])

        meas = old["blocks"] if a.skip_blocks else {}
        for name in ([] if a.skip_blocks else BLOCKS):
            meas[name] = sub("--one", name)
            print(f"{name}: calibration {meas[name]['calibration_s_per_call']:.1f} s/call, solve "
                  f"{meas[name]['solve_s']:.1f} s", flush=True)
        study = {}
        for name in (BLOCKS if grid else []):
            study[name] = sub("--one-tokens", name)
            print(f"{name}: token study done", flush=True)
    rows = _projections(meas, study)
    write_json(a.out, {"blocks": meas, "tokens": study, "projection": rows})
    write_md(meas, rows, a.md, study)
    print(open(a.md).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
