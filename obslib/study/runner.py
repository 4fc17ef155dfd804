"""The study: every notebook run in batch by papermill (``make study`` = ``python -m obslib.study``).

Each notebook has a ``parameters`` cell with ``mode = "full"``; ``make test`` runs the same notebooks
under nbval with ``OBSLIB_MODE=quick`` (tiny grids, outputs under .tmp/quick so committed results are
never touched). ``settings(mode)`` holds the grid sizes of both modes in one place.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..paths import embedded_model, repo_root

NOTEBOOKS = (
    "00_walkthrough.ipynb",
    "01_unstructured.ipynb",
    "02_semistructured.ipynb",
    "03_structured.ipynb",
    "04_weighting.ipynb",
    "05_packages.ipynb",
    "06_calibration_robustness.ipynb",
    "07_speed.ipynb",
    "08_timesteps.ipynb",
    "09_verdicts.ipynb",
    "10_carry_over.ipynb",
)

CARRY_NOTEBOOK = "10_carry_over.ipynb"  # needs the second model (``carry_model``): skipped while it is not there

_FULL = dict(seeds=[0, 1, 2], num_eval_prompts=64, num_calib=16,
             sparsities=[0.3, 0.5, 0.6, 0.7], structured_sparsities=[0.1, 0.2, 0.3],
             calib_sizes=[2, 4, 8, 16, 32, 64, 128], packages=[1, 2, 4, 8, "block", "unit"],
             cfg_values=[2.0, 4.0, 6.0], step_values=[10, 20, 40], timing_repeats=7, gf_iterations=400, gf_lr=2e-4,
             inject_windows=5, inject_structured=0.2, strength_ratios=[1.5, 4, 16, 100],
             sensitivity=[["unstructured", 0.5], ["unstructured", 0.6], ["2:4", 0.5]], refit_sparsities=[0.5, 0.6, 0.7],
             param_budgets=[0.1, 0.2, 0.3], head_seeds=[0, 1, 2, 3, 4, 5], floor_repeats=5, floor_warmup=1,
             verdict_seeds=[0, 1, 2, 3, 4], heldout_seeds=[100, 101, 102],
             verdict_more_seeds={"weighting 50%": [5, 6, 7, 8, 9]},  # 5 seeds left it at Holm p = 0.049
             verdict_families=["baselines 50%", "baselines 60%", "baselines 2:4", "structured l1", "weighting 50%",
                               "weighting 60% 2:4", "refit", "allocation unstructured", "structured allocation",
                               "structured slimdiff", "weighting 4:8", "weighting schemes 60%", "weighting strength 60%",
                               "one-sided weighting 60%", "sensitivity vs uniform", "sensitivity vs log-decrease",
                               "structured slimdiff nominal", "allocation part obs", "allocation part slimdiff",
                               "solver part", "calibration size", "robustness", "structured gradient flow", "packages",
                               "premise"],
             verdict_calib_sizes=[4, 16, 64], noise_floor=[["unstructured", 0.5], ["2:4", 0.5]], noise_threads=[1, 2],
             # chapter 10: the second model, and the comparisons rerun on it (family -> pairs kept, by context or
             # label; None: all), chosen to fit 45 minutes on 2 cores with its run cache empty
             carry_model="models/shapes-flux", carry_budgets=[0.1, 0.2, 0.3],
             carry_families={"baselines 60%": ["wanda"], "weighting 50%": None, "weighting strength 60%": ["log-decrease ×100"],
                             "refit": ["At 50% unstructured"], "allocation unstructured": ["At 50% unstructured"],
                             "structured allocation": ["At 20% of the parameters"],
                             "structured slimdiff": ["At 20% of the parameters"],
                             "packages": ["Propagate calibration"],
                             "premise": ["Halves, 50% unstructured", "Halves, equal-size noise"]})
_QUICK = dict(seeds=[0], num_eval_prompts=8, num_calib=4, sparsities=[0.5], structured_sparsities=[0.2],
              calib_sizes=[2, 4], packages=[1, 4], cfg_values=[4.0], step_values=[10], timing_repeats=2, gf_iterations=3,
              gf_lr=2e-4, inject_windows=5, inject_structured=0.2, strength_ratios=[100],
              sensitivity=[["unstructured", 0.5]], refit_sparsities=[0.5], param_budgets=[0.2], head_seeds=[0], floor_repeats=1, floor_warmup=0,
              verdict_seeds=[0], heldout_seeds=[100], verdict_more_seeds={}, verdict_families=["baselines 50%", "weighting 50%"],
              verdict_calib_sizes=[2, 4],
              noise_floor=[["unstructured", 0.5]], noise_threads=[1, 2],
              carry_model=None, carry_budgets=[0.2], carry_families={"weighting 50%": None})  # None: a tiny random Flux


def _root() -> str:
    return str(repo_root())


def rel(path: str) -> str:
    """A path as the notebooks print it: relative to the repository (never the running machine's absolute path)."""
    return os.path.relpath(os.path.abspath(path), _root())


def resolve_mode(mode: str) -> str:
    mode = os.environ.get("OBSLIB_MODE", mode)
    if mode not in ("full", "quick"):
        raise ValueError(f"mode {mode!r} is unknown; allowed: full, quick")
    return mode


def model_name(model_dir: str) -> str:
    """The subfolder of results/ and figures/ for a model's tables and figures: "" for the embedded SD3 model (the
    study's own folders), else the model directory's name (``models/shapes-flux`` -> "shapes-flux")."""
    if os.path.realpath(model_dir) == os.path.realpath(embedded_model()):
        return ""
    return os.path.basename(os.path.normpath(model_dir))


def settings(mode: str, model_dir: str | None = None) -> dict:
    """Grid sizes and output folders for a mode (after the OBSLIB_MODE override) and a model (``model_dir``, else
    OBSLIB_MODEL_DIR, else the embedded SD3 model). Another model's tables, figures and run cache go to its own
    subfolders (``model_name``), so its rows never sit beside the first model's; every row's key names its model
    anyway (``experiments.cache_tag``)."""
    mode = resolve_mode(mode)
    s = dict(_FULL if mode == "full" else _QUICK)
    model_dir = model_dir or os.environ.get("OBSLIB_MODEL_DIR") or embedded_model()
    base = _root() if mode == "full" else os.path.join(_root(), ".tmp", "quick")
    name = model_name(model_dir)
    results, figures = (os.path.join(base, "results", *[name] if name else []),
                        os.path.join(base, "figures", *[name] if name else []))
    if s["carry_model"]:  # chapter 10's second model, from the repository root (the notebooks run in notebooks/)
        s["carry_model"] = os.path.join(_root(), s["carry_model"])
    s.update(mode=mode, results=results, figures=figures, runs_csv=os.path.join(results, "runs.csv"),
             speed_real=os.path.join(_root(), "results", "speed_real.json"),  # a benchmark's, read in every mode
             model_dir=model_dir, model_name=name or os.path.basename(os.path.normpath(model_dir)))
    os.makedirs(s["results"], exist_ok=True)
    os.makedirs(s["figures"], exist_ok=True)
    return s


def run_study(names=NOTEBOOKS, mode: str = "full", out_dir: str | None = None, model_dir: str | None = None) -> dict:
    import papermill as pm

    # executed notebooks: results/notebooks for the study (results/<model>/notebooks for another model); quick runs
    # never replace those
    model_dir = None if model_dir is None else os.path.abspath(model_dir)  # the notebooks run in notebooks/
    S = settings(mode, model_dir)
    out_dir = out_dir or os.path.join(S["results"], "notebooks")
    params = {"mode": mode} if model_dir is None else {"mode": mode, "model_dir": model_dir}
    os.makedirs(out_dir, exist_ok=True)
    timing = {}
    t_all = time.perf_counter()
    if mode == "full" and tuple(names) == NOTEBOOKS and model_dir is None:
        from .model_report import main as model_report

        print("[0] default model report (results/default_model.json)", flush=True)
        t = time.perf_counter()
        model_report([])
        timing["default_model_report"] = time.perf_counter() - t
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", flush=True)
        second = S["carry_model"]
        if name == CARRY_NOTEBOOK and second and not os.path.exists(os.path.join(second, "model_index.json")):
            print(f"    skipped: its second model {rel(S['carry_model'])!r} is not there (`make model-flux` trains it)",
                  flush=True)
            timing[name] = 0.0
            continue
        t = time.perf_counter()
        pm.execute_notebook(os.path.join(_root(), "notebooks", name), os.path.join(out_dir, name),
                            parameters=params, cwd=os.path.join(_root(), "notebooks"), progress_bar=True,
                            kernel_name="python3")
        _relative_paths(os.path.join(out_dir, name))
        timing[name] = time.perf_counter() - t
        print(f"    {timing[name]:.0f} s", flush=True)
    if mode == "full" and tuple(names) == NOTEBOOKS and model_dir is None:
        from .claims import write_claims
        from ..io import write_json

        write_claims()
        timing["total"] = time.perf_counter() - t_all
        write_json(os.path.join(_root(), "results", "study_timing.json"),
                   {"seconds": timing, "cpu_threads": _threads(), "note": "wall time of `make study` per notebook"})
    timing["total"] = time.perf_counter() - t_all
    return timing


def _relative_paths(path: str) -> None:
    """papermill records the input and output paths in the notebook's metadata: keep them relative to the
    repository, so an executed notebook carries no path of the machine that ran it."""
    import nbformat

    from ..owned import write_text

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    for k in ("input_path", "output_path"):
        if meta.get(k):
            meta[k] = rel(meta[k])
    write_text(path, nbformat.writes(nb))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m obslib.study", description=__doc__)
    p.add_argument("notebooks", nargs="*", help="notebook names (default: all)")
    p.add_argument("--mode", default="full", choices=("full", "quick"))
    p.add_argument("--model-dir", help="another embedded model (e.g. models/shapes-flux): every notebook runs on it, "
                                       "its tables, figures and executed notebooks under results/<name>/ and "
                                       "figures/<name>/ (default: models/shapes-sd3)")
    a = p.parse_args(argv)
    if a.model_dir is not None and not os.path.isdir(a.model_dir):
        print(f"obslib.study: error: --model-dir {a.model_dir!r} is not a directory; allowed: a pipeline directory "
              "such as models/shapes-flux", file=sys.stderr)
        return 2
    names = a.notebooks or NOTEBOOKS
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        print(f"obslib.study: error: unknown notebook {unknown[0]!r}; allowed: {', '.join(NOTEBOOKS)}", file=sys.stderr)
        return 2
    t = run_study(names, a.mode, model_dir=a.model_dir)
    print(json.dumps({k: round(v, 1) for k, v in t.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
