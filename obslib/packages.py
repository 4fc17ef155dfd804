"""Module packages and the group-wise sequential driver.

Basic units (per block, from the architecture table) are listed block by block and split into K
contiguous packages of near-equal size. Package k is calibrated by full sampling runs through the model
in which packages 1..k-1 are already pruned; only its own Hessians are in memory. Text embeddings are
computed once and reused (text encoders are never pruned), and calibration samples to latents only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .archs import ArchSpec, attr_truthy, block_units, has, iter_blocks
from .hessian import Calibration
from .io import quiet_diffusers


@dataclass
class Unit:
    """A basic unit: layers pruned together from one calibration. ``kind`` is 'layers' (unstructured / N:M),
    'heads' or 'neurons' (structured); ``hessian_layers`` are the layers whose inputs are collected."""

    kind: str
    block: str
    block_index: int
    hessian_layers: list[str]
    group: object = None


def structured_units(denoiser: nn.Module, spec: ArchSpec, block_ids: list[int]) -> list[Unit]:
    units = []
    for bi, (bname, block) in enumerate(iter_blocks(denoiser, spec)):
        if bi not in block_ids or any(attr_truthy(block, p) for p in spec.skip_structured_if):
            continue
        for hg in spec.heads:
            outs = [f"{bname}.{o}" for o in hg.outs if has(block, o)]
            if outs and has(block, hg.attn):
                units.append(Unit("heads", bname, bi, outs, hg))
        for ng in spec.neurons:
            if has(block, ng.down):
                units.append(Unit("neurons", bname, bi, [f"{bname}.{ng.down}"], ng))
    return units


def layer_units(denoiser: nn.Module, spec: ArchSpec, block_ids: list[int]) -> list[Unit]:
    units = []
    for bi, (bname, block) in enumerate(iter_blocks(denoiser, spec)):
        if bi in block_ids:
            units += [Unit("layers", bname, bi, names) for names in block_units(bname, block, spec)]
    return units


def split_packages(units: list, k: int) -> list[list]:
    """K contiguous packages of near-equal size (the first ones one larger when it does not divide)."""
    k = max(1, min(k, len(units)))
    q, r = divmod(len(units), k)
    out, i = [], 0
    for j in range(k):
        n = q + (1 if j < r else 0)
        out.append(units[i:i + n])
        i += n
    return out


# Per pipeline class: how to encode prompts once, returning the keyword arguments of a pipeline call.
def _sd3_embeds(pipe, prompts, guidance, max_sequence_length):
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompts, None, None, device=pipe._execution_device, do_classifier_free_guidance=guidance > 1,
        max_sequence_length=max_sequence_length)
    out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    if guidance > 1:
        out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
    return out


PROMPT_ENCODERS = {"StableDiffusion3Pipeline": _sd3_embeds}


class CalibrationRunner:
    """Runs the pipeline's own sampling loop over the calibration prompts, to latents only."""

    def __init__(self, pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch_size: int,
                 call_kwargs: dict | None = None, progress: bool = True):
        self.pipe, self.steps, self.guidance, self.seed, self.progress = pipe, steps, guidance, seed, progress
        self.call_kwargs = dict(call_kwargs or {})
        self.batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        self.indices = list(range(len(self.batches)))  # global batch numbers (seeds); a rank keeps its share
        enc = PROMPT_ENCODERS.get(type(pipe).__name__)
        msl = self.call_kwargs.pop("max_sequence_length", 256)
        if enc is not None:
            with torch.no_grad(), quiet_diffusers():
                self.inputs = [enc(pipe, b, guidance, msl) for b in tqdm(
                    self.batches, desc=f"encode {len(prompts)} prompts", leave=False, disable=not progress)]
        else:
            self.inputs = [{"prompt": b} for b in self.batches]
            if "max_sequence_length" in _call_params(pipe):
                self.call_kwargs["max_sequence_length"] = msl

    def keep(self, indices: list[int]) -> None:
        """Sample only these batches (torch.distributed: this rank's share), each with its own seed."""
        self.indices = list(indices)
        self.batches = [self.batches[i] for i in self.indices]
        self.inputs = [self.inputs[i] for i in self.indices]

    def run(self, calib: Calibration, desc: str = "calibration") -> None:
        device = self.pipe._execution_device
        self.pipe.set_progress_bar_config(disable=not self.progress, leave=False, desc="steps")
        for i, inp in zip(self.indices, tqdm(self.inputs, desc=desc, leave=False, disable=not self.progress)):
            gen = torch.Generator(device=device).manual_seed(self.seed + i)
            calib.begin_run()
            try:
                with torch.no_grad(), quiet_diffusers():
                    self.pipe(**inp, num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gen,
                              output_type="latent", **self.call_kwargs)
            except (AttributeError, TypeError, IndexError, KeyError) as e:  # a pipeline whose parts do not fit
                from .io import UsageError

                msg = " ".join(str(e).split())[:200]
                raise UsageError(f"{type(self.pipe).__name__} could not sample for calibration ({type(e).__name__}: "
                                 f"{msg}); is model_index.json's pipeline class right for its components?") from None
            calib.end_run()


def _call_params(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def package_layers(denoiser: nn.Module, package: list[Unit]) -> dict[str, nn.Module]:
    return {n: denoiser.get_submodule(n) for u in package for n in u.hessian_layers}
