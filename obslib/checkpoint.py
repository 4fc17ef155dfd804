"""Resumable package-by-package pruning.

After each package, the layers it changed (their weights and biases, whatever their new shapes) and the
head counts it changed go to ``checkpoint_dir/pkg-NNNN`` (safetensors + JSON, written under a temporary
name and renamed, so a directory that exists is complete), with the report so far and a fingerprint of
the configuration. A resumed run checks the fingerprint, re-applies the saved packages in order and
continues with the next one; calibration is a pure function of the model and the configuration, so the
result is bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from .io import UsageError

_KEYS = ("method", "pattern", "sparsity", "weighting", "alpha_min", "alpha_max", "packages", "calibration", "steps", "guidance",
         "seed", "batch_size", "blocksize", "percdamp", "solver_dtype", "block_range", "block_sparsity",
         "exclude_first_last", "head_saliency", "neuron_batch")


def fingerprint(cfg, units, steps: int) -> dict:
    d = {k: getattr(cfg, k) for k in _KEYS}
    d["steps_used"] = steps
    d["prompts_sha256"] = hashlib.sha256("\n".join(cfg.prompts or []).encode()).hexdigest()
    d["units"] = [[u.kind, *u.hessian_layers] for u in units]
    return json.loads(json.dumps(d))


class PackageCheckpoint:
    def __init__(self, path: str, fp: dict):
        self.path, self.fp = path, fp

    def saved(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return sorted(d for d in os.listdir(self.path)
                      if d.startswith("pkg-") and os.path.isfile(os.path.join(self.path, d, "meta.json")))

    def restore(self, den, undo, resume: bool) -> dict | None:
        """Re-apply the saved packages (with ``resume``); returns the saved state of the last one, or None."""
        entries = self.saved()
        if not entries:
            return None
        if not resume:
            raise UsageError(f"{self.path!r} holds the checkpoint of an interrupted run; pass --resume (resume=True) "
                             "to continue it, or delete that directory")
        state = None
        for e in entries:
            with open(os.path.join(self.path, e, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("fingerprint") != self.fp:
                raise UsageError(f"the checkpoint in {self.path!r} belongs to a different configuration or model; "
                                 "rerun with the same settings or delete it")
            _apply(den, load_file(os.path.join(self.path, e, "weights.safetensors")), meta["heads"], undo)
            state = meta["state"]
        return state

    def save(self, index: int, den, names: list[str], heads: dict[str, int], state: dict) -> None:
        os.makedirs(self.path, exist_ok=True)
        final = os.path.join(self.path, f"pkg-{index:04d}")
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {}
        for n in names:
            m = den.get_submodule(n)
            tensors[f"{n}.weight"] = m.weight.detach().contiguous().cpu()
            if getattr(m, "bias", None) is not None:
                tensors[f"{n}.bias"] = m.bias.detach().contiguous().cpu()
        save_file(tensors, os.path.join(tmp, "weights.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"fingerprint": self.fp, "package": index, "heads": heads, "state": state}, f)
        os.replace(tmp, final)


def _apply(den, tensors: dict, heads: dict, undo) -> None:
    from .structured import _linear_like, _set, set_heads

    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        w, b = tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
        m = den.get_submodule(name)
        with torch.no_grad():
            if tuple(m.weight.shape) == tuple(w.shape):
                undo.weight(name)
                m.weight.copy_(w.to(m.weight.device))
                if b is not None:
                    m.bias.copy_(b.to(m.bias.device))
            else:  # a structurally pruned layer: a smaller module takes its place
                undo.module(name)
                _set(den, name, _linear_like(m, w.to(m.weight.device), None if b is None else b.to(m.weight.device)))
    for name, h in heads.items():
        attn = den.get_submodule(name)
        undo.attrs(attn, ("heads", "inner_dim", "inner_kv_dim"))
        set_heads(attn, int(h))
