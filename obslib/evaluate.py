"""Score generated images of the shapes world: prompt fidelity (GenEval-style), FID/KID, PSNR/SSIM.

* ``prompt_fidelity``: share of images in which the evaluator CNN (``obslib.shapes.classifier``) finds
  everything the prompt names: the object count, the background, each object's shape/colour/size and,
  for two objects, the spatial relation (the object named first lies left of / above the other one).
  ``acc_<head>`` are per-attribute accuracies in the canonical terms of ``Scene.labels()`` (slot A =
  left/top object of the prompt), each over the prompts where that label is present;
  ``acc_arrangement`` is "the relation holds" (see ``fidelity``).
* ``fid`` / ``kid``: torchmetrics' FrechetInceptionDistance / KernelInceptionDistance on the evaluator's
  penultimate features (not Inception: the images are 48x48 synthetic shapes), generated images vs
  renders of the same prompts.
* ``psnr`` / ``ssim`` (with a reference pipeline): against the reference's image of the same prompt and
  seed, per image, averaged over images — how closely a pruned model reproduces its dense parent.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .config import GUIDANCE, SEEDS, STEPS
from .errors import UsageError
from .prompt_eval import reconstruction_metrics
from .sampling import CALL_KEYS, guidance_kwargs, own_sampling_defaults
from .seeds import prompt_generators
from .io import check_output_file, check_pipeline_dir, quiet_diffusers, write_json
from .shapes.classifier import fidelity  # noqa: F401  (obslib.evaluate.fidelity, as before)
from .shapes.model import DEFAULT_SAMPLING
from .shapes.world import SPLITS, parse_caption, prompts, render

REAL_SEED_OFFSET = 1_000_003  # renders used as the "real" set are seeded seed + offset + i


# ----------------------------------------------------------------------------------------- generate
def generate(pipe, prompts, seed: int, steps: int | None = None, guidance: float | None = None,
             batch_size: int = 64, progress: bool = True, defaults: dict | None = None) -> np.ndarray:
    """Sample one image per prompt; uint8 (N,H,W,3). Prompt ``i`` gets the noise of ``prompt_seed(seed, i)``
    (``obslib.sampling``), so each image depends on its prompt, its number and the seed, not on ``batch_size``.
    ``defaults``: the sampling defaults for the steps, guidance and text length left out (``sampling_defaults(pipe)``
    for any pipeline; default: the shapes world's)."""
    import inspect

    import torch
    from tqdm.auto import tqdm

    prompts = list(prompts)
    # the model's own obslib_defaults.json (the embedded models'), else the shapes world's
    d = defaults if defaults is not None else own_sampling_defaults(pipe) or DEFAULT_SAMPLING
    steps = d["num_inference_steps"] if steps is None else int(steps)
    guidance = d["guidance_scale"] if guidance is None else float(guidance)
    params = inspect.signature(type(pipe).__call__).parameters
    extra = {k: d[k] for k in CALL_KEYS if k in d and k in params}
    out = []
    starts = range(0, len(prompts), batch_size)
    with quiet_diffusers():
        for i in tqdm(starts, desc="generate", disable=not progress or len(starts) <= 1):
            gen = prompt_generators(int(seed), range(i, min(i + batch_size, len(prompts))))
            with torch.no_grad():
                batch = prompts[i : i + batch_size]
                res = pipe(prompt=batch, num_inference_steps=steps, generator=gen, output_type="np",
                           **guidance_kwargs(pipe, guidance, len(batch)), **extra)
            out.append(np.clip(np.rint(np.asarray(res.images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8))
    if not out:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.concatenate(out)


def render_prompts(prompts, seed: int) -> np.ndarray:
    """Ground-truth renders of the prompts (image i seeded ``seed + i``)."""
    return np.stack([render(parse_caption(p), seed=int(seed) + i) for i, p in enumerate(prompts)])


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``share`` observed on ``n`` trials: with 64
    prompts a fidelity of 0.8 is known only to about 0.69-0.88, which is what two models must be told apart by."""
    if n <= 0 or not math.isfinite(share):
        return float("nan"), float("nan")
    d = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / d
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------ distributions
def _feature_module(classifier):
    """nn.Module wrapper around ``classifier.features`` for torchmetrics' custom ``feature=`` argument.

    torchmetrics (1.9) hands a custom module the images exactly as given to ``update`` (its
    ``normalize`` flag only converts for the built-in Inception) and probes it once with a dummy batch
    unless it has ``num_features``. We feed uint8 NCHW tensors; floats are taken as [0,1].
    """
    import torch

    from .shapes.classifier import to_input

    class _Features(torch.nn.Module):
        def __init__(self, clf):
            super().__init__()
            self.clf = clf
            self.num_features = int(clf.feature_dim)

        @torch.no_grad()
        def forward(self, imgs):
            dev = next(self.clf.parameters()).device
            return self.clf.features(to_input(imgs).to(dev)).double().cpu()

    return _Features(classifier).eval()


def _nchw(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def distribution_metrics(fake: np.ndarray, real: np.ndarray, classifier, batch_size: int = 256,
                         kid_subsets: int = 50, seed: int = 0) -> dict[str, float]:
    """FID and KID of uint8 image sets in the evaluator's feature space, and ``kid_sd``, the standard error of
    the KID estimate (from its spread over random half-size subsets). KID is unbiased, so a model as close
    to the real images as the evaluator can tell scores around 0, negative values included."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(fake), len(real))
    if n < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(fake)} generated and {len(real)} real")
    import warnings

    feat = _feature_module(classifier)
    fid = FrechetInceptionDistance(feature=feat, normalize=False)
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer" (they are 128-d)
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=feat, subsets=kid_subsets, subset_size=min(1000, n), normalize=False,
                                      compute_with_cache=False)  # computed twice below, at two subset sizes
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, len(imgs), batch_size):
            x = _nchw(imgs[i : i + batch_size])
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws random subsets
    try:
        kid_mean, _ = kid.compute()  # subsets of min(1000, n): with n <= 1000 the whole set, so no spread
        kid.subset_size = max(2, n // 2)
        _, half_sd = kid.compute()  # spread over random half-size subsets
    finally:
        torch.random.set_rng_state(state)
    # the KID estimate is a U-statistic (variance ~ 1/n): the half-set spread / sqrt(2) estimates its standard error
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_sd": float(half_sd) / math.sqrt(2)}


# ------------------------------------------------------------------------------------------ pipeline
def evaluate_pipeline(pipe, num_prompts: int, steps: int, seed: int, reference=None, split: str = "heldout",
                      guidance: float | None = None, classifier=None, batch_size: int = 64,
                      progress: bool = True, images: np.ndarray | None = None) -> dict:
    """All metrics of ``pipe`` on the first ``num_prompts`` prompts of ``split``.

    ``reference`` is a pipeline, or its images for the same prompts and seed; ``images`` are ``pipe``'s own
    samples when the caller already generated them (``generate`` with the same prompts, seed and settings).
    """
    from .shapes.classifier import load_classifier

    if num_prompts <= 0 or steps <= 0:
        raise ValueError(f"num_prompts={num_prompts}, steps={steps}: both must be positive")
    ps = prompts(split, num_prompts)
    clf = classifier if classifier is not None else load_classifier()

    def sample(p):
        return generate(p, ps, seed, steps=steps, guidance=guidance, batch_size=batch_size, progress=progress)

    images = sample(pipe) if images is None else images
    real = render_prompts(ps, seed + REAL_SEED_OFFSET)
    scores = fidelity(images, ps, clf)
    out = {"prompt_fidelity": scores.pop("prompt_fidelity")}
    out["prompt_fidelity_lo"], out["prompt_fidelity_hi"] = wilson_interval(out["prompt_fidelity"], len(ps))
    out.update(distribution_metrics(images, real, clf, seed=seed))
    if reference is not None:
        out.update(reconstruction_metrics(images, reference if isinstance(reference, np.ndarray) else sample(reference)))
    out.update(scores)
    out.update({"num_prompts": len(ps), "steps": int(steps), "seed": int(seed), "split": split,
                "guidance": DEFAULT_SAMPLING["guidance_scale"] if guidance is None else float(guidance)})
    return out


# ----------------------------------------------------------------------------------------------- CLI
# the embedded models' pipelines: generate() samples each with its own obslib_defaults.json (text length, guidance)
SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def _check_index(path: str) -> None:
    """Cheap structural check of ``model_index.json`` (before importing diffusers)."""
    index = check_pipeline_dir(path)
    if index["_class_name"] not in SUPPORTED_PIPELINES:
        raise UsageError(f"{path!r} is a {index['_class_name']}; the shapes-world evaluator scores "
                         f"{', '.join(SUPPORTED_PIPELINES)} models")


def _load(path: str, device: str = "cpu"):
    """Load a pipeline for the CLI; any failure is reported as bad input (one line, exit 2)."""
    from .io import load_pipeline

    return load_pipeline(path, device=device)


def _run_cli(args) -> None:
    """``obslib evaluate``: the shapes-world metrics (--num-prompts on the embedded model), or any pipeline on a
    prompt file (--prompts). Every flag and path is checked before a model is loaded; nothing is written on error."""
    for flag, v, allowed in (("--seed", args.seed, SEEDS), ("--steps", args.steps, STEPS),
                             ("--guidance", args.guidance, GUIDANCE)):
        if v is not None:
            allowed.check(flag, v)
    if not 1 <= args.batch_size <= 4096:
        raise UsageError(f"--batch-size {args.batch_size}: must be an integer in [1, 4096]")
    if args.prompts is None and args.num_prompts is not None:  # every number before any path
        n_avail = len(prompts(args.split))
        if not 2 <= args.num_prompts <= n_avail:
            raise UsageError(f"--num-prompts {args.num_prompts}: FID/KID need at least 2 images and the {args.split} "
                             f"split has {n_avail} prompts; allowed: 2 to {n_avail}")
    elif args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError(f"--num-prompts {args.num_prompts}: must be at least 1 (the first N prompts of --prompts)")
    index = check_pipeline_dir(args.model_dir)
    if args.reference is not None:
        ref_index = check_pipeline_dir(args.reference)
        if ref_index["_class_name"] != index["_class_name"]:
            raise UsageError(f"--reference {args.reference!r} is a {ref_index['_class_name']} and MODEL_DIR a "
                             f"{index['_class_name']}; PSNR/SSIM compare a pruned model with its own dense parent")
    # transformers warns on stderr at import time (e.g. "requires torchvision"); keep the CLI's stderr clean
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    with torch.no_grad():  # not torch.set_grad_enabled(False): the caller's (a test's, a notebook's) state survives
        return _shapes_cli(args, index) if args.prompts is None else _prompts_cli(args)


def _grid_path(out: str) -> str:
    stem = out[:-5] if out.lower().endswith(".json") else out
    return f"{stem}_grid.png"


def _check_outputs(args) -> str:
    """--out and the grid beside it: new files, or obslib's own earlier ones; returns the grid's path."""
    from .prompt_eval import is_obslib_grid

    check_output_file(args.out, [args.model_dir, args.reference])
    grid = _grid_path(args.out)
    if os.path.islink(grid) or os.path.isdir(grid) or (os.path.lexists(grid) and not is_obslib_grid(grid)):
        raise UsageError(f"{grid!r} (the image grid written beside --out) exists and is not an obslib grid; refusing "
                         "to replace it (choose another --out)")
    return grid


def _window(args, steps: int):
    if args.pruned_steps is None:
        return None
    window = parse_window(args.pruned_steps, steps)
    if args.reference is None:
        raise UsageError("--pruned-steps samples the --reference pipeline with MODEL_DIR's denoiser in those steps "
                         "only; give --reference DENSE_DIR")
    return window


def _sample(args, pipe, ref, ps, window, steps, guidance, defaults):
    """(model images, reference images or None); with a window, the model's images are the reference's with the
    model's denoiser switched in for those steps."""
    def gen(p):
        return generate(p, ps, args.seed, steps=steps, guidance=guidance, batch_size=args.batch_size,
                        defaults=defaults)

    if window is None:
        return gen(pipe), gen(ref) if ref is not None else None
    from .archs import find_denoiser
    from .windows import StepSwitch

    from .sampling import calls_per_step

    with StepSwitch(find_denoiser(ref)[1], find_denoiser(pipe)[1], window, steps, calls_per_step(ref, guidance)):
        images = gen(ref)
    return images, gen(ref)


def _finish(args, metrics: dict, grid: str, ps, images, ref_images, psnr) -> None:
    """Write the metrics (strict JSON), the grid, and the evaluation into MODEL_DIR's card when obslib wrote it."""
    import shlex
    import sys

    from .card import add_evaluation
    from .prompt_eval import write_grid

    metrics["written_by"] = "obslib"
    metrics["command"] = "obslib " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    metrics["model_dir"] = os.path.abspath(args.model_dir)
    if args.reference is not None:
        metrics["reference"] = os.path.abspath(args.reference)
    write_grid(grid, ps, images, ref_images, psnr)
    metrics["grid"] = os.path.abspath(grid)
    # strict JSON: a non-finite value (PSNR of identical images is inf) is written as null
    write_json(args.out, {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
    card = {k: v for k, v in metrics.items() if k != "per_prompt"}
    card["grid"] = None
    metrics["card_updated"] = add_evaluation(args.model_dir, card)


def _shapes_cli(args, index: dict) -> None:
    """The embedded model's own evaluation: prompt fidelity, FID/KID against renders, PSNR/SSIM."""
    from .io import check_device

    if index["_class_name"] not in SUPPORTED_PIPELINES:
        raise UsageError(f"{args.model_dir!r} is a {index['_class_name']}; the shapes-world evaluator scores "
                         f"{', '.join(SUPPORTED_PIPELINES)} models; for any other pipeline give --prompts FILE")
    for flag, v in (("--clip-model", args.clip_model), ("--real-images", args.real_images)):
        if v is not None:
            raise UsageError(f"{flag} applies to --prompts FILE evaluation; the shapes world scores with its own "
                             "evaluator and renders")
    if args.num_prompts is None:
        raise UsageError("give --num-prompts N (the shapes world's held-out prompts) or --prompts FILE")
    steps = DEFAULT_SAMPLING["num_inference_steps"] if args.steps is None else args.steps
    window = _window(args, steps)
    check_device(args.device)
    grid = _check_outputs(args)

    from .shapes.classifier import load_classifier

    try:
        clf = load_classifier()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    pipe = _load(args.model_dir, args.device)
    ref = _load(args.reference, args.device) if args.reference is not None else None
    ps = prompts(args.split, args.num_prompts)
    images, ref_images = _sample(args, pipe, ref, ps, window, steps, args.guidance, None)
    metrics = evaluate_pipeline(pipe, args.num_prompts, steps, args.seed, split=args.split, guidance=args.guidance,
                                classifier=clf, batch_size=args.batch_size, images=images)
    psnr = None
    if ref_images is not None:  # PSNR/SSIM here, not in evaluate_pipeline: per prompt, with their intervals
        from .prompt_eval import with_interval

        per = reconstruction_metrics(images, ref_images, per_prompt=True)["per_prompt"]
        psnr = per["psnr"]
        with_interval(metrics, "psnr", per["psnr"])
        with_interval(metrics, "ssim", per["ssim"])
    if window is not None:
        metrics["pruned_steps"] = list(window)
    metrics["prompt_source"] = f"the shapes world's {args.split} split"
    _finish(args, metrics, grid, ps, images, ref_images, psnr)
    print(f"prompt_fidelity={metrics['prompt_fidelity']:.4f} (95% CI {metrics['prompt_fidelity_lo']:.3f}-"
          f"{metrics['prompt_fidelity_hi']:.3f}, {metrics['num_prompts']} prompts) fid={metrics['fid']:.3f} "
          f"kid={metrics['kid']:.5f}±{metrics['kid_sd']:.5f}"
          + (f" psnr={metrics['psnr']:.2f} ssim={metrics['ssim']:.4f}" if "psnr" in metrics else "")
          + f" -> {args.out}")


def text_readers(pipe, defaults: dict) -> list[tuple[object, int, str]]:
    """(tokenizer, most tokens read, what sets it) of each text encoder of the pipeline: a T5 reads
    ``max_sequence_length`` (the model's defaults, else the pipeline's own default: SD3 256, Flux 512, PixArt 300),
    a CLIP its tokenizer's context (77)."""
    import inspect

    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    msl = defaults.get("max_sequence_length", param.default if param is not None else None)
    out = []
    for suffix in ("", "_2", "_3"):
        tok, enc = getattr(pipe, f"tokenizer{suffix}", None), getattr(pipe, f"text_encoder{suffix}", None)
        if tok is None or enc is None:
            continue
        if "T5" in type(enc).__name__ and isinstance(msl, int):
            out.append((tok, msl, f"text_encoder{suffix}'s max_sequence_length"))
        else:
            out.append((tok, int(getattr(tok, "model_max_length", 77)), f"tokenizer{suffix}'s context"))
    return out


def check_prompts_fit(pipe, ps: list[str], defaults: dict, where: str) -> None:
    """Every prompt read whole by at least one of the pipeline's text encoders, else ``UsageError``: a prompt cut
    short would be scored (CLIP) against words the model never read."""
    readers = text_readers(pipe, defaults)
    if not readers:
        return
    for i, p in enumerate(ps):
        lengths = [len(tok(p, truncation=False)["input_ids"]) for tok, _, _ in readers]
        if all(n > limit for n, (_, limit, _) in zip(lengths, readers)):
            j = max(range(len(readers)), key=lambda j: readers[j][1])
            raise UsageError(f"--prompts: prompt {i + 1} is {lengths[j]} tokens long and {where} reads at most "
                             f"{readers[j][1]} ({readers[j][2]}); it would be cut short; shorten it or leave it out")


def _prompts_cli(args) -> None:
    """Any supported pipeline on a prompt file: PSNR/SSIM against --reference, CLIP score with --clip-model,
    FID/KID against the reference's images or --real-images, an image grid."""
    from .io import check_device
    from .prompt_eval import check_clip_dir, evaluate_prompts, image_files, load_clip, read_images
    from .sampling import read_prompt_file, sampling_defaults

    ps = read_prompt_file(args.prompts)
    if args.num_prompts is not None:
        if not 1 <= args.num_prompts <= len(ps):
            raise UsageError(f"--num-prompts {args.num_prompts}: {args.prompts!r} holds {len(ps)} prompts; allowed: "
                             f"1 to {len(ps)}")
        ps = ps[:args.num_prompts]
    if args.clip_model is not None:
        check_clip_dir(args.clip_model)  # its weights load after the pipelines
    if args.real_images is not None:
        image_files(args.real_images)  # a folder with at least 2 images, else the one-line error
        if args.clip_model is None:
            raise UsageError("--real-images: FID/KID against real images are computed in CLIP's embedding space; "
                             "give --clip-model LOCAL_DIR too")
    if args.reference is None and args.clip_model is None:
        raise UsageError("nothing to measure: give --reference DENSE_DIR (PSNR/SSIM) and/or --clip-model LOCAL_DIR "
                         "(CLIP score)")
    if len(ps) < 2 and args.clip_model is not None and (args.reference is not None or args.real_images is not None):
        raise UsageError(f"--prompts {args.prompts!r}: FID/KID need at least 2 prompts; the file holds 1")
    check_device(args.device)
    grid = _check_outputs(args)

    pipe = _load(args.model_dir, args.device)
    ref = _load(args.reference, args.device) if args.reference is not None else None
    defaults = sampling_defaults(ref if ref is not None else pipe)
    steps = defaults["num_inference_steps"] if args.steps is None else args.steps
    guidance = defaults["guidance_scale"] if args.guidance is None else args.guidance
    check_prompts_fit(ref if ref is not None else pipe, ps, defaults,
                      "--reference" if ref is not None else "MODEL_DIR")
    window = _window(args, steps)
    clip = load_clip(args.clip_model, args.device) if args.clip_model is not None else None
    images, ref_images = _sample(args, pipe, ref, ps, window, steps, guidance, defaults)
    real = read_images(args.real_images, images.shape[1:3]) if args.real_images is not None else None
    metrics = evaluate_prompts(images, ps, ref_images, clip, real)
    metrics.update(steps=steps, guidance=guidance, seed=args.seed, prompt_source=os.path.basename(args.prompts),
                   prompts_file=os.path.abspath(args.prompts))
    if window is not None:
        metrics["pruned_steps"] = list(window)
    psnr = metrics["per_prompt"].get("psnr")
    _finish(args, metrics, grid, ps, images, ref_images, psnr)
    parts = [f"{len(ps)} prompts"]
    for k, d in (("psnr", 2), ("ssim", 4), ("clip_score", 2), ("clip_score_dense", 2), ("fid", 3)):
        if k in metrics:
            parts.append(f"{k}={metrics[k]:.{d}f} [{metrics[k + '_lo']:.{d}f}, {metrics[k + '_hi']:.{d}f}]")
    print(" ".join(parts) + f" -> {args.out} (grid {grid})")


def parse_window(text: str, steps: int) -> tuple[int, int]:
    """'FIRST-LAST' (1-based, inclusive) inside the trajectory's steps 1..``steps``, else ``UsageError``."""
    parts = str(text).split("-")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise UsageError(f"--pruned-steps {text!r}: expected FIRST-LAST, two step numbers such as 1-5")
    first, last = int(parts[0]), int(parts[1])
    if not 1 <= first <= last <= steps:
        raise UsageError(f"--pruned-steps {text}: the window is outside the trajectory's steps 1..{steps} (need 1 <= "
                         f"FIRST <= LAST <= {steps})")
    return first, last


def add_cli(sub) -> None:
    import argparse

    p = sub.add_parser("evaluate", help="score a pipeline: on your prompts (PSNR/SSIM, CLIP, FID/KID) or the shapes world",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score a pipeline against its dense parent. With --prompts FILE (any supported "
                                   "pipeline): per-prompt PSNR/SSIM against --reference at the same seeds, CLIP score "
                                   "with --clip-model, FID/KID in CLIP space against the reference or --real-images, "
                                   "each with a 95%% interval, and an image grid beside the metrics. Without --prompts "
                                   "(the embedded model): prompt fidelity, FID/KID on the shapes evaluator, PSNR/SSIM. "
                                   "When MODEL_DIR is an obslib output its README.md gets the evaluation.",
                       epilog="examples:\n  obslib evaluate out/obs50 --reference models/shapes-sd3 --num-prompts 64 "
                              "--out out/obs50.json\n  obslib evaluate /models/sd3m-obs50 --reference /models/sd3-medium "
                              "--prompts eval.txt --clip-model /models/clip-vit-large-patch14 --device cuda "
                              "--out sd3m-obs50.json")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the pipeline to score (a local directory)")
    p.add_argument("--reference", metavar="DIR", default=None,
                   help="the dense pipeline for PSNR/SSIM, same prompts and seeds (default: none)")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="evaluation prompts, one per line (any pipeline; default: the shapes world's held-out prompts)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="shapes world: prompts of the split to score (>= 2); with --prompts: the first N of the file "
                        "(default: needed for the shapes world; every prompt of --prompts)")
    p.add_argument("--clip-model", metavar="LOCAL_DIR", default=None,
                   help="a local CLIP directory (transformers CLIPModel + processor): CLIP score, and FID/KID in its "
                        "image-embedding space (default: none, no CLIP score)")
    p.add_argument("--real-images", metavar="DIR", default=None,
                   help="FID/KID against these images (png/jpg/webp/bmp) instead of the reference's; needs --clip-model "
                        "(default: the reference's images)")
    p.add_argument("--split", choices=SPLITS, default="heldout", help="shapes world: prompt split (default: heldout)")
    p.add_argument("--steps", type=int, default=None, metavar="T",
                   help="sampling steps (default: the model's own; shapes world "
                        f"{DEFAULT_SAMPLING['num_inference_steps']})")
    p.add_argument("--guidance", type=float, default=None, metavar="G", help="CFG scale (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="sampling seed; prompt i gets its own noise from it and i (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch; the images do not depend on "
                                                               "it (default: 64)")
    p.add_argument("--device", default="cpu", help="device for the pipelines, e.g. cuda (default: cpu)")
    p.add_argument("--pruned-steps", metavar="FIRST-LAST", default=None,
                   help="error injection: sample the --reference pipeline with MODEL_DIR's denoiser in steps FIRST..LAST "
                        "only (1 = the first, pure-noise step) and score those images (default: MODEL_DIR at every step)")
    p.add_argument("--out", required=True, metavar="metrics.json",
                   help="a new JSON file, or an earlier obslib metrics file to replace; the grid goes beside it "
                        "(NAME_grid.png)")
    p.set_defaults(func=_run_cli)
