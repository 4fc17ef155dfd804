"""FLOPs per image of a pipeline's denoiser, counted by torch on one real call.

The denoiser's first call of a one-prompt sampling run is captured (its exact arguments: the CFG batch, the text
tokens, the latent size) and replayed under ``torch.utils.flop_counter.FlopCounterMode``; FLOPs per image =
steps x that call's FLOPs (with CFG the call holds the image twice, as every real sampling step does; under
FluxPipeline's true CFG a step makes two calls of one image each, so it counts twice). On CPU,
attention is counted through its math form (torch's counter has no formula for the CPU flash kernel). Text encoders
and the VAE are not counted: pruning changes neither.
"""
from __future__ import annotations

import torch

from .archs import find_denoiser
from .io import quiet_diffusers
from .sampling import CalibrationRunner


class _Captured(Exception):
    pass


def denoiser_call(pipe, prompt: str, guidance: float, call_kwargs: dict | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) of the denoiser's first call when the pipeline samples ``prompt`` (sampling stops there)."""
    _, den = find_denoiser(pipe)
    seen = {}

    def hook(module, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _Captured

    h = den.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        r = CalibrationRunner(pipe, [prompt], 1, guidance, 0, 1, call_kwargs, False)  # the prompt encoded as calibration does
        with torch.no_grad(), quiet_diffusers():
            pipe(**r.inputs[0], num_inference_steps=1, guidance_scale=guidance, output_type="latent", **r.call_kwargs)
    except _Captured:
        pass
    finally:
        h.remove()
    if "call" not in seen:
        raise RuntimeError("the pipeline never called its denoiser")
    return seen["call"]


def call_flops(den, call: tuple[tuple, dict]) -> int:
    """FLOPs of one denoiser call with these arguments."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = call
    on_cpu = next(den.parameters()).device.type == "cpu"
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        if on_cpu:
            with sdpa_kernel(SDPBackend.MATH):
                den(*args, **kwargs)
        else:
            den(*args, **kwargs)
    return int(fc.get_total_flops())


def flops_per_image(pipe, steps: int, guidance: float, prompt: str = "an image", call_kwargs: dict | None = None,
                    call: tuple | None = None) -> tuple[int, tuple]:
    """(denoiser FLOPs per image over ``steps`` steps, the captured call) — pass ``call`` back to count the same
    inputs again after pruning."""
    from .sampling import calls_per_step

    _, den = find_denoiser(pipe)
    call = call or denoiser_call(pipe, prompt, guidance, call_kwargs)
    return steps * calls_per_step(pipe, guidance) * call_flops(den, call), call
