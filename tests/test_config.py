"""The configuration: one description per setting (its field's metadata) that the checks, the fingerprint and the
generated command line all read; fingerprints and the study's run-cache keys unchanged by the redesign."""
import hashlib
import json
import os
from dataclasses import fields

import pandas as pd
import pytest

from obslib.checkpoint import config_fingerprint
from obslib.cli import build_parser, config_from_args, private_notes
from obslib.config import ALPHA, Interval, PruneConfig, fingerprint_fields, option_flag, shown
from obslib.errors import UsageError
from obslib.methods import METHODS, private_owners
from obslib.paths import repo_root

# the fingerprint a checkpoint written before the redesign holds for PruneConfig(prompts=["a red circle"])
FINGERPRINT_SHA = "138a08985e3855e036454ee6a9ad077dd15cb645964b8c67f4ffe9e9a6b8346a"
FINGERPRINT_FIELDS = ("method", "pattern", "sparsity", "head_sparsity", "neuron_sparsity", "weighting", "alpha_min",
                      "alpha_max", "sensitivity_prompts", "sensitivity_windows", "packages", "calibration", "steps",
                      "guidance", "seed", "batch_size", "blocksize", "percdamp", "refit_iterations", "calib_tokens",
                      "param_budget", "allocation", "unit_sparsity", "solver_dtype", "block_range", "block_sparsity",
                      "exclude_first_last", "head_saliency", "neuron_batch", "iterations", "lr", "train_data",
                      "gradient_criterion", "extra")


def _args(*argv):
    return build_parser().parse_args(["prune", "MODEL", "--out", "OUT", *argv])


def test_fingerprints_are_those_of_existing_checkpoints():
    assert fingerprint_fields() == FINGERPRINT_FIELDS
    fp = config_fingerprint(PruneConfig(prompts=["a red circle"]))
    assert hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest() == FINGERPRINT_SHA


def test_every_committed_run_setting_keeps_its_key_and_builds_its_config():
    """Each setting of the committed run cache (results/runs.csv) still has the key it was stored under, and its
    prune settings still make a valid PruneConfig (the study builds it as ``experiments.pruned_pipeline`` does)."""
    from obslib.study.experiments import Setting

    runs = os.path.join(repo_root(), "results", "runs.csv")
    if not os.path.exists(runs):
        pytest.skip("no committed run cache in this checkout")
    keys = pd.read_csv(runs, usecols=["key"]).key.astype(str)
    settings = {k.split("|", 1)[1] for k in keys}
    assert len(settings) > 100
    for text in settings:
        d = json.loads(text)
        seed = d.pop("seed")
        s = Setting(**d)
        assert s.key(seed) == text
        if s.method == "dense":
            continue
        PruneConfig(method=s.method, pattern=s.pattern, sparsity=s.sparsity, weighting=s.weighting,
                    packages=s.packages, prompts=["a red circle"] * s.num_calib, steps=s.calib_steps, seed=seed,
                    **s.extra).validate()


def test_the_command_line_is_generated_from_the_fields():
    p = build_parser().parse_args(["prune", "MODEL", "--out", "OUT"])
    flagged = [f for f in fields(PruneConfig) if option_flag(f) is not None]
    assert len(flagged) >= 25
    for f in flagged:
        assert getattr(p, f.name) is None  # a flag left out takes the library's default, and is known to be left out
    # every flag's help states its default and its choices, from the same metadata
    sub = build_parser()._subparsers._group_actions[0].choices["prune"]
    helps = {a.dest: a.help for a in sub._actions}
    assert "(default: obs-diff)" in helps["method"] and "gradient-flow" in helps["method"]
    assert "(default: 0.01)" in helps["percdamp"] and "(default: the model's own, else 25)" in helps["steps"]
    # left out entirely, the configuration is the library's own (the CLI's run-control choices aside)
    cfg = config_from_args(p, None)
    lib = PruneConfig(measure_error=False, restore_on_failure=False)
    assert {f.name: getattr(cfg, f.name) for f in fields(cfg)} == {f.name: getattr(lib, f.name) for f in fields(lib)}


def _outside(b: Interval, kind: str):
    """A value just outside ``b`` (below its lower end)."""
    if kind == "int":
        return int(b.lo) - 1
    return float(b.lo) if b.lo_open else float(b.lo - 0.5 * max(abs(b.lo), 1e-3))


def test_every_bound_is_checked_once_with_the_same_words_from_python_and_the_command_line(capsys):
    from obslib.cli import main

    checked = 0
    for f in fields(PruneConfig):
        b, flag = f.metadata["bounds"], option_flag(f)
        if b is None or b.lo is None:
            continue
        v = _outside(b, f.metadata["kind"])
        with pytest.raises(UsageError) as e:
            PruneConfig(**{f.name: v}).validate()
        assert str(e.value).endswith(f"is outside {b}"), (f.name, str(e.value))
        if flag is not None:
            a = _args(flag, str(v))
            with pytest.raises(UsageError) as e2:
                config_from_args(a, None).validate()
            assert str(e2.value) == str(e.value) == f"{flag} {shown(v)} is outside {b}"
        checked += 1
    assert checked >= 15
    # through main: one line, exit 2
    assert main(["prune", "MODEL", "--percdamp", "-1.0", "--out", "OUT"]) == 2
    assert capsys.readouterr().err.strip() == "obslib: error: --percdamp -1.0 is outside [0, 10]"


def test_choices_and_cross_field_rules():
    with pytest.raises(UsageError, match=r"^--solver-dtype 'float16' is unknown; allowed: float32, float64$"):
        PruneConfig(solver_dtype="float16").validate()
    with pytest.raises(UsageError, match=r"^alpha_max / alpha_min 1e\+08 is outside \[1e-06, 1e\+06\]$"):
        PruneConfig(alpha_min=1e-4, alpha_max=1e4).validate()
    assert str(ALPHA) == "[1e-06, 1e+06]"
    with pytest.raises(UsageError, match=r"^--blocksize 6 must be a positive multiple of M=4$"):
        PruneConfig(pattern="2:4", blocksize=6).validate()
    # a typed key of extra
    with pytest.raises(UsageError, match=r"^extra\['dsnot_cycles'\]='5': expected an integer$"):
        PruneConfig(method="dsnot", extra={"dsnot_cycles": "5"}).validate()
    with pytest.raises(UsageError, match=r"^extra\['dsnot_cycles'\] 0 is outside \[1, 10000\]$"):
        PruneConfig(method="dsnot", extra={"dsnot_cycles": 0}).validate()
    PruneConfig(method="dsnot", extra={"dsnot_cycles": 5, "note": "kept"}).validate()


def test_interval_ends():
    i = Interval(0, 1, hi_open=True)
    assert 0 in i and 0.999 in i and 1 not in i and -1e-12 not in i and str(i) == "[0, 1)"
    j = Interval(0, 1, lo_open=True)
    assert 0 not in j and 1 in j and str(j) == "(0, 1]"
    assert 10**30 in Interval(1) and str(Interval(1)) == "[1, ∞)"


def test_private_settings_belong_to_their_methods():
    gf, obs = METHODS["gradient-flow"], METHODS["obs-diff"]
    assert private_owners("lr") == ["gradient-flow"] and private_owners("sparsity") == []
    assert private_owners("head_saliency") == ["obs-diff", "sparsegpt"]
    assert obs.ignored("lr") and not gf.ignored("lr") and not obs.ignored("head_saliency")
    assert METHODS["slimdiff"].ignored("head_saliency") and not obs.ignored("sparsity")
    notes = private_notes(_args("--lr", "1e-4", "--iterations", "5", "--neuron-batch", "4"), obs)
    assert notes == ["--iterations, --lr only apply to gradient-flow; ignored by obs-diff"]
    notes = private_notes(_args("--neuron-batch", "4"), gf)
    assert notes == ["--neuron-batch only applies to obs-diff, sparsegpt; ignored by gradient-flow"]
    # the help lists them under their methods
    sub = build_parser()._subparsers._group_actions[0].choices["prune"]
    titles = {g.title: [a.dest for a in g._group_actions] for g in sub._action_groups}
    assert set(titles["gradient-flow only"]) == {"iterations", "lr", "train_data", "gradient_criterion"}
    assert set(titles["obs-diff, sparsegpt only"]) == {"head_saliency", "neuron_batch"}
