"""Never lose a user's files, never a traceback on bad input, never NaN: output safety, input checks,
solver faults and restore-on-failure (issue 10)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import obslib
from obslib.config import PruneConfig
from obslib.io import UsageError, check_output_dir, clean_stale, write_json
from obslib.obs import SolverError, damped_inverse, obs_prune
from obslib.owned import sha256_file, write_file_list
from obslib.shapes import prompts
from obslib.structured import prune_neurons

QUICK = dict(prompts=prompts("train", 2), steps=2, batch_size=2, packages=1, progress=False)


def tree(path):
    """Every file under ``path`` with its bytes (to show a directory survived untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def cli(argv, capsys):
    from obslib.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def one_line(rc, err, needle):
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("obslib: error:") and needle in err[0], err


@pytest.fixture
def model_copy(tiny_pipe_dir, tmp_path):
    d = tmp_path / "models" / "mine"
    shutil.copytree(tiny_pipe_dir, d)
    return d


# ------------------------------------------------------------------------------------- output safety
@pytest.mark.parametrize("where, needle", [
    ("model", "is the model directory itself"),
    ("inside", "lies inside the model directory"),
    ("parent", "contains the model directory"),
    ("grandparent", "contains the model directory"),
])
def test_out_overlapping_the_model_is_refused_before_work(model_copy, capsys, where, needle):
    out = {"model": model_copy, "inside": model_copy / "transformer" / "pruned", "parent": model_copy.parent,
           "grandparent": model_copy.parent.parent}[where]
    before = tree(model_copy.parent.parent)
    rc, err = cli(["prune", model_copy, "--num-prompts", "2", "--steps", "2", "--out", out, "--overwrite"], capsys)
    one_line(rc, err, needle)
    assert tree(model_copy.parent.parent) == before


def test_out_through_a_symlink_to_the_model_is_refused(model_copy, tmp_path, capsys):
    link = tmp_path / "alias"
    os.symlink(model_copy.parent, link)
    rc, err = cli(["prune", model_copy, "--num-prompts", "2", "--out", link / "mine" / "x"], capsys)
    one_line(rc, err, "lies inside the model directory")


def test_existing_outputs_need_overwrite_and_must_be_ours(model_copy, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    base = ["prune", model_copy, "--num-prompts", "2", "--steps", "2", "--packages", "1", "--quiet"]
    one_line(*cli(base + ["--out", foreign], capsys), "exists and is not empty")
    one_line(*cli(base + ["--out", foreign, "--overwrite"], capsys), "was not written by obslib")
    one_line(*cli(base + ["--out", a_file, "--overwrite"], capsys), "is an existing file")
    assert tree(foreign) == {"holiday.jpg": b"\xff\xd8 not ours"} and a_file.read_text() == "keep me"
    # an obslib output is replaced with --overwrite (atomically, nothing left beside it)
    out = tmp_path / "pruned"
    assert cli(base + ["--out", out, "--sparsity", "0.3"], capsys)[0] == 0
    one_line(*cli(base + ["--out", out], capsys), "pass --overwrite")
    assert json.load(open(out / "pruning_report.json"))["sparsity_target"] == 0.3
    assert cli(base + ["--out", out, "--sparsity", "0.5", "--overwrite"], capsys)[0] == 0
    rep = json.load(open(out / "pruning_report.json"))
    assert rep["sparsity_target"] == 0.5 and rep["written_by"] == "obslib"
    assert sorted(os.listdir(tmp_path)) == ["models", "notes.txt", "photos", "pruned"]
    # an empty directory is a fine destination
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(base + ["--out", empty], capsys)[0] == 0 and (empty / "pruning_report.json").exists()


def test_a_copied_report_does_not_make_a_user_folder_replaceable(model_copy, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    write_json(str(folder / "pruning_report.json"), {"written_by": "obslib", "method": "x"})
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--out", folder, "--overwrite"], capsys),
             "was not written by obslib (it has no obslib_files.json")
    write_json(str(folder / "obslib_files.json"), {"written_by": "obslib", "files": {
        "pruning_report.json": {"bytes": os.path.getsize(folder / "pruning_report.json"),
                                "sha256": sha256_file(str(folder / "pruning_report.json"))}}})
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--out", folder, "--overwrite"], capsys),
             "holds files obslib did not write (notes.txt)")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "obslib_training.json").write_text("[]")
    (trained / "data.csv").write_text("1,2")
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--out", trained, "--overwrite"], capsys),
             "was not written by obslib")
    assert (folder / "notes.txt").read_text() == "mine" and (trained / "data.csv").exists()
    long = tmp_path / ("x" * 240)
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--out", long], capsys), "at most 200 are allowed")


def test_a_destination_written_meanwhile_is_never_replaced(tiny_pipe, tmp_path):
    """Two runs to the same new --out: the one that finishes second must not replace the first one's output."""
    out = tmp_path / "co"
    rep = {"method": "magnitude"}

    def racing(self, d, **kw):  # while this run saves, another run completes the same destination
        out.mkdir()
        write_json(str(out / "pruning_report.json"), {"written_by": "obslib", "method": "other"})
        return real(self, d, **kw)

    real = type(tiny_pipe).save_pretrained
    type(tiny_pipe).save_pretrained = racing
    try:
        with pytest.raises(UsageError, match="created by another process|written by another process"):
            obslib.save_pruned(tiny_pipe, rep, str(out))
    finally:
        type(tiny_pipe).save_pretrained = real
    assert json.load(open(out / "pruning_report.json"))["method"] == "other"
    assert sorted(os.listdir(tmp_path)) == ["co"]


def test_outputs_get_the_usual_permissions(tiny_pipe, tmp_path):
    old = os.umask(0o022)
    try:
        obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(tmp_path / "o"))
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "o").st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("defaults, needle", [
    ({"max_sequence_length": -5}, "max_sequence_length"),
    ({"max_sequence_length": "x"}, "max_sequence_length"),
    ({"num_inference_steps": 100000000}, "num_inference_steps (integer in [1, 10000])"),
])
def test_broken_sampling_defaults_are_one_line(model_copy, tmp_path, capsys, defaults, needle):
    f = model_copy / "obslib_defaults.json"
    write_json(str(f), {**json.load(open(f)), **defaults})
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--quiet", "--out", tmp_path / "o"], capsys), needle)


def test_wrong_pipeline_class_and_bad_manifest_are_one_line(model_copy, tmp_path, capsys):
    idx = json.load(open(model_copy / "model_index.json"))
    json.dump({**idx, "_class_name": "FluxPipeline"}, open(model_copy / "model_index.json", "w"))
    rc, err = cli(["prune", model_copy, "--num-prompts", "2", "--steps", "2", "--quiet", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("obslib: error:"), err
    json.dump(idx, open(model_copy / "model_index.json", "w"))
    write_json(str(model_copy / "obslib_manifest.json"), {"format": "obslib-structured-v1", "component": "transformer",
                                                        "linear_shapes": {}, "heads": {"transformer_blocks.1.attn": -3}})
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--quiet", "--out", tmp_path / "o"], capsys),
             "heads to positive integers")


def test_unwritable_or_missing_parent_and_full_disk(model_copy, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="parent directory .* does not exist"):
        check_output_dir(tmp_path / "no" / "such" / "out", [model_copy])
    ro = "/proc/obslib-out" if os.geteuid() == 0 else str(tmp_path / "ro" / "out")
    if os.geteuid() != 0:
        os.mkdir(tmp_path / "ro", 0o555)
    with pytest.raises(UsageError, match="cannot write in"):
        check_output_dir(ro, [model_copy])
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(UsageError, match="free; the output needs about"):
        check_output_dir(tmp_path / "out", [model_copy], need_bytes=50 * 2**20)


def test_read_only_out_is_found_before_the_prune(model_copy, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs a read-only location; /proc is one for root")
    rc, err = cli(["prune", model_copy, "--num-prompts", "2", "--out", "/proc/obslib-out"], capsys)
    one_line(rc, err, "cannot write in")


def _marked_dead(d, purpose, pid):
    """A scratch folder as a killed obslib process leaves it: its marker names the folder and the (dead) PID."""
    from obslib import owned

    owned.mark_scratch(str(d), purpose)
    m = json.load(open(d / owned.SCRATCH))
    m["pid"] = pid
    (d / owned.SCRATCH).write_text(json.dumps(m))


def test_stale_temporaries_of_a_killed_run_are_cleaned(tmp_path):
    out = tmp_path / "out"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in (f".obslib-tmp-out-{dead}-abc123", f".obslib-tmp-other-{dead}-abc123"):
        (tmp_path / name).mkdir()
        _marked_dead(tmp_path / name, "tmp", dead)
    (tmp_path / f".obslib-tmp-out-{os.getpid()}-live99").mkdir()  # a live run's: left alone
    done = clean_stale(out)
    assert done == [f"removed .obslib-tmp-out-{dead}-abc123"]  # another destination's: left alone
    assert sorted(os.listdir(tmp_path)) == [f".obslib-tmp-other-{dead}-abc123", f".obslib-tmp-out-{os.getpid()}-live99"]
    # a kill between the two renames of a replacement: --out missing, the old one parked -> put back
    old = tmp_path / f".obslib-old-out-{dead}-xyz"
    old.mkdir()
    (old / "pruning_report.json").write_text("{}")
    write_file_list(str(old))
    _marked_dead(old, "old", dead)
    clean_stale(out)
    assert (out / "pruning_report.json").read_text() == "{}" and not old.exists()
    assert sorted(os.listdir(out)) == ["obslib_files.json", "pruning_report.json"]  # the marker is not carried in


def test_sigkill_while_saving_leaves_out_untouched_and_next_run_cleans(tiny_pipe_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_json(str(out / "pruning_report.json"), {"written_by": "obslib", "marker": 1})
    write_file_list(str(out))  # an earlier obslib output: every file on its list
    script = f"""
import os, signal, obslib
pipe = obslib.load_pipeline({tiny_pipe_dir!r})
real = type(pipe).save_pretrained
def dying(self, d, **kw):
    real(self, d, **kw)          # a complete copy in the temporary directory ...
    os.kill(os.getpid(), signal.SIGKILL)   # ... and killed before the swap
type(pipe).save_pretrained = dying
obslib.save_pruned(pipe, {{"method": "magnitude"}}, {str(out)!r}, overwrite=True)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert json.load(open(out / "pruning_report.json"))["marker"] == 1  # untouched
    assert any(n.startswith(".obslib-tmp-out-") for n in os.listdir(tmp_path))  # the killed run's leftover
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    obslib.save_pruned(pipe, {"method": "magnitude"}, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert json.load(open(out / "pruning_report.json"))["method"] == "magnitude"


def test_failed_save_and_exchange_fallback(tiny_pipe, tmp_path, monkeypatch):
    import obslib.io as io

    out = tmp_path / "out"
    out.mkdir()
    write_json(str(out / "pruning_report.json"), {"written_by": "obslib", "marker": 1})
    write_file_list(str(out))  # an earlier obslib output: every file on its list

    def broken(self, d, **kw):
        open(os.path.join(d, "half.safetensors"), "wb").write(b"x")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(type(tiny_pipe), "save_pretrained", broken)
        with pytest.raises(UsageError, match="no space left on the device while writing"):
            obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and json.load(open(out / "pruning_report.json"))["marker"] == 1
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "model_index.json").exists()


def test_save_pruned_refuses_the_models_own_directory(model_copy):
    pipe = obslib.load_pipeline(str(model_copy))
    before = tree(model_copy)
    rep = obslib.prune(pipe, PruneConfig(method="magnitude", measure_error=False, **QUICK))
    for out, kw in ((model_copy, {}), (model_copy, {"overwrite": True}), (model_copy.parent, {"overwrite": True})):
        with pytest.raises(UsageError):
            obslib.save_pruned(pipe, rep, str(out), **kw)
    assert tree(model_copy) == before


# -------------------------------------------------------------------------------------- bad inputs
def corrupt(model, how):
    st = model / "transformer" / "diffusion_pytorch_model.safetensors"
    if how == "truncated_weights":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif how == "garbage_weights":
        st.write_bytes(b"\x00" * 64)
    elif how == "missing_weights":
        st.unlink()
    elif how == "bad_index":
        (model / "model_index.json").write_text("{ not json")
    elif how == "bad_config":
        (model / "transformer" / "config.json").write_text("[1, 2")
    elif how == "missing_component":
        shutil.rmtree(model / "vae")
    elif how == "pickle_weights":
        sd = __import__("safetensors.torch", fromlist=["load_file"]).load_file(st)
        torch.save(sd, model / "transformer" / "diffusion_pytorch_model.bin")
        st.unlink()


@pytest.mark.parametrize("how, needle", [
    ("truncated_weights", "could not load a pipeline"),
    ("garbage_weights", "could not load a pipeline"),
    ("missing_weights", "no file named diffusion_pytorch_model.safetensors"),
    ("bad_index", "model_index.json is unreadable"),
    ("bad_config", "could not load a pipeline"),
    ("missing_component", "missing component folder(s) vae"),
    ("pickle_weights", "pickle-format weights"),
])
def test_broken_models_are_one_line_on_both_commands(model_copy, tmp_path, capsys, how, needle):
    corrupt(model_copy, how)
    before = tree(model_copy)
    out = tmp_path / "out"
    one_line(*cli(["prune", model_copy, "--num-prompts", "2", "--steps", "2", "--quiet", "--out", out], capsys), needle)
    one_line(*cli(["evaluate", model_copy, "--num-prompts", "2", "--steps", "2", "--out", tmp_path / "m.json"], capsys),
             needle)
    with pytest.raises(UsageError, match="could not load|model_index|missing component|pickle"):
        obslib.load_pipeline(str(model_copy))
    assert not out.exists() and not (tmp_path / "m.json").exists() and tree(model_copy) == before


def _prompt_file(tmp_path, kind):
    f = tmp_path / f"{kind}.txt"
    f.write_bytes({"binary": b"a red circle\n\x00\x01\x02", "latin1": "a r\xe9d circle\n".encode("latin-1")}[kind])
    return str(f)


@pytest.mark.parametrize("args, needle", [
    (["--guidance", "nan"], "guidance=nan (float): expected a finite number"),
    (["--guidance", "inf"], "guidance=inf"),
    (["--guidance", "-1"], "--guidance -1.0 is outside [0, 1000]"),
    (["--seed", str(2**70)], "is outside [0, 2**63 - 2**32)"),
    (["--seed", "-1"], "--seed -1 is outside"),
    (["--num-prompts", "1000000000"], "allowed: 1 to"),
    (["--packages", "1000"], "packages K=1000 exceeds the"),
    (["--device", "warp-drive"], "device 'warp-drive' is not usable here"),
    (["--device", "cuda:7"], "device 'cuda:7' is not usable here"),
    (["--device", "meta"], "device 'meta' is not usable here"),
    (["--device", "cpu:99"], "device 'cpu:99' is not usable here"),
    (["--prompts", ""], "--prompts '': expected a path"),
    (["--prompts", "/tmp"], "is not a regular file"),
    (["--prompts", "BINARY"], "is binary"),
    (["--prompts", "LATIN1"], "is not UTF-8 text (byte 0xe9"),
    (["--block-range", "3", "1"], "block range"),
    (["--dtype", "float8"], "dtype 'float8' is unknown"),
])
def test_bad_prune_arguments_are_one_line(tiny_pipe_dir, tmp_path, capsys, args, needle):
    args = [_prompt_file(tmp_path, a.lower()) if a in ("BINARY", "LATIN1") else a for a in args]
    if "--device" in args and args[-1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    if "--num-prompts" not in args and "--prompts" not in args:
        args += ["--num-prompts", "2"]
    out = tmp_path / "out"
    rc, err = cli(["prune", tiny_pipe_dir, "--steps", "2", "--quiet", *args, "--out", out], capsys)
    one_line(rc, err, needle)
    assert not out.exists() and os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if p.endswith(".txt")]


@pytest.mark.parametrize("args, needle", [
    (["--num-prompts", "1"], "allowed: 2 to"),
    (["--seed", str(2**70)], "--seed"),
    (["--guidance", "nan"], "--guidance nan"),
    (["--device", "cuda:7"], "device 'cuda:7' is not usable here"),
])
def test_bad_evaluate_arguments_are_one_line(tiny_pipe_dir, tmp_path, capsys, args, needle):
    if "--num-prompts" not in args:
        args = args + ["--num-prompts", "4"]
    rc, err = cli(["evaluate", tiny_pipe_dir, "--steps", "2", *args, "--out", tmp_path / "m.json"], capsys)
    one_line(rc, err, needle)
    assert not (tmp_path / "m.json").exists()


def test_evaluate_refuses_an_unsupported_pipeline_and_a_foreign_out_file(tiny_pipe_dir, tmp_path, capsys):
    m = tmp_path / "sdxl"
    shutil.copytree(tiny_pipe_dir, m)
    idx = json.load(open(m / "model_index.json"))
    json.dump({**idx, "_class_name": "StableDiffusionXLPipeline"}, open(m / "model_index.json", "w"))
    one_line(*cli(["evaluate", m, "--num-prompts", "4", "--out", tmp_path / "m.json"], capsys),
             "is a StableDiffusionXLPipeline; the shapes-world evaluator scores")
    precious = tmp_path / "thesis.tex"
    precious.write_text("\\chapter{x}")
    one_line(*cli(["evaluate", tiny_pipe_dir, "--num-prompts", "4", "--out", precious], capsys),
             "is not an obslib metrics file")
    assert precious.read_text() == "\\chapter{x}"
    pkg = tmp_path / "package.json"  # a JSON object, but not ours
    pkg.write_text('{"name": "my-app"}')
    one_line(*cli(["evaluate", tiny_pipe_dir, "--num-prompts", "4", "--out", pkg], capsys), "not an obslib metrics file")
    link = tmp_path / "link.json"
    os.symlink(pkg, link)
    one_line(*cli(["evaluate", tiny_pipe_dir, "--num-prompts", "4", "--out", link], capsys), "is a symbolic link")
    for bad, needle in (("", "expected a JSON file path"), (str(tmp_path / "e.json") + "/", "is a directory"),
                        (str(tmp_path / ("x" * 240)), "at most 200"), (str(tmp_path / "m.json"), "--steps")):
        extra = ["--steps", "1000000000000"] if needle == "--steps" else []
        one_line(*cli(["evaluate", tiny_pipe_dir, "--num-prompts", "4", *extra, "--out", bad], capsys), needle)
    assert pkg.read_text() == '{"name": "my-app"}'


@pytest.mark.parametrize("field, value, needle", [
    ("prompts", "one string", "prompts='one string' (str): expected a list of strings"),
    ("sparsity", "0.5", "sparsity='0.5' (str): expected a finite number"),
    ("sparsity", float("nan"), "sparsity=nan"),
    ("packages", 2.0, "packages=2.0 (float): expected an integer"),
    ("steps", True, "steps=True (bool): expected an integer"),
    ("seed", -5, "--seed -5 is outside [0, 2**63 - 2**32)"),
    ("guidance", -1.0, "--guidance -1.0 is outside [0, 1000]"),
    ("block_range", (2, 1), "block range"),
    ("blocksize", 6, "blocksize 6 must be a positive multiple of M=4"),
    ("prompts", ["ok", "  "], "empty prompt"),
    ("alpha_max", 1e308, "alpha_max 1e+308 is outside [1e-06, 1e+06]"),
])
def test_library_config_types_are_checked(tiny_pipe, field, value, needle):
    kw = {**QUICK, field: value}
    if field == "blocksize":
        kw["pattern"] = "2:4"
    snapshot = {k: v.clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError) as e:
        obslib.prune(tiny_pipe, PruneConfig(**kw))
    assert isinstance(e.value, UsageError) and needle in str(e.value)
    assert all(torch.equal(snapshot[k], v) for k, v in tiny_pipe.transformer.state_dict().items())


def test_numpy_numbers_are_taken_as_plain_numbers(tiny_pipe, tmp_path):
    import numpy as np

    cfg = PruneConfig(**{**QUICK, "prompts": tuple(QUICK["prompts"]), "packages": np.int64(1)}, sparsity=np.float32(0.5))
    rep = obslib.prune(tiny_pipe, cfg)
    assert type(cfg.sparsity) is np.float32 and isinstance(cfg.prompts, tuple)  # the caller's object is never changed
    checked = cfg.validate()
    assert type(checked.sparsity) is float and type(checked.packages) is int and isinstance(checked.prompts, list)
    assert rep["config"]["sparsity"] == 0.5 and type(rep["config"]["packages"]) is int
    obslib.save_pruned(tiny_pipe, rep, str(tmp_path / "o"))
    assert json.load(open(tmp_path / "o" / "pruning_report.json"))["sparsity_target"] == 0.5


def test_library_save_and_defaults_reject_bad_arguments(tiny_pipe, tmp_path):
    for call in (lambda: obslib.save_pruned(tiny_pipe, {"method": "x"}, str(tmp_path / "o"), model_dir=123),
                 lambda: obslib.save_pruned(None, {"method": "x"}, str(tmp_path / "o")),
                 lambda: obslib.sampling_defaults(None)):
        with pytest.raises(UsageError):
            call()
    assert not (tmp_path / "o").exists()


def test_reports_are_strict_json(tmp_path):
    f = tmp_path / "r.json"
    write_json(str(f), {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == \
        {"a": None, "b": [None, 1.5], "c": {"d": None}}


# ------------------------------------------------------------------------- solver faults and restore
def _spd(n, seed=0):
    X = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2 * X.T @ X / X.shape[0]


def test_non_finite_or_indefinite_hessians_raise_solver_error():
    H = _spd(8)
    H[2, 3] = float("nan")
    with pytest.raises(SolverError, match="non-finite"):
        damped_inverse(H)
    neg = -torch.eye(8, dtype=torch.float64) * 5
    with pytest.raises(SolverError, match="not positive definite even with damping"):
        damped_inverse(neg)
    # a slightly indefinite H is rescued by more damping, and the result is a true inverse of H + damp I
    bad = _spd(8) - torch.eye(8, dtype=torch.float64) * 0.9 * float(torch.linalg.eigvalsh(_spd(8))[0])
    bad[0, 0] -= 0.5
    Hinv, _ = damped_inverse(bad, percdamp=1e-6)
    assert torch.isfinite(Hinv).all() and (torch.linalg.eigvalsh(Hinv) > 0).all()
    W = torch.randn(3, 8, dtype=torch.float64)
    W[1, 4] = float("nan")
    with pytest.raises(SolverError, match="weight has 1 non-finite"):
        obs_prune(W, _spd(8), 0.5)


def test_dead_inputs_do_not_inflate_damping():
    H = _spd(6) * 1e-4  # small activations
    H6 = torch.zeros(8, 8, dtype=torch.float64)
    H6[:6, :6] = H  # inputs 6, 7 never fire
    Hinv, dead = damped_inverse(H6, percdamp=0.01)
    assert dead.tolist() == [False] * 6 + [True] * 2
    damp = 0.01 * float(H.diagonal().mean())  # over the live inputs only
    assert torch.allclose(Hinv[:6, :6], torch.linalg.inv(H + damp * torch.eye(6, dtype=torch.float64)), rtol=1e-8)
    W = torch.randn(4, 8, dtype=torch.float64)
    W_hat, mask = obs_prune(W, H6, 0.5)
    assert (W_hat[:, 6:] == 0).all() and mask[:, 6:].all()


def test_dead_neuron_is_removed_first():
    H = _spd(10)
    H[4, :] = 0
    H[:, 4] = 0
    W = torch.randn(6, 10, dtype=torch.float64)
    W[:, 4] *= 100  # a huge weight on an input that never fires still costs nothing to remove
    W_hat, removed = prune_neurons(W, H, 1, batch=1)
    assert removed == [4] and torch.allclose(W_hat[:, [0, 1, 2, 3, 5, 6, 7, 8, 9]], W[:, [0, 1, 2, 3, 5, 6, 7, 8, 9]])


def test_nm_incomplete_last_group_stays_dense():
    W = torch.randn(4, 10, dtype=torch.float64)
    W_hat, mask = obs_prune(W, _spd(10), 0.5, 2, 4, blocksize=8)
    assert (mask[:, :8].reshape(4, 2, 4).sum(-1) == 2).all()
    assert not mask[:, 8:].any() and (W_hat[:, 8:] != 0).all()
    with pytest.raises(ValueError, match="multiple of M=4"):
        obs_prune(W, _spd(10), 0.5, 2, 4, blocksize=6)


def test_nan_weight_is_refused_naming_the_layer_before_any_change(tiny_pipe):
    den = tiny_pipe.transformer
    w = den.transformer_blocks[2].ff.net[2].weight
    w.data[0, 0] = float("nan")
    snapshot = {k: v.clone() for k, v in den.state_dict().items()}
    with pytest.raises(SolverError, match=r"layer transformer_blocks\.2\.ff\.net\.2: its weight has 1 non-finite"):
        obslib.prune(tiny_pipe, PruneConfig(**QUICK))
    after = den.state_dict()
    assert all(torch.equal(snapshot[k], after[k]) or k.endswith("ff.net.2.weight") for k in snapshot)
    assert torch.equal(torch.nan_to_num(snapshot["transformer_blocks.2.ff.net.2.weight"]),
                       torch.nan_to_num(after["transformer_blocks.2.ff.net.2.weight"]))


@pytest.mark.parametrize("pattern", ["unstructured", "structured"])
def test_failed_prune_restores_the_pipeline_and_can_be_rerun(tiny_pipe, monkeypatch, pattern):
    """A solver failure half-way through (earlier layers already pruned, in place or resized) puts the
    pipeline back exactly; the same pipeline then prunes like a fresh one."""
    import obslib.methods as methods

    den = tiny_pipe.transformer
    snapshot = {k: v.clone() for k, v in den.state_dict().items()}
    heads = [b.attn.heads for b in den.transformer_blocks]
    meth = methods.METHODS["obs-diff"]
    calls = {"n": 0}

    def failing(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == 4:
                raise SolverError("the Hessian is not positive definite (injected)")
            return fn(*a, **k)
        return wrapped

    broken = methods.Method("obs-diff", unstructured=failing(meth.unstructured), heads=failing(meth.heads),
                            neurons=failing(meth.neurons))
    monkeypatch.setitem(methods.METHODS, "obs-diff", broken)
    cfg = dict(QUICK, pattern=pattern, sparsity=0.25 if pattern == "structured" else 0.5)
    with pytest.raises(SolverError, match="^layer transformer_blocks.*injected"):
        obslib.prune(tiny_pipe, PruneConfig(**cfg))
    assert den.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(v, snapshot[k]) for k, v in den.state_dict().items())
    assert [b.attn.heads for b in den.transformer_blocks] == heads
    monkeypatch.setitem(methods.METHODS, "obs-diff", meth)
    rep = obslib.prune(tiny_pipe, PruneConfig(**cfg))
    assert rep["sparsity_actual"] > 0.2


def test_pruning_a_structured_output_again_stays_loadable(tiny_pipe, tmp_path):
    rep1 = obslib.prune(tiny_pipe, PruneConfig(**QUICK, pattern="structured", sparsity=0.25))
    obslib.save_pruned(tiny_pipe, rep1, str(tmp_path / "s1"))
    p1 = obslib.load_pipeline(str(tmp_path / "s1"))
    assert p1.transformer.transformer_blocks[1].attn.heads == 3
    rep2 = obslib.prune(p1, PruneConfig(**QUICK, pattern="structured", sparsity=1 / 3))
    obslib.save_pruned(p1, rep2, str(tmp_path / "s2"))
    rep3 = obslib.prune(p1, PruneConfig(**QUICK, method="magnitude", measure_error=False))
    obslib.save_pruned(p1, rep3, str(tmp_path / "s3"))
    for d in ("s2", "s3"):
        p = obslib.load_pipeline(str(tmp_path / d))
        assert p.transformer.transformer_blocks[1].attn.heads == 2
        assert p.transformer.transformer_blocks[1].ff.net[2].weight.shape[1] == 64  # 128 -> 96 -> 64
        img = p("a red circle", num_inference_steps=2, max_sequence_length=8, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(torch.from_numpy(img)).all()
    m3 = json.load(open(tmp_path / "s3" / "obslib_manifest.json"))
    assert m3["heads"]["transformer_blocks.1.attn"] == 2

