"""I/O: atomic pipeline directories (safetensors + JSON only), JSON reports, and loading.

A pruned pipeline is written with diffusers' own ``save_pretrained`` into a temporary sibling directory
that is renamed into place only when complete, so a failed run never leaves a half-written output.
Structurally pruned transformers change shapes; they carry ``obslib_manifest.json`` listing the new
per-layer shapes and head counts, which ``load_pruned`` uses to rebuild the modules before loading.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch

MANIFEST = "obslib_manifest.json"


class UsageError(Exception):
    """Bad user input: reported as one line with exit code 2."""


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' warnings while sampling: the embedded model's placeholder T5 tokenizer makes the
    pipeline warn that captions are "truncated" to max_sequence_length on every call (its output is all zeros
    by design, so nothing is lost)."""
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity)


def atomic_dir(out: str):
    """Context manager yielding a temporary directory that replaces ``out`` on success."""

    class _Atomic:
        def __enter__(self):
            parent = os.path.dirname(os.path.abspath(out)) or "."
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            if os.path.exists(out):
                old = self.tmp + ".old"
                os.replace(out, old)
                os.replace(self.tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, out)
            return False

    return _Atomic()


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def save_pipeline(pipe, out: str, manifest: dict | None = None, extra_json: dict[str, object] | None = None) -> None:
    """Save a pipeline with safetensors; optional structured-pruning manifest and extra JSON files."""
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if manifest is not None:
            write_json(os.path.join(tmp, MANIFEST), manifest)
        for name, obj in (extra_json or {}).items():
            write_json(os.path.join(tmp, name), obj)


def check_pipeline_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise UsageError(f"{path!r} is not a diffusers pipeline directory (no model_index.json)")


def load_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load any pipeline directory offline; structured-pruned ones are rebuilt from their manifest."""
    check_pipeline_dir(path)
    if os.path.exists(os.path.join(path, MANIFEST)):
        return load_pruned(path, device=device, dtype=dtype)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    return _ready(pipe, device)


def _ready(pipe, device):
    pipe.to(device)
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pruned(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a structurally pruned pipeline written by ``obslib prune --pattern structured``."""
    check_pipeline_dir(path)
    from diffusers import DiffusionPipeline

    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    denoiser = manifest["component"]
    model = load_pruned_model(os.path.join(path, denoiser), _component_class(path, denoiser), manifest, dtype)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **{denoiser: model})
    return _ready(pipe, device)


def load_pruned_model(model_dir: str, cls, manifest: dict, dtype: torch.dtype = torch.float32):
    """Build ``cls`` from the config in ``model_dir``, resize it to the manifest, then load its weights."""
    from safetensors.torch import load_file

    from .structured import apply_manifest

    model = cls.from_config(cls.load_config(model_dir))
    apply_manifest(model, manifest)
    state = {}
    for fn in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        state.update(load_file(os.path.join(model_dir, fn)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: pruned weights do not match the manifest "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype).eval()


def _component_class(path: str, name: str):
    import diffusers

    with open(os.path.join(path, "model_index.json")) as f:
        library, clsname = json.load(f)[name]
    return getattr(diffusers, clsname)
