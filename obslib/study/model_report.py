"""Model card numbers of the embedded default model: quality, a captioned sample grid, and how much 50%
magnitude pruning hurts it (``python -m obslib.study.model_report``; the first step of ``make study``).

Writes results/default_model.json and figures/default_model_samples.png.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ..paths import DEFAULT_MODEL, repo_root


def _subgroup(prompt: str) -> str:
    from ..shapes.world import novelty, parse_caption

    sc = parse_caption(prompt)
    return f"{'single' if len(sc.objects) == 1 else 'pair'}, {novelty(sc) or 'unseen prompt'}"


def _mean_std(per_seed: list[dict]) -> dict:
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], float) and k != "guidance"]
    return {k: {"mean": float(np.mean([r[k] for r in per_seed])), "std": float(np.std([r[k] for r in per_seed]))}
            for k in keys}


def model_report(model_dir: str, num_prompts: int = 256, seeds=(0, 1, 2), out_json: str | None = None,
                 figure: str | None = None, progress: bool = True) -> dict:
    import torch

    from .. import PruneConfig, load_pipeline, prune
    from ..evaluate import evaluate_pipeline, fidelity, generate
    from ..io import read_defaults, write_json
    from .plots import image_grid, save
    from ..shapes.classifier import load_classifier
    from ..shapes.train import training_history
    from ..shapes.world import prompts

    clf = load_classifier()
    dense = load_pipeline(model_dir)
    defaults = read_defaults(model_dir) or {}
    steps = defaults["num_inference_steps"]
    ps = prompts("heldout", num_prompts)
    # the dense model's held-out images per seed: scored as its own, and the pruned model's PSNR/SSIM reference
    dense_imgs = {s: generate(dense, ps, s, steps=steps, progress=progress) for s in seeds}
    rows = {}
    for name in ("dense", "magnitude-50%"):
        pipe = dense if name == "dense" else load_pipeline(model_dir)
        if name != "dense":
            prune(pipe, PruneConfig(method="magnitude", sparsity=0.5, prompts=["unused"], measure_error=False, progress=False))
        own = name == "dense"
        rows[name] = _mean_std([evaluate_pipeline(pipe, num_prompts, steps, s, classifier=clf, progress=progress,
                                                  images=dense_imgs[s] if own else None,
                                                  reference=None if own else dense_imgs[s]) for s in seeds])
    # the harder split outside held-out: object colours on backgrounds training never shows them on
    unseen_bg = _mean_std([evaluate_pipeline(dense, num_prompts, steps, s, classifier=clf,
                                             split="unseen_background", progress=progress) for s in seeds])
    # fidelity by held-out subgroup (dense, seed 0)
    imgs = dense_imgs[seeds[0]]
    groups = {}
    for g in sorted({_subgroup(p) for p in ps}):
        idx = [i for i, p in enumerate(ps) if _subgroup(p) == g]
        groups[g] = {"n": len(idx), "prompt_fidelity": fidelity(imgs[idx], [ps[i] for i in idx], clf)["prompt_fidelity"]}
    # how the default sampling settings were chosen: fidelity over steps x CFG (64 held-out prompts, seed 0)
    sweep = []
    for st in (10, 20, 30):
        for g in (2.0, 4.0, 6.0):
            im = generate(dense, ps[:64], seeds[0], steps=st, guidance=g, progress=False)
            sweep.append({"steps": st, "guidance": g, "prompt_fidelity": fidelity(im, ps[:64], clf)["prompt_fidelity"]})
    train_ps = prompts("train", num_prompts)
    train_fid = fidelity(generate(dense, train_ps, seeds[0], progress=progress), train_ps, clf)["prompt_fidelity"]
    report = {
        "model_dir": os.path.relpath(model_dir, repo_root()),
        "sampling": defaults,
        "training": training_history(model_dir),
        "num_prompts": num_prompts,
        "seeds": list(seeds),
        "params": {n: sum(p.numel() for p in m.parameters()) for n, m in
                   (("transformer", dense.transformer), ("text_encoder", dense.text_encoder),
                    ("text_encoder_2", dense.text_encoder_2), ("vae", dense.vae))},
        "heldout": rows,
        "heldout_by_subgroup_seed0": groups,
        "unseen_background": unseen_bg,
        "sampling_sweep_64_prompts": sweep,
        "train_prompt_fidelity_seed0": train_fid,
        "magnitude_50_drop": {k: rows["dense"][k]["mean"] - rows["magnitude-50%"][k]["mean"]
                              for k in ("prompt_fidelity",)},
        "disk_mb": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(model_dir) for f in fs) / 2**20,
        "torch_threads": torch.get_num_threads(),
    }
    if out_json:
        write_json(out_json, report)
    if figure:
        show = ps[:24]
        save(image_grid(imgs[:24], show, ncols=8), figure)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m obslib.study.model_report", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--out", default=os.path.join(str(repo_root()), "results", "default_model.json"))
    p.add_argument("--figure", default=os.path.join(str(repo_root()), "figures", "default_model_samples.png"))
    a = p.parse_args(argv)
    r = model_report(a.model, a.num_prompts, out_json=a.out, figure=a.figure)
    print(json.dumps({"dense": r["heldout"]["dense"]["prompt_fidelity"], "magnitude-50%": r["heldout"]["magnitude-50%"]["prompt_fidelity"],
                      "unseen_background": r["unseen_background"]["prompt_fidelity"], "by_subgroup": r["heldout_by_subgroup_seed0"]}, indent=1))


if __name__ == "__main__":
    main()
