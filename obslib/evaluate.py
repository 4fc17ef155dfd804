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

from .config import MAX_SEED
from .errors import UsageError
from .io import check_output_file, check_pipeline_dir, quiet_diffusers, write_json
from .shapes.classifier import fidelity  # noqa: F401  (obslib.evaluate.fidelity, as before)
from .shapes.model import DEFAULT_SAMPLING
from .shapes.world import SPLITS, parse_caption, prompts, render

REAL_SEED_OFFSET = 1_000_003  # renders used as the "real" set are seeded seed + offset + i


# ----------------------------------------------------------------------------------------- generate
def generate(pipe, prompts, seed: int, steps: int | None = None, guidance: float | None = None,
             batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Sample one image per prompt; uint8 (N,H,W,3). Batch ``b`` uses ``Generator().manual_seed(seed + b)``."""
    import torch
    from tqdm.auto import tqdm

    prompts = list(prompts)
    steps = DEFAULT_SAMPLING["num_inference_steps"] if steps is None else int(steps)
    guidance = DEFAULT_SAMPLING["guidance_scale"] if guidance is None else float(guidance)
    out = []
    starts = range(0, len(prompts), batch_size)
    with quiet_diffusers():
        for b, i in enumerate(tqdm(starts, desc="generate", disable=not progress or len(starts) <= 1)):
            gen = torch.Generator().manual_seed(int(seed) + b)
            with torch.no_grad():
                res = pipe(
                    prompt=prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                    max_sequence_length=DEFAULT_SAMPLING["max_sequence_length"], generator=gen, output_type="np",
                )
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


PSNR_CAP_DB = 100.0  # an image identical to its reference has infinite PSNR; per-image values are capped here


def reconstruction_metrics(images: np.ndarray, reference: np.ndarray, per_prompt: bool = False) -> dict:
    """PSNR and SSIM (data range 1) of each image against the reference image of the same prompt and seed,
    averaged over images (PSNR per image capped at ``PSNR_CAP_DB``). ``per_prompt=True`` adds the per-image
    values under ``per_prompt`` (``psnr``, ``ssim``)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x = _nchw(images).float() / 255.0
    y = _nchw(reference).float() / 255.0
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.nan_to_num(posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB).numpy().astype(float)
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none").numpy().astype(float)
    out = {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
    if per_prompt:
        out["per_prompt"] = {"psnr": psnr, "ssim": ssim}
    return out


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
SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline",)  # generate() passes SD3's max_sequence_length


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
    from .io import check_device

    n_avail = len(prompts(args.split))
    if not 2 <= args.num_prompts <= n_avail:
        raise UsageError(f"--num-prompts {args.num_prompts}: FID/KID need at least 2 images and the {args.split} split "
                         f"has {n_avail} prompts; allowed: 2 to {n_avail}")
    if not 0 <= args.seed < MAX_SEED:
        raise UsageError(f"--seed {args.seed}: must be an integer in [0, 2**63 - 2**32)")
    if not 1 <= args.steps <= 10_000:
        raise UsageError(f"--steps {args.steps}: must be an integer in [1, 10000]")
    if args.guidance is not None and not 0 <= args.guidance <= 1000:
        raise UsageError(f"--guidance {args.guidance}: must be a number in [0, 1000]")
    if not 1 <= args.batch_size <= 4096:
        raise UsageError(f"--batch-size {args.batch_size}: must be an integer in [1, 4096]")
    _check_index(args.model_dir)
    if args.reference is not None:
        _check_index(args.reference)
    window = None
    if args.pruned_steps is not None:
        window = parse_window(args.pruned_steps, args.steps)
        if args.reference is None:
            raise UsageError("--pruned-steps samples the --reference pipeline with MODEL_DIR's denoiser in those steps "
                             "only; give --reference DENSE_DIR")
    check_device(args.device)
    check_output_file(args.out, [args.model_dir, args.reference])

    # transformers warns on stderr at import time (e.g. "requires torchvision"); keep the CLI's stderr clean
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from .shapes.classifier import load_classifier

    try:
        clf = load_classifier()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    pipe = _load(args.model_dir, args.device)
    ref = _load(args.reference, args.device) if args.reference is not None else None
    torch.set_grad_enabled(False)
    images = None
    if window is not None:  # the reference samples, with the pruned denoiser switched in for the window only
        from .archs import find_denoiser
        from .windows import StepSwitch

        with StepSwitch(find_denoiser(ref)[1], find_denoiser(pipe)[1], window, args.steps):
            images = generate(ref, prompts(args.split, args.num_prompts), args.seed, steps=args.steps,
                              guidance=args.guidance, batch_size=args.batch_size)
    metrics = evaluate_pipeline(pipe, args.num_prompts, args.steps, args.seed, reference=ref, split=args.split,
                                guidance=args.guidance, classifier=clf, batch_size=args.batch_size, images=images)
    if window is not None:
        metrics["pruned_steps"] = list(window)
    metrics["written_by"] = "obslib"
    metrics["model_dir"] = os.path.abspath(args.model_dir)
    if args.reference is not None:
        metrics["reference"] = os.path.abspath(args.reference)
    # strict JSON: a non-finite value (PSNR of identical images is inf) is written as null
    write_json(args.out, {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
    print(f"prompt_fidelity={metrics['prompt_fidelity']:.4f} (95% CI {metrics['prompt_fidelity_lo']:.3f}-"
          f"{metrics['prompt_fidelity_hi']:.3f}, {metrics['num_prompts']} prompts) fid={metrics['fid']:.3f} "
          f"kid={metrics['kid']:.5f}±{metrics['kid_sd']:.5f}"
          + (f" psnr={metrics['psnr']:.2f} ssim={metrics['ssim']:.4f}" if "psnr" in metrics else "")
          + f" -> {args.out}")


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

    p = sub.add_parser("evaluate", help="score a pipeline on held-out prompts (fidelity, FID/KID, PSNR/SSIM)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score a shapes-world pipeline: prompt fidelity (GenEval-style), FID/KID on the "
                                   "evaluator's features, and with --reference PSNR/SSIM against the reference's images.",
                       epilog="example:\n  obslib evaluate out/obs50 --reference models/shapes-sd3 --num-prompts 64 "
                              "--out out/obs50/metrics.json")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the pipeline to score (a local directory)")
    p.add_argument("--reference", metavar="DIR", default=None,
                   help="a dense pipeline for PSNR/SSIM, same prompts and seeds (default: none)")
    p.add_argument("--num-prompts", type=int, required=True, metavar="N", help="prompts of the split to score (>= 2)")
    p.add_argument("--split", choices=SPLITS, default="heldout", help="prompt split (default: heldout)")
    p.add_argument("--steps", type=int, default=DEFAULT_SAMPLING["num_inference_steps"], metavar="T",
                   help=f"sampling steps (default: {DEFAULT_SAMPLING['num_inference_steps']})")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help=f"CFG scale (default: {DEFAULT_SAMPLING['guidance_scale']})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default: 64)")
    p.add_argument("--device", default="cpu", help="device for the pipelines, e.g. cuda (default: cpu)")
    p.add_argument("--pruned-steps", metavar="FIRST-LAST", default=None,
                   help="error injection: sample the --reference pipeline with MODEL_DIR's denoiser in steps FIRST..LAST "
                        "only (1 = the first, pure-noise step) and score those images (default: MODEL_DIR at every step)")
    p.add_argument("--out", required=True, metavar="metrics.json",
                   help="a new JSON file, or an earlier obslib metrics file to replace")
    p.set_defaults(func=_run_cli)
