"""Sampling for calibration: the model's sampling defaults, calibration prompts, and the runner that drives
the pipeline's own sampling loop (text encoded once, sampling to latents only) while hooks take statistics."""
from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from .archs import find_denoiser
from .errors import UsageError
from .hessian import Calibration
from .config import GUIDANCE, STEPS, is_kind
from .seeds import prompt_generators
from .io import DEFAULTS_FILE, quiet_diffusers, read_defaults
from .weighting import timestep_weights

GENERIC_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 7.0}  # the paper's calibration settings
MAX_SEQUENCE_LENGTH = 256  # T5 tokens per prompt unless the model's defaults file says otherwise
MAX_PROMPT_FILE = 64 * 2**20  # bytes


def sampling_defaults(pipe) -> dict:
    """The model's own sampling defaults (obslib_defaults.json in its directory) or the paper's."""
    return own_sampling_defaults(pipe) or dict(GENERIC_SAMPLING)


def own_sampling_defaults(pipe) -> dict | None:
    """The model's own sampling defaults (its obslib_defaults.json, checked), or None when it has none."""
    if not hasattr(pipe, "config") or not hasattr(pipe, "components"):
        raise UsageError(f"pipe must be a diffusers pipeline (obslib.load_pipeline(path)), got {type(pipe).__name__}")
    path = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    d = read_defaults(path) if path else None
    if d is None:
        return None
    d = {**GENERIC_SAMPLING, **d}
    msl = d.get("max_sequence_length", MAX_SEQUENCE_LENGTH)
    if not is_kind("int", d["num_inference_steps"]) or not is_kind("real", d["guidance_scale"]) \
            or d["num_inference_steps"] not in STEPS or d["guidance_scale"] not in GUIDANCE \
            or not is_kind("int", msl) or not 1 <= msl <= 4096 \
            or any(not is_kind("int", d[k]) or not 8 <= d[k] <= 16384 for k in ("height", "width") if k in d):
        raise UsageError(f"{os.path.join(path, DEFAULTS_FILE)!r} must hold num_inference_steps (integer in {STEPS}), "
                         f"guidance_scale (number in {GUIDANCE}) and optionally max_sequence_length (integer in [1, 4096]) "
                         "and height / width (integers in [8, 16384])")
    return d


CALL_KEYS = ("max_sequence_length", "height", "width")  # pipeline-call arguments a defaults file may fix


def call_kwargs(defaults: dict) -> dict:
    """The pipeline-call arguments a model's sampling defaults fix beyond steps and guidance: the text length and,
    where given, the image size."""
    return {k: v for k, v in defaults.items() if k in CALL_KEYS}


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line from a UTF-8 text file (blank lines skipped)."""
    if not os.path.exists(path):
        raise UsageError(f"prompt file {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path!r} is not a regular file (a directory, FIFO or device); expected a text "
                         "file, one prompt per line")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_FILE + 1)
    except OSError as e:
        raise UsageError(f"prompt file {path!r} cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_PROMPT_FILE:
        raise UsageError(f"prompt file {path!r} is larger than 64 MiB; expected one prompt per line")
    if b"\0" in data:
        raise UsageError(f"prompt file {path!r} is binary (it holds NUL bytes); expected UTF-8 text, one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path!r} is empty (need one prompt per line)")
    return prompts


def default_calibration_prompts(model_dir: str, n: int) -> list[str]:
    """The embedded model's own training prompts; other models must pass --prompts FILE."""
    meta = read_defaults(model_dir) or {}
    if meta.get("calibration_prompts") != "shapes-train":
        raise UsageError(f"{model_dir!r} has no default calibration set; pass --prompts FILE (one prompt per line)")
    from .shapes import prompts

    available = len(prompts("train"))
    if not 1 <= n <= available:
        raise UsageError(f"--num-prompts {n}: the shapes world's training split has {available} prompts; "
                         f"allowed: 1 to {available}")
    return prompts("train", n)


# Per pipeline class: how to encode prompts once, returning the keyword arguments of a pipeline call.
def _sd3_embeds(pipe, prompts, guidance, max_sequence_length):
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompts, None, None, device=pipe._execution_device, do_classifier_free_guidance=guidance > 1,
        max_sequence_length=max_sequence_length)
    out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    if guidance > 1:
        out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
    return out


def true_cfg(pipe) -> bool:
    """Whether the pipeline guides by ``true_cfg_scale`` with a negative prompt: a ``FluxPipeline`` whose transformer
    has no guidance embedding (the embedded Flux model; FLUX.1-dev's embedding takes ``guidance_scale`` instead).
    Its denoiser then runs twice per step, on the prompt and on the negative prompt."""
    t = getattr(pipe, "transformer", None)
    return type(pipe).__name__ == "FluxPipeline" and t is not None and not getattr(t.config, "guidance_embeds", True)


def calls_per_step(pipe, guidance: float | None = None) -> int:
    """Denoiser calls per sampling step at this guidance (None: the model's default): 2 under true CFG
    (``true_cfg``), else 1 (the other pipelines batch the guidance's two halves into one call)."""
    if not true_cfg(pipe):
        return 1
    g = sampling_defaults(pipe)["guidance_scale"] if guidance is None else guidance
    return 2 if g > 1 else 1


def guidance_kwargs(pipe, guidance: float, n_prompts: int) -> dict:
    """The pipeline-call arguments that apply ``guidance``: ``guidance_scale``, and under true CFG also
    ``true_cfg_scale`` with the empty negative prompt (what the embedded Flux model was trained to take)."""
    out = {"guidance_scale": guidance}
    if calls_per_step(pipe, guidance) == 2:
        out.update(true_cfg_scale=guidance, negative_prompt=[""] * n_prompts)
    return out


def _flux_embeds(pipe, prompts, guidance, max_sequence_length):
    device = pipe._execution_device
    pe, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=max_sequence_length)
    out = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    if calls_per_step(pipe, guidance) == 2:
        npe, npooled, _ = pipe.encode_prompt([""] * len(prompts), None, device=device,
                                             max_sequence_length=max_sequence_length)
        out.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled, true_cfg_scale=guidance)
    return out


PROMPT_ENCODERS = {"StableDiffusion3Pipeline": _sd3_embeds, "FluxPipeline": _flux_embeds}


class CalibrationRunner:
    """Runs the pipeline's own sampling loop over the calibration prompts, to latents only.

    Prompt ``i`` is sampled with the noise of ``prompt_seed(seed, i)``, whatever batch it lands in, so the
    statistics depend on the prompts and the seed, not on ``batch_size`` or on how prompts are dealt to processes
    (``keep``). Prompts are encoded once, on the first ``run``."""

    def __init__(self, pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch_size: int,
                 call_kwargs: dict | None = None, progress: bool = True):
        self.pipe, self.steps, self.guidance, self.seed, self.progress = pipe, steps, guidance, seed, progress
        self.prompts, self.batch_size = list(prompts), int(batch_size)
        self.call_kwargs = dict(call_kwargs or {})
        self.msl = self.call_kwargs.pop("max_sequence_length", MAX_SEQUENCE_LENGTH)
        self.indices = list(range(len(self.prompts)))  # the prompts this process samples (global numbers)
        self._inputs = None

    def keep(self, indices: list[int]) -> None:
        """Sample only these prompts (torch.distributed: this rank's share), each with its own seed."""
        self.indices = list(indices)
        self._inputs = None

    @property
    def calls_per_step(self) -> int:
        """Denoiser calls per sampling step (``calls_per_step``): what every calibration run tells its hooks."""
        return calls_per_step(self.pipe, self.guidance)

    @property
    def index_batches(self) -> list[list[int]]:
        """The kept prompts' numbers, in sampling batches of ``batch_size``."""
        return [self.indices[i:i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]

    @property
    def batches(self) -> list[list[str]]:
        return [[self.prompts[i] for i in b] for b in self.index_batches]

    @property
    def inputs(self) -> list[dict]:
        """Each batch's pipeline-call arguments (the prompts encoded once; ``call_kwargs`` completed on the way)."""
        if self._inputs is None:
            enc = PROMPT_ENCODERS.get(type(self.pipe).__name__)
            if enc is not None:
                try:
                    with torch.no_grad(), quiet_diffusers():
                        self._inputs = [enc(self.pipe, b, self.guidance, self.msl) for b in tqdm(
                            self.batches, desc=f"encode {len(self.indices)} prompts", leave=False,
                            disable=not self.progress)]
                except (AttributeError, TypeError, IndexError, KeyError) as e:
                    raise _misfit(self.pipe, e) from None
            else:
                self._inputs = [{"prompt": b} for b in self.batches]
                if "max_sequence_length" in _call_params(self.pipe):
                    self.call_kwargs["max_sequence_length"] = self.msl
        return self._inputs

    def run(self, calib: Calibration | None, desc: str = "calibration", latents: bool = False) -> list[torch.Tensor]:
        """Sample every batch to latents (``calib``, if given, counts the runs); with ``latents`` returns each batch's
        final latents (else an empty list)."""
        device = self.pipe._execution_device
        self.pipe.set_progress_bar_config(disable=not self.progress, leave=False, desc="steps")
        kept = []
        inputs = self.inputs
        for ids, inp in zip(self.index_batches, tqdm(inputs, desc=desc, leave=False, disable=not self.progress)):
            gens = prompt_generators(self.seed, ids, device)
            if calib is not None:
                calib.begin_run(ids, calls_per_step=self.calls_per_step)
            try:
                with torch.no_grad(), quiet_diffusers():
                    out = self.pipe(**inp, num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gens,
                                    output_type="latent", **self.call_kwargs)
                if latents:
                    kept.append(out.images)
            except (AttributeError, TypeError, IndexError, KeyError) as e:  # a pipeline whose parts do not fit
                raise _misfit(self.pipe, e) from None
            if calib is not None:
                calib.end_run()
        return kept


def _misfit(pipe, e: Exception) -> UsageError:
    """A pipeline whose parts do not fit its class (e.g. a wrong ``_class_name`` in model_index.json), in one line."""
    msg = " ".join(str(e).split())[:200]
    return UsageError(f"{type(pipe).__name__} could not sample for calibration ({type(e).__name__}: {msg}); is "
                      "model_index.json's pipeline class right for its components?")


def _call_params(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def collect_stats(pipe, layer_names: list[str], prompts: list[str], steps: int | None = None,
                  weighting: str = "log-decrease", guidance: float | None = None, seed: int = 0,
                  batch_size: int = 16, progress: bool = False, per_step: bool = False) -> dict:
    """Timestep-weighted input statistics (H, mean, per-step energy) of named denoiser layers; with ``per_step``
    each step's XᵀX is kept too (``LayerStats.step_H``)."""
    defaults = sampling_defaults(pipe)
    steps = steps or defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"] if guidance is None else guidance
    _, den = find_denoiser(pipe)
    calib = Calibration(den, {n: den.get_submodule(n) for n in layer_names}, timestep_weights(weighting, steps),
                        per_step=per_step)
    msl = call_kwargs(defaults)
    runner = CalibrationRunner(pipe, prompts, steps, guidance, seed, batch_size, msl, progress)
    with calib:
        runner.run(calib)
    return calib.stats
