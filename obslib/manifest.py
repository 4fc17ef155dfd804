"""The manifest of a structurally pruned model: the layer shapes and head counts that differ from the model
its config builds, so that ``load_pruned`` can rebuild the modules before loading the weights."""
from __future__ import annotations

import torch.nn as nn

from .errors import UsageError
from .surgery import replace_module, set_heads


def linear_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {n: [m.out_features, m.in_features] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def head_counts(model: nn.Module) -> dict[str, int]:
    return {n: int(m.heads) for n, m in model.named_modules() if hasattr(m, "heads") and isinstance(getattr(m, "heads"), int)}


def make_manifest(component: str, model: nn.Module, reference_shapes: dict, reference_heads: dict) -> dict:
    """Shapes and head counts that differ from the unpruned model built from the same config."""
    from .processors import BY_KIND

    shapes = {n: s for n, s in linear_shapes(model).items() if reference_shapes.get(n) != s}
    heads = {n: h for n, h in head_counts(model).items() if reference_heads.get(n) != h}
    attention = {n: {"processor": m.processor.kind, "scale": m.processor.scale} for n, m in model.named_modules()
                 if isinstance(getattr(m, "processor", None), tuple(BY_KIND.values()))}
    out = {"format": "obslib-structured-v1", "component": component, "linear_shapes": shapes, "heads": heads}
    if attention:  # reshaped Q/K/V head dimensions (SlimDiff): processors and the original softmax scales
        out["attention"] = attention
    return out


def apply_manifest(model: nn.Module, manifest: dict) -> None:
    """Resize a freshly built model to the manifest's shapes (weights are loaded afterwards)."""
    shapes, heads = manifest.get("linear_shapes"), manifest.get("heads")
    if not isinstance(shapes, dict) or not isinstance(heads, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v) for v in shapes.values()) \
            or not all(isinstance(h, int) and h > 0 for h in heads.values()):
        raise UsageError("the manifest's linear_shapes must map names to [out, in] positive integers and its heads "
                         "to positive integers")
    names = dict(model.named_modules())
    missing = [n for n in list(shapes) + list(heads) + list(manifest.get("attention", {})) if n not in names]
    if missing:
        raise UsageError(f"the manifest names modules the model does not have ({', '.join(missing[:3])})")
    for name, (out_f, in_f) in manifest["linear_shapes"].items():
        old = model.get_submodule(name)
        replace_module(model, name, nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=old.weight.dtype))
    for name, h in manifest["heads"].items():
        set_heads(model.get_submodule(name), h)
    if manifest.get("attention"):
        from .processors import BY_KIND

        for name, a in manifest["attention"].items():
            if not isinstance(a, dict) or a.get("processor") not in BY_KIND or not isinstance(a.get("scale"), float):
                raise UsageError(f"the manifest's attention entry for {name} is malformed")
            model.get_submodule(name).set_processor(BY_KIND[a["processor"]](a["scale"]))


def config_reference(den) -> tuple[dict, dict]:
    """Layer shapes and head counts of the denoiser as its config builds it (on the meta device: no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        ref = type(den).from_config(den.config)
    return linear_shapes(ref), head_counts(ref)


def with_manifest(report: dict, den, component: str) -> dict:
    manifest = make_manifest(component, den, *config_reference(den))
    if manifest["linear_shapes"] or manifest["heads"] or manifest.get("attention"):
        report["manifest"] = manifest  # shapes differ from the config (now or from an earlier prune)
    return report
