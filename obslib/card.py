"""The model card (README.md) of every pipeline obslib writes, in the model-hub convention.

A YAML header (``library_name: diffusers``, ``base_model`` when the source is known by a hub name, tags), then
what was done in words and numbers: method, pattern, achieved sparsity and parameters, FLOPs, calibration
settings, the exact command, how to load the result, and its evaluation once ``obslib evaluate`` has scored
it (``with_evaluation``). Everything comes from ``pruning_report.json``; nothing here measures.
"""
from __future__ import annotations

import json
import os
import re

CARD = "README.md"
EVAL_START = "<!-- obslib:evaluation -->"  # the evaluation section sits between these markers
EVAL_END = "<!-- /obslib:evaluation -->"
METHOD_NAMES = {"obs-diff": "OBS-Diff", "sparsegpt": "SparseGPT", "wanda": "Wanda", "dsnot": "DSnoT",
                "magnitude": "magnitude", "l1-norm": "L1-norm", "flap": "FLAP", "slimdiff": "SlimDiff",
                "gradient-flow": "gradient-flow pruning"}
HUB_CACHE = re.compile(r"models--([^/\\]+)--([^/\\]+)")  # huggingface_hub's cache: models--ORG--NAME/snapshots/...
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model(source: str | None) -> str | None:
    """The hub name of the model a local directory holds, when it can be known offline: from a huggingface_hub
    cache path (``.../models--ORG--NAME/snapshots/REV``), or from the source's own model card when obslib wrote
    it (its ``base_model``); else None (a local model of unknown origin)."""
    if not source:
        return None
    m = HUB_CACHE.search(os.path.realpath(source).replace(os.sep, "/"))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    header = read_header(os.path.join(source, CARD))
    value = header.get("base_model")
    return value if isinstance(value, str) and HUB_ID.match(value) else None


def read_header(path: str) -> dict:
    """``key: value`` pairs of a card's YAML header (flat strings only; lists and the rest are skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(65536)
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    out = {}
    for line in text[4:text.index("\n---", 4) + 1].splitlines():
        k, sep, v = line.partition(":")
        if sep and not line.startswith((" ", "-")) and v.strip():
            out[k.strip()] = v.strip().strip("'\"")
    return out


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def card_text(report: dict, source: str | None, out_name: str, evaluation: dict | None = None) -> str:
    """The model card of a pruned pipeline written from ``report`` (``pruning_report.json``'s content)."""
    method, pattern = report.get("method", "?"), report.get("pattern", "?")
    name = METHOD_NAMES.get(method, method)
    structured = report.get("params_after", 0) < report.get("params_before", 0)
    base = base_model(source)
    src = os.path.basename(os.path.normpath(source)) if source else "a diffusers pipeline"
    lines = [f"# {out_name}", "",
             f"{base or src} with its denoiser ({report.get('component', 'transformer')}) pruned one-shot by "
             f"**{name}** ({pattern}), without training, by obslib from a local copy of "
             f"`{src}`. Written by obslib {report.get('obslib_version', '')}; `pruning_report.json` beside this card "
             "holds every number below and each layer's error.", ""]
    lines += _pruning_section(report, name, structured) + _calibration_section(report, name)
    t = report.get("timings") or {}
    if t.get("total_s") is not None:
        lines += ["", f"Pruning took {t['total_s']:.1f} s (calibration {t.get('calibration_s') or 0:.1f} s, "
                      f"solve {t.get('solve_s') or 0:.1f} s)."]
    lines += ["", "## Command", "", "```bash", report.get("command") or
              "# made with the Python API: obslib.prune(pipe, obslib.PruneConfig(...)); the settings are in "
              "pruning_report.json's config", "```", "", "## How to load it", ""]
    if structured:
        lines += ["Heads and neurons were removed, so the denoiser's shapes differ from its config; obslib rebuilds "
                  "it from `obslib_manifest.json`:", "", "```python", "import obslib", "",
                  f'pipe = obslib.load_pipeline("{out_name}")  # add device="cuda" on a GPU',
                  'image = pipe("a red circle").images[0]', "```"]
    else:
        lines += ["The weights keep their shapes (pruned ones are zero), so stock diffusers loads it:", "",
                  "```python", "from diffusers import DiffusionPipeline", "",
                  f'pipe = DiffusionPipeline.from_pretrained("{out_name}")',
                  'image = pipe("a red circle").images[0]', "```"]
    lines += ["", EVAL_START, *evaluation_section(evaluation), EVAL_END, ""]
    return "\n".join(_front_matter(method, pattern, base) + [""] + lines)


def _front_matter(method: str, pattern: str, base: str | None) -> list[str]:
    """The card's YAML header (the Hub's fields: library, base model, task, tags)."""
    tags = ["pruning", "obs-diff" if method == "obs-diff" else method, "obslib", "text-to-image",
            "structured-sparsity" if pattern == "structured" else ("n:m-sparsity" if ":" in pattern else "unstructured-sparsity")]
    head = ["---", "library_name: diffusers"]
    if base:
        head.append(f"base_model: {_yaml_str(base)}")
    head.append("pipeline_tag: text-to-image")
    head.append("tags:")
    head += [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    head.append("---")
    return head


def _pruning_section(report: dict, name: str, structured: bool) -> list[str]:
    """The card's "Pruning" table: method, pattern, allocation and budget, sparsity, parameters, FLOPs, blocks."""
    method, pattern = report.get("method", "?"), report.get("pattern", "?")
    before, after = report.get("params_before"), report.get("params_after")
    lines = ["## Pruning", "", "| | |", "|---|---|", f"| method | {name} (`{method}`) |", f"| pattern | {pattern} |"]
    if report.get("allocation"):
        lines.append(f"| allocation | {report['allocation']} |")
    if report.get("param_budget") is not None:
        lines.append(f"| parameter budget | {_pct(report['param_budget'])} of the targeted layers |")
    lines.append(f"| sparsity asked / achieved | {_pct(report.get('sparsity_target'))} / "
                 f"{_pct(report.get('sparsity_actual'))} of the targeted layers |")
    if before:
        if structured:
            lines.append(f"| denoiser parameters | {before:,} → {after:,} ({_pct(1 - after / before)} removed) |")
        else:
            lines.append(f"| denoiser parameters | {before:,} (unchanged: pruned weights are zeros; a sparse kernel "
                         "or N:M hardware turns them into speed) |")
    for k, label in (("heads_removed", "attention heads removed"), ("neurons_removed", "FFN neurons removed")):
        if report.get(k):
            lines.append(f"| {label} | {report[k]:,} |")
    fl = report.get("flops_per_image") or {}
    if fl.get("ratio") is not None:
        lines.append(f"| denoiser FLOPs per image | {fl['pruned'] / 1e9:.4g} G ({_pct(fl['ratio'])} of dense; all "
                     "steps, CFG batch included) |")
    blocks = report.get("blocks")
    if blocks:
        lines.append(f"| blocks pruned | {len(blocks)} ({blocks[0]}–{blocks[-1]}) |")
    return lines


def _calibration_section(report: dict, name: str) -> list[str]:
    """The card's "Calibration" table (prompts, sampling, weighting, packages, seed, tokens, processes), or the
    sentence that the method reads no calibration samples."""
    lines = ["", "## Calibration", ""]
    if not report.get("num_calibration_prompts"):
        return lines + [f"{name} reads no calibration samples"
                        + (" (it trains its gates on images)." if report.get("method") == "gradient-flow" else ".")]
    cfg = report.get("config") or {}
    tokens = report.get("calib_tokens")
    lines += ["| | |", "|---|---|",
              f"| prompts | {report['num_calibration_prompts']} |",
              f"| sampling steps / guidance | {report.get('steps')} / {report.get('guidance')} |",
              f"| timestep weighting | {report.get('weighting')} (α from {cfg.get('alpha_min')} to "
              f"{cfg.get('alpha_max')}) |",
              f"| module packages | {report.get('packages')} ({report.get('calibration')}) |",
              f"| seed | {report.get('seed')} (one noise seed per prompt, `{report.get('seeding', '?')}`) |",
              f"| tokens per image and step in the Hessians | {tokens if tokens else 'all'} |"]
    d = report.get("distributed")
    if d:
        lines.append(f"| processes | {d.get('world_size')} ({d.get('backend')}) |")
    return lines


def evaluation_section(ev: dict | None) -> list[str]:
    """The card's evaluation: the numbers of ``obslib evaluate``'s metrics file, each with its interval."""
    if not ev:
        return ["## Evaluation", "", "Not evaluated yet: `obslib evaluate THIS_DIR --reference DENSE_DIR --prompts "
                "FILE --out metrics.json` scores it against its dense parent and writes the numbers here."]
    out = ["## Evaluation", "", f"`{ev.get('command') or 'obslib evaluate'}` on {ev.get('num_prompts')} prompts "
           f"({ev.get('prompt_source', 'the shapes world')}), {ev.get('steps')} steps, guidance {ev.get('guidance')}, "
           f"seed {ev.get('seed')}:", "", "| metric | value | 95% interval |", "|---|---|---|"]
    for key, label, digits in (("prompt_fidelity", "prompt fidelity", 3), ("psnr", "PSNR vs dense (dB)", 2),
                               ("ssim", "SSIM vs dense", 4), ("clip_score", "CLIP score", 2),
                               ("clip_score_dense", "CLIP score of the dense model", 2),
                               ("fid", "FID", 3), ("kid", "KID", 5)):
        v = ev.get(key)
        if v is None:
            continue
        lo, hi = ev.get(f"{key}_lo"), ev.get(f"{key}_hi")
        if lo is None and key == "kid" and ev.get("kid_sd") is not None:
            lo, hi = v - 1.96 * ev["kid_sd"], v + 1.96 * ev["kid_sd"]
        ci = f"{lo:.{digits}f} – {hi:.{digits}f}" if lo is not None and hi is not None else "—"
        out.append(f"| {label} | {v:.{digits}f} | {ci} |")
    if ev.get("fid_against"):
        out += ["", f"FID/KID against {ev['fid_against']}."]
    if ev.get("grid"):
        out += ["", f"![dense | pruned]({ev['grid']})"]
    return out


def with_evaluation(text: str, ev: dict) -> str:
    """``text`` (a card obslib wrote) with its evaluation section replaced by ``ev``'s."""
    a, b = text.find(EVAL_START), text.find(EVAL_END)
    if a < 0 or b < a:
        return text.rstrip("\n") + "\n\n" + "\n".join([EVAL_START, *evaluation_section(ev), EVAL_END]) + "\n"
    return text[:a] + "\n".join([EVAL_START, *evaluation_section(ev), EVAL_END]) + text[b + len(EVAL_END):]


def add_evaluation(model_dir: str, ev: dict) -> bool:
    """Write ``ev`` (``obslib evaluate``'s metrics) into ``model_dir``'s card when obslib wrote that card and nobody
    changed it since; True if it did. A card a person edited, or a model obslib did not write, is left alone."""
    from .owned import is_listed_unchanged, replace_listed_text

    if not is_listed_unchanged(model_dir, CARD):
        return False
    with open(os.path.join(model_dir, CARD), encoding="utf-8") as f:
        text = f.read()
    replace_listed_text(model_dir, CARD, with_evaluation(text, ev))
    return True
