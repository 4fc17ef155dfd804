"""Evaluating any pipeline on your own prompts: what a pruned model lost against its dense parent.

``evaluate_prompts`` samples the model (and the reference) on a prompt file, one noise seed per prompt
(``obslib.sampling.prompt_seed``), and reports, each with a 95% interval:

* ``psnr`` / ``ssim``: per prompt, the pruned image against the dense image of the same prompt and seed
  (interval: bootstrap over prompts);
* ``clip_score`` (with a local CLIP directory): torchmetrics' CLIP score (100 × cosine of image and prompt
  embeddings) per image, for the model and the reference, and their paired difference;
* ``fid`` / ``kid``: torchmetrics' FID and KID between the model's images and the reference's (or real images
  from a folder), in the CLIP image-embedding space — the Inception network of the usual FID cannot be
  fetched offline, so these numbers compare models with each other, not with published FIDs (interval:
  ±1.96 bootstrap standard errors over images for FID; KID's own standard error over subsets).

``write_grid`` draws reference | model side by side with each prompt and its PSNR. Nothing is downloaded:
the CLIP model is a local directory (``load_clip``), loaded with ``local_files_only``.
"""
from __future__ import annotations

import io
import json
import math
import os
import textwrap
import warnings

import numpy as np
import torch

from .bootstrap import paired_bootstrap
from .errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_REAL_IMAGES = 50_000
FID_BOOT = 200  # bootstrap replicates of the FID interval


# ------------------------------------------------------------------------------------------ PSNR / SSIM
PSNR_CAP_DB = 100.0  # an image identical to its reference has infinite PSNR; per-image values are capped here


def reconstruction_metrics(images: np.ndarray, reference: np.ndarray, per_prompt: bool = False) -> dict:
    """PSNR and SSIM (data range 1) of each image against the reference image of the same prompt and seed,
    averaged over images (PSNR per image capped at ``PSNR_CAP_DB``). ``per_prompt=True`` adds the per-image
    values under ``per_prompt`` (``psnr``, ``ssim``)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(np.ascontiguousarray(reference)).permute(0, 3, 1, 2).float() / 255.0
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.nan_to_num(posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB).numpy().astype(float)
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none").numpy().astype(float)
    out = {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
    if per_prompt:
        out["per_prompt"] = {"psnr": psnr, "ssim": ssim}
    return out


# ------------------------------------------------------------------------------------------------ CLIP
def check_clip_dir(path: str) -> None:
    """A local transformers CLIP directory (config.json with model_type "clip"), else ``UsageError``."""
    cfg = os.path.join(str(path), "config.json")
    if not os.path.isdir(str(path)):
        raise UsageError(f"--clip-model {path!r} is not a directory; expected a local CLIP model directory "
                         "(transformers' CLIPModel with its processor, e.g. a copy of openai/clip-vit-large-patch14)")
    try:
        with open(cfg, encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "clip":
        raise UsageError(f"--clip-model {path!r} is not a CLIP directory (its config.json "
                         f"{'has model_type ' + repr(kind) if kind else 'is missing or unreadable'}; expected model_type "
                         "'clip', a transformers CLIPModel saved with its processor)")


def _tensor(out):
    return out if torch.is_tensor(out) else out.pooler_output


class _Tensors(torch.nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the embedding tensors, as torchmetrics'
    CLIP score expects (transformers 5 returns output objects whose ``pooler_output`` is the projected embedding)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(path: str, device: str = "cpu"):
    """(model, processor) of a local transformers CLIP directory (config.json with model_type "clip", weights,
    preprocessor and tokenizer files), else ``UsageError`` naming the directory."""
    check_clip_dir(path)
    from transformers import CLIPModel, CLIPProcessor

    from .io import quiet_loading

    try:
        with quiet_loading():
            model = _Tensors(CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device))
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise UsageError(f"--clip-model {path!r} could not be loaded as CLIP with its processor "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return model, processor


def clip_scores(images: np.ndarray, prompts: list[str], clip) -> np.ndarray:
    """torchmetrics' CLIP score of each image with its prompt (100 × cosine similarity, floored at 0)."""
    from torchmetrics.functional.multimodal import clip_score

    out = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Encountered caption longer than ...": CLIP reads 77 tokens
        for img, p in zip(images, prompts):
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
            out.append(float(clip_score(x, p, model_name_or_path=lambda: clip)))
    return np.asarray(out, dtype=float)


def clip_features(images: np.ndarray, clip, batch_size: int = 64) -> np.ndarray:
    """CLIP image embeddings (N, D) of uint8 images: the feature space of ``fid_kid``."""

    model, processor = clip
    dev = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            px = processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"].to(dev)
            f = model.get_image_features(pixel_values=px)
            feats.append(f.double().cpu().numpy())
    return np.concatenate(feats)


# ------------------------------------------------------------------------------------------- FID / KID
class _Given(torch.nn.Module):
    """Features already computed, handed to torchmetrics' FID/KID as their 'feature extractor'."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x.double()


def fid_kid(fake: np.ndarray, real: np.ndarray, boot: int = FID_BOOT, seed: int = 0) -> dict:
    """FID (with an interval from its bootstrap standard error over both sets' images) and KID (with its standard
    error over subsets) of two feature sets, by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(fake), len(real))
    if n < 2:
        raise UsageError(f"FID/KID need at least 2 images per set; got {len(fake)} and {len(real)}")
    a, b = torch.from_numpy(np.asarray(fake, dtype=np.float64)), torch.from_numpy(np.asarray(real, dtype=np.float64))
    fid = FrechetInceptionDistance(feature=_Given(a.shape[1]), normalize=False)

    def frechet(x, y):
        fid.reset()
        fid.update(y, real=True)
        fid.update(x, real=False)
        return float(fid.compute())

    value = frechet(a, b)
    rng = np.random.default_rng(seed)
    reps = [frechet(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(boot)]
    # resampling with replacement repeats images, which biases FID upwards, so the replicates' percentiles need not
    # bracket the estimate: the interval is the estimate +- 1.96 bootstrap standard errors (the sampling noise; FID's
    # own small-sample bias is not removed)
    se = float(np.std(reps, ddof=1)) if boot > 1 else float("nan")
    lo, hi = value - 1.96 * se, value + 1.96 * se
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Given(a.shape[1]), subsets=50, subset_size=max(2, n // 2),
                                      normalize=False)
    kid.update(b, real=True)
    kid.update(a, real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        k_mean, k_sd = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    k_se = float(k_sd) / math.sqrt(2)  # half-size subsets: their spread / sqrt(2) estimates the full set's error
    return {"fid": value, "fid_lo": float(lo), "fid_hi": float(hi), "fid_se": se, "kid": float(k_mean),
            "kid_sd": k_se, "kid_lo": float(k_mean) - 1.96 * k_se, "kid_hi": float(k_mean) + 1.96 * k_se}


# ----------------------------------------------------------------------------------------- real images
def image_files(folder: str, limit: int = MAX_REAL_IMAGES) -> list[str]:
    """The image files of a folder (its own, sorted; at most ``limit``), at least 2, else ``UsageError``."""
    if not os.path.isdir(folder):
        raise UsageError(f"--real-images {folder!r} is not a directory; expected a folder of images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, f)))[:limit]
    if len(names) < 2:
        raise UsageError(f"--real-images {folder!r} holds {len(names)} image(s) ({', '.join(IMAGE_SUFFIXES)}); FID/KID "
                         "need at least 2")
    return names


def read_images(folder: str, size: tuple[int, int], limit: int = MAX_REAL_IMAGES) -> np.ndarray:
    """The images of a folder (its own files, sorted), centre-cropped to the generated images' aspect and resized
    to ``size`` (H, W); uint8 (N, H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    names = image_files(folder, limit)
    h, w = size
    out = []
    for n in names:
        try:
            with Image.open(os.path.join(folder, n)) as im:
                im = im.convert("RGB")
                W, H = im.size
                s = min(W / w, H / h)
                cw, ch = w * s, h * s
                box = ((W - cw) / 2, (H - ch) / 2, (W + cw) / 2, (H + ch) / 2)
                out.append(np.asarray(im.resize((w, h), Image.Resampling.BICUBIC, box=box), dtype=np.uint8))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UsageError(f"--real-images: {os.path.join(folder, n)!r} cannot be read as an image "
                             f"({type(e).__name__})") from None
    return np.stack(out)


# ------------------------------------------------------------------------------------------- evaluation
def mean_interval(values) -> tuple[float, float, float]:
    """Mean over prompts and its 95% bootstrap interval."""
    v = np.asarray(values, dtype=float)[None]
    return paired_bootstrap(v, np.zeros_like(v))


def with_interval(out: dict, key: str, values) -> None:
    out[key], out[f"{key}_lo"], out[f"{key}_hi"] = mean_interval(values)


def evaluate_prompts(images: np.ndarray, prompts: list[str], reference: np.ndarray | None = None, clip=None,
                     real: np.ndarray | None = None) -> dict:
    """Every metric of a model's ``images`` of ``prompts`` (one per prompt), given the reference's images of the
    same prompts and seeds, a CLIP (model, processor) and real images, each where available. Per-prompt values
    are under ``per_prompt``."""
    out: dict = {"num_prompts": len(prompts)}
    pp: dict = {}
    if reference is not None:
        if reference.shape != images.shape:
            raise UsageError(f"the reference's images are {reference.shape[1]}x{reference.shape[2]} and the model's "
                             f"{images.shape[1]}x{images.shape[2]}: PSNR/SSIM compare images of one size; give a "
                             "reference pipeline of the same resolution")
        rec = reconstruction_metrics(images, reference, per_prompt=True)["per_prompt"]
        pp.update(psnr=rec["psnr"], ssim=rec["ssim"])
        with_interval(out, "psnr", rec["psnr"])
        with_interval(out, "ssim", rec["ssim"])
    if clip is not None:
        cs = clip_scores(images, prompts, clip)
        pp["clip_score"] = cs
        with_interval(out, "clip_score", cs)
        if reference is not None:
            cd = clip_scores(reference, prompts, clip)
            pp["clip_score_dense"] = cd
            with_interval(out, "clip_score_dense", cd)
            out["clip_score_diff"], out["clip_score_diff_lo"], out["clip_score_diff_hi"] = paired_bootstrap(
                cs[None], cd[None])
        other = real if real is not None else reference
        if other is not None:
            out.update(fid_kid(clip_features(images, clip), clip_features(other, clip)))
            out["fid_against"] = ("real images" if real is not None else "the reference's images") + \
                " (CLIP image-embedding space)"
    elif real is not None or reference is not None:
        out["fid_note"] = "FID/KID need --clip-model (their feature space; Inception cannot be fetched offline)"
    out["per_prompt"] = {k: [float(x) for x in v] for k, v in pp.items()}
    return out


def write_grid(path: str, prompts: list[str], model_images: np.ndarray, reference: np.ndarray | None,
               psnr=None, rows: int = 8) -> None:
    """Reference | model for the first ``rows`` prompts, each captioned with its prompt (and PSNR), as a PNG
    written atomically; its PNG text says obslib wrote it (``is_obslib_grid``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(rows, len(prompts))
    cols = 2 if reference is not None else 1
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.9 * n), squeeze=False)
    for i in range(n):
        pairs = ([("dense", reference[i])] if reference is not None else []) + [("pruned", model_images[i])]
        for j, (label, img) in enumerate(pairs):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            title = label if i == 0 else ""
            if label == "pruned" and psnr is not None:
                title = (title + " · " if title else "") + f"PSNR {psnr[i]:.1f} dB"
            ax.set_title(title, fontsize=8)
        axes[i, 0].set_ylabel("\n".join(textwrap.wrap(prompts[i], 28)[:3]), fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": "obslib evaluate"})
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except Exception as e:  # a full disk is one line naming the grid and its size
        from .owned import disk_full, is_disk_full

        if is_disk_full(e):
            raise disk_full(path, len(buf.getvalue())) from None
        raise
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def is_obslib_grid(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.text.get("Software") == "obslib evaluate"
    except Exception:  # anything that is not a readable PNG is not ours
        return False
