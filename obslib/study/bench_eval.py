"""Evaluation time on the embedded model (a benchmark, not a test).

    python -m obslib.study.bench_eval [--repeats 3] [--prompts 64]

Times ``obslib evaluate`` as whole commands (fresh processes, run in turn A B C A B C ..., median wall time)
on a pruned copy of the embedded model against the dense one:

* shapes: the embedded model's own evaluation (``--num-prompts``: prompt fidelity, FID/KID, PSNR/SSIM, grid);
* prompts: ``--prompts FILE`` with the same prompts (PSNR/SSIM per prompt with intervals, the grid);
* prompts + CLIP: also ``--clip-model``, a CLIP ViT-B/32-sized model (transformers' default CLIPConfig, 151 M
  parameters) with random weights built here, so the CLIP score and FID/KID in its space cost what a real
  ViT-B/32 costs (the numbers themselves mean nothing).

Both models are sampled in every command (64 prompts x 20 steps x 2 pipelines), so sampling dominates; the
in-process split of one run (sampling vs the metrics) is measured too. Writes results/eval_bench.json and .md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _clip_b32(path: str) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ..shapes.model import build_tokenizer

    tok = build_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=tok.model_max_length))
    CLIPModel(cfg).eval().save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(path)


def _split(model: str, dense: str, prompts: list[str], clip: str) -> dict:
    """One in-process run: seconds spent sampling both models and computing each metric group."""
    import numpy as np
    import torch

    from ..evaluate import generate
    from ..io import load_pipeline
    from ..prompt_eval import clip_features, clip_scores, fid_kid, load_clip, reconstruction_metrics

    torch.set_grad_enabled(False)
    out = {}
    t = time.perf_counter()
    a = generate(load_pipeline(model), prompts, 0, progress=False)
    b = generate(load_pipeline(dense), prompts, 0, progress=False)
    out["sampling_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reconstruction_metrics(a, b, per_prompt=True)
    out["psnr_ssim_s"] = time.perf_counter() - t
    t = time.perf_counter()
    c = load_clip(clip)
    out["clip_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    clip_scores(a, prompts, c), clip_scores(b, prompts, c)
    out["clip_score_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fid_kid(clip_features(a, c), clip_features(b, c))
    out["fid_kid_s"] = time.perf_counter() - t
    out["images"] = int(len(a) + len(b))
    assert np.isfinite(out["sampling_s"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m obslib.study.bench_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--out", default="results/eval_bench.json")
    p.add_argument("--md", default="results/eval_bench.md")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="obslib-bench-eval-")  # ours alone; removed at the end
    try:
        return _run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(a, work: str) -> int:
    import torch

    from .experiments import DEFAULT_MODEL
    from ..io import write_json
    from ..shapes import prompts as world_prompts

    pruned, clip = os.path.join(work, "obs50"), os.path.join(work, "clip-b32")
    exe = [sys.executable, "-m", "obslib"]
    subprocess.run(exe + ["prune", DEFAULT_MODEL, "--sparsity", "0.5", "--num-prompts", "16", "--out", pruned,
                          "--quiet"], check=True)
    _clip_b32(clip)
    ps = world_prompts("heldout", a.prompts)
    pf = os.path.join(work, "prompts.txt")
    with open(pf, "w") as f:
        f.write("\n".join(ps) + "\n")
    commands = {
        "shapes": ["evaluate", pruned, "--reference", DEFAULT_MODEL, "--num-prompts", str(a.prompts)],
        "prompts": ["evaluate", pruned, "--reference", DEFAULT_MODEL, "--prompts", pf],
        "prompts + CLIP": ["evaluate", pruned, "--reference", DEFAULT_MODEL, "--prompts", pf, "--clip-model", clip],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(a.repeats):
        for k, cmd in commands.items():
            t = time.perf_counter()
            subprocess.run(exe + cmd + ["--out", os.path.join(work, f"m{r}.json")], check=True,
                           stdout=subprocess.DEVNULL)
            times[k].append(time.perf_counter() - t)
            print(f"{k}: {times[k][-1]:.1f} s", flush=True)
    split = _split(pruned, DEFAULT_MODEL, ps, clip)
    res = {"prompts": a.prompts, "repeats": a.repeats, "threads": torch.get_num_threads(),
           "wall_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}, "split": split}
    write_json(a.out, res)
    med = res["median_s"]
    lines = ["# Evaluation time on the embedded model", "",
             f"`python -m obslib.study.bench_eval`: `obslib evaluate` of a 50% OBS-Diff copy of models/shapes-sd3 against the "
             f"dense model on {a.prompts} held-out prompts, 20 steps, CPU ({res['threads']} threads), whole commands "
             f"run in turn, {a.repeats} times each (model loading, sampling both pipelines, metrics, grid, JSON).", "",
             "| command | median wall (s) | min – max (s) |", "|---|---|---|"]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.1f} | {min(v):.1f} – {max(v):.1f} |")
    lines += ["", f"One run split in-process: sampling both models {split['sampling_s']:.1f} s for {split['images']} "
              f"images; PSNR/SSIM {split['psnr_ssim_s']:.2f} s; CLIP (ViT-B/32 size) load {split['clip_load_s']:.1f} s, "
              f"CLIP scores of both image sets {split['clip_score_s']:.1f} s, FID/KID in CLIP space with the "
              f"200-replicate FID bootstrap {split['fid_kid_s']:.1f} s.",
              f"Reading: the prompt-file evaluation costs {med['prompts'] / med['shapes']:.2f}x the shapes-world one "
              f"and adding CLIP {med['prompts + CLIP'] / med['prompts']:.2f}x the prompt-file one; sampling is "
              f"{split['sampling_s'] / med['prompts']:.0%} of a prompt-file evaluation's wall time.", ""]
    with open(a.md, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
