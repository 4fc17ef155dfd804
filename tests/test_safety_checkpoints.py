"""obslib deletes only what it created (issue 17): checkpoint directories, --overwrite at every depth, the
propagate spill directory; corrupted or foreign checkpoints are one line; every flag is checked before the
work; an interrupted run says how to continue. Every case checks that the user's bytes survive."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import obslib
from obslib.config import PruneConfig
from obslib.io import UsageError
from obslib.shapes import prompts
from test_safety import cli, one_line, tree

FAST = ["--num-prompts", "2", "--steps", "2", "--batch-size", "2", "--quiet"]


@pytest.fixture
def world(tiny_pipe_dir, tmp_path):
    """A user's folder with files at several depths, and a copy of the model beside it."""
    u = tmp_path / "user"
    (u / "docs" / "deep").mkdir(parents=True)
    (u / "thesis.tex").write_text("\\chapter{one}")
    (u / "docs" / "notes.md").write_text("# notes")
    (u / "docs" / "deep" / "data.bin").write_bytes(b"\x00\x01" * 100)
    m = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, m)
    return tmp_path, u, m


def _snapshot(tmp_path):
    return {k: v for k, v in tree(tmp_path).items()}


# ------------------------------------------------------ every path flag at a user folder or the model
PATH_CASES = [  # (flag, where it points, extra args, needle)
    ("--checkpoint-dir", "user", ["--resume"], "is an existing directory that is not an obslib checkpoint"),
    ("--checkpoint-dir", "user/docs", [], "is an existing directory that is not an obslib checkpoint"),
    ("--checkpoint-dir", "user/empty", ["--resume"], "it is empty but obslib did not create it"),
    ("--checkpoint-dir", "model", ["--resume"], "is the model directory"),
    ("--checkpoint-dir", "model/ck", [], "lies inside the model directory"),
    ("--checkpoint-dir", ".", ["--resume"], "contains the model directory"),
    ("--checkpoint-dir", "out", [], "is --out or lies inside it"),
    ("--checkpoint-dir", "out/ck", ["--resume"], "is --out or lies inside it"),
    ("--checkpoint-dir", "user/thesis.tex", [], "is an existing file"),
    ("--checkpoint-dir", "/proc/obslib-ck", [], "cannot write in"),
    ("--out", "user", ["--overwrite"], "was not written by obslib"),
    ("--out", "user/docs", ["--overwrite"], "was not written by obslib"),
    ("--out", "model", ["--overwrite"], "is the model directory itself"),
    ("--out", "model/transformer", ["--overwrite"], "lies inside the model directory"),
    ("--out", ".", ["--overwrite"], "contains the model directory"),
    ("--out", "user/thesis.tex", ["--overwrite"], "is an existing file"),
    ("--prompts", "user", [], "is not a regular file"),
    ("--prompts", "model", [], "is not a regular file"),
    ("--prompts", "user/docs/deep/data.bin", [], "is binary"),
    ("--train-data", "user", ["--method", "gradient-flow", "--pattern", "structured"], "metadata.jsonl"),
    ("--train-data", "model", ["--method", "gradient-flow", "--pattern", "structured"], "metadata.jsonl"),
    ("MODEL", "user", [], "no model_index.json"),
    ("MODEL", "user/thesis.tex", [], "is a file, not a directory"),
    ("MODEL", "model/transformer", [], "no model_index.json"),
]


@pytest.mark.parametrize("flag, where, extra, needle", PATH_CASES, ids=[f"{c[0]}={c[1]}" for c in PATH_CASES])
def test_every_path_flag_at_a_user_folder_or_the_model_keeps_every_byte(world, capsys, monkeypatch, flag, where,
                                                                        extra, needle):
    tmp_path, u, m = world
    (u / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    model = where if flag == "MODEL" else "model"
    args = ["prune", model, *FAST, *extra]
    if flag not in ("--out", "MODEL"):
        args += [flag, where]
    if flag == "--prompts":
        args.remove("--num-prompts"), args.remove("2")
    args += ["--out", where if flag == "--out" else "out"]
    one_line(*cli(args, capsys), needle)
    assert _snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["model", "user"]


@pytest.mark.parametrize("target", ["user", "model", "user/docs"])
def test_evaluate_paths_at_a_user_folder_or_the_model_keep_every_byte(world, capsys, monkeypatch, target):
    tmp_path, u, m = world
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    rc, err = cli(["evaluate", "model", "--num-prompts", "4", "--steps", "2", "--out", target], capsys)
    one_line(rc, err, "is a directory")
    rc, err = cli(["evaluate", "model", "--num-prompts", "4", "--steps", "2", "--reference", target,
                   "--out", "model/m.json"], capsys)
    assert rc == 2 and len(err) == 1
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------- --overwrite at every depth
@pytest.fixture(scope="module")
def earlier_output(tiny_pipe_dir, tmp_path_factory):
    from obslib.cli import main

    d = tmp_path_factory.mktemp("earlier") / "out"
    assert main(["prune", tiny_pipe_dir, "--method", "magnitude", *FAST, "--out", str(d)]) == 0
    return d


@pytest.mark.parametrize("change, needle", [
    ("transformer/my_notes.txt", "holds files obslib did not write (transformer/my_notes.txt)"),
    ("obslib_mine.json", "holds files obslib did not write (obslib_mine.json)"),
    ("vae/deep/er/x.png", "holds files obslib did not write (vae/deep/er/x.png)"),
    ("EDIT transformer/config.json", "transformer/config.json (changed)"),
    ("EMPTYDIR scheduler/mine", "holds files obslib did not write (scheduler/mine)"),
    ("LINK link", "holds files obslib did not write (link)"),
    ("NOLIST obslib_files.json", "has no obslib_files.json"),
])
def test_overwrite_replaces_only_a_directory_whose_every_file_obslib_wrote(earlier_output, tiny_pipe_dir, tmp_path,
                                                                          capsys, change, needle):
    out = tmp_path / "out"
    shutil.copytree(earlier_output, out, symlinks=True)
    kind, _, rel = change.partition(" ") if " " in change else ("ADD", "", change)
    if kind == "ADD":
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("the user's")
    elif kind == "EDIT":
        cfg = json.load(open(out / rel))
        json.dump({**cfg, "note": "mine"}, open(out / rel, "w"))
    elif kind == "EMPTYDIR":
        (out / rel).mkdir()
    elif kind == "LINK":
        os.symlink(tmp_path, out / rel)
    elif kind == "NOLIST":
        os.remove(out / "obslib_files.json")
    before = tree(out)
    one_line(*cli(["prune", tiny_pipe_dir, "--method", "magnitude", *FAST, "--out", out, "--overwrite"], capsys), needle)
    assert tree(out) == before


def test_overwrite_of_an_untouched_output_works_and_the_file_list_is_exact(earlier_output, tiny_pipe_dir, tmp_path,
                                                                           capsys):
    from obslib.owned import describe, not_ours

    out = tmp_path / "out"
    shutil.copytree(earlier_output, out)
    assert not_ours(str(out)) == []
    listed = json.load(open(out / "obslib_files.json"))["files"]
    assert listed == describe(str(out)) and "transformer/diffusion_pytorch_model.safetensors" in listed
    assert cli(["prune", tiny_pipe_dir, "--method", "magnitude", *FAST, "--sparsity", "0.3", "--out", out,
                "--overwrite"], capsys)[0] == 0
    assert json.load(open(out / "pruning_report.json"))["sparsity_target"] == 0.3
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------------- checkpoint life
def _cli_sub(args, kill_at=None, sig=signal.SIGKILL):
    code = f"""
import os, signal, sys
# a shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
# restore it, as an interactive terminal would have it
signal.signal(signal.SIGINT, signal.default_int_handler)
import obslib.sampling as packages
real, calls = packages.CalibrationRunner.run, [0]
def run(self, calib, desc="calibration"):
    calls[0] += 1
    if calls[0] == {kill_at!r}:
        os.kill(os.getpid(), {int(sig)})
    return real(self, calib, desc)
packages.CalibrationRunner.run = run
from obslib.cli import main
sys.exit(main({['prune', *map(str, args)]!r}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


STRUCT = ["--pattern", "structured", "--sparsity", "0.25", "--num-prompts", "4", "--steps", "2", "--batch-size", "2",
          "--packages", "4", "--quiet"]


@pytest.fixture(scope="module")
def killed(tiny_pipe_dir, tmp_path_factory):
    """A structured run killed in its third package, its checkpoint, and the uninterrupted run's bytes."""
    base = tmp_path_factory.mktemp("killed")
    r = _cli_sub([tiny_pipe_dir, *STRUCT, "--out", base / "whole"])
    assert r.returncode == 0, r.stderr
    r = _cli_sub([tiny_pipe_dir, *STRUCT, "--out", base / "cut"], kill_at=3)
    assert r.returncode == -signal.SIGKILL
    ck = base / ".obslib-ckpt-cut"
    assert sorted(os.listdir(ck)) == ["obslib_checkpoint.json", "pkg-0000", "pkg-0001"]
    return base, ck


def _copy_ck(killed, tmp_path):
    base, ck = killed
    mine = tmp_path / ".obslib-ckpt-cut"
    shutil.copytree(ck, mine)
    return mine


def _heads_entry(ck):
    for e in ("pkg-0000", "pkg-0001"):
        if json.load(open(ck / e / "meta.json"))["heads"]:
            return e
    raise AssertionError("no heads in the first two packages")


def _corrupt(ck, how):
    e = ck / "pkg-0001" / "weights.safetensors"
    meta = ck / "pkg-0001" / "meta.json"
    if how == "truncated safetensors":
        e.write_bytes(e.read_bytes()[: e.stat().st_size // 2])
        return e
    if how == "meta cut short":
        meta.write_text(meta.read_text()[:40])
        return meta
    if how == "meta without state":
        d = json.load(open(meta))
        del d["state"]
        json.dump(d, open(meta, "w"))
        return meta
    if how == "head count -3":
        meta = ck / _heads_entry(ck) / "meta.json"
        d = json.load(open(meta))
        d["heads"] = {k: -3 for k in d["heads"]}
        json.dump(d, open(meta, "w"))
        return meta
    t = load_file(e)
    k = sorted(t)[0]
    if how == "tensor of the wrong shape":
        t[k] = torch.zeros(t[k].shape[0] + 5, 3)
    elif how == "all-NaN tensor":
        t[k] = torch.full_like(t[k], float("nan"))
    elif how == "a foreign layer":
        t["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(32, 32)
    elif how == "another dtype":
        t[k] = t[k].to(torch.float16)
    save_file(t, e)
    return e


@pytest.mark.parametrize("how, needle", [
    ("truncated safetensors", "is unreadable"),
    ("meta cut short", "is unreadable"),
    ("meta without state", "field 'state' is missing or malformed"),
    ("head count -3", "heads; allowed 1 to"),
    ("tensor of the wrong shape", "a different model or --dtype?"),
    ("all-NaN tensor", "holds NaN or infinite values"),
    ("a foreign layer", "does not hold this package's layers"),
    ("another dtype", "a different model or --dtype?"),
])
def test_a_corrupted_checkpoint_is_one_line_naming_the_file(killed, tiny_pipe_dir, tmp_path, capsys, how, needle):
    ck = _copy_ck(killed, tmp_path)
    bad = _corrupt(ck, how)
    before = tree(ck)
    rc, err = cli(["prune", tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut", "--resume"], capsys)
    one_line(rc, err, needle)
    assert os.path.basename(os.path.dirname(bad)) in err[0] and "delete that directory" in err[0]
    assert tree(ck) == before and not (tmp_path / "cut").exists()


@pytest.mark.parametrize("how, needle", [
    ("a user's file", "is an existing directory that is not an obslib checkpoint (it holds 'notes.txt')"),
    ("a user's file in an entry", "(it holds 'pkg-0000/notes.txt')"),
    ("no marker", "(no obslib_checkpoint.json)"),
    ("a foreign marker", "its obslib_checkpoint.json is not obslib's"),
    ("a gradient-flow checkpoint", "it holds gradient-flow checkpoints; this method writes packages checkpoints"),
])
def test_a_foreign_checkpoint_directory_is_refused_and_kept(killed, tiny_pipe_dir, tmp_path, capsys, how, needle):
    ck = _copy_ck(killed, tmp_path)
    if how == "a user's file":
        (ck / "notes.txt").write_text("mine")
    elif how == "a user's file in an entry":
        (ck / "pkg-0000" / "notes.txt").write_text("mine")
    elif how == "no marker":
        os.remove(ck / "obslib_checkpoint.json")
    elif how == "a foreign marker":
        (ck / "obslib_checkpoint.json").write_text('{"kind": "packages"}')
    else:
        (ck / "obslib_checkpoint.json").write_text('{"written_by": "obslib", "kind": "gradient-flow"}')
    before = tree(ck)
    for extra in ([], ["--resume"]):
        one_line(*cli(["prune", tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut", *extra], capsys), needle)
    assert tree(ck) == before


def test_a_killed_run_is_continued_by_the_command_its_refusal_names(killed, tiny_pipe_dir, tmp_path, capsys):
    base, _ = killed
    ck = _copy_ck(killed, tmp_path)
    rc, err = cli(["prune", tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut"], capsys)
    one_line(rc, err, "holds the checkpoint of an interrupted run of these settings (2 package(s) done); "
                      "continue it: obslib prune")
    assert err[0].split("continue it: ")[1].split(";")[0].endswith(f"--out {tmp_path / 'cut'} --resume")
    one_line(*cli(["prune", tiny_pipe_dir, *STRUCT, "--seed", "3", "--out", tmp_path / "cut"], capsys),
             "belongs to a different configuration (seed 0 there, 3 here")
    assert cli(["prune", tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut", "--resume"], capsys)[0] == 0
    assert not ck.exists()
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "cut" / name).read_bytes() == (base / "whole" / name).read_bytes()


def test_sigint_says_where_the_checkpoint_is_and_how_to_continue(tiny_pipe_dir, tmp_path):
    r = _cli_sub([tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut"], kill_at=3, sig=signal.SIGINT)
    assert r.returncode == 130, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obslib: interrupted; 2 finished step(s) are checkpointed in "), lines
    assert lines[0].endswith(f"--out {tmp_path / 'cut'} --resume")
    assert not (tmp_path / "cut").exists() and (tmp_path / ".obslib-ckpt-cut" / "pkg-0001").is_dir()


def test_sigint_before_any_package_leaves_nothing(tiny_pipe_dir, tmp_path):
    r = _cli_sub([tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut"], kill_at=1, sig=signal.SIGINT)
    assert r.returncode == 130 and r.stderr.strip() == "obslib: interrupted; nothing was written", r.stderr
    assert os.listdir(tmp_path) == []


def test_an_error_after_a_finished_package_names_the_resume_command(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    import obslib.driver as api
    from obslib.obs import SolverError

    real, calls = api._solve_group, [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise SolverError("the Hessian is singular (injected)")
        return real(*a, **k)

    monkeypatch.setattr(api, "_solve_group", failing)
    rc, err = cli(["prune", tiny_pipe_dir, *STRUCT, "--packages", "6", "--out", tmp_path / "cut"], capsys)
    one_line(rc, err, "the Hessian is singular (injected)")
    assert "finished step(s) are checkpointed in" in err[0] and err[0].endswith("--resume)")
    assert not (tmp_path / "cut").exists()


def test_a_fresh_checkpoint_dir_with_resume_is_created_and_removed_alone(tiny_pipe_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    ck = tmp_path / "ck"
    assert cli(["prune", tiny_pipe_dir, *STRUCT, "--out", tmp_path / "out", "--checkpoint-dir", ck, "--resume"],
               capsys)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["keep.txt", "out"]


def test_library_checkpoint_dir_is_checked_before_any_work(tiny_pipe_dir, tmp_path):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    cfg = PruneConfig(prompts=prompts("train", 2), steps=2, batch_size=2, packages=2, progress=False,
                      checkpoint_dir=str(tmp_path / "mine"), resume=True)
    with pytest.raises(UsageError, match="is an existing directory that is not an obslib checkpoint"):
        obslib.prune(pipe, cfg)
    cfg.checkpoint_dir = os.path.join(tiny_pipe_dir, "ck")
    with pytest.raises(UsageError, match="lies inside the model directory"):
        obslib.prune(pipe, cfg)
    assert (tmp_path / "mine" / "a.txt").read_text() == "x" and not os.path.exists(cfg.checkpoint_dir)


# ------------------------------------------------------------------ flags checked before the work
def _slim_output(tiny_pipe_dir, tmp_path):
    from obslib.cli import main

    d = tmp_path / "slim"
    assert main(["prune", tiny_pipe_dir, "--method", "slimdiff", "--pattern", "structured", "--sparsity", "0.5",
                 *FAST, "--out", str(d)]) == 0
    return d


@pytest.mark.parametrize("args, needle", [
    (["--method", "gradient-flow", "--pattern", "structured", "--lr", "-1e-5"], "--lr -1e-05 is outside (0, 1]"),
    (["--lr", "-inf", "--method", "gradient-flow", "--pattern", "structured"], "lr=-inf"),
    (["--record-ram-mb", "1e15", "--calibration", "propagate"], "--record-ram-mb 1e+15 is outside [0, 2**40]"),
    (["--method", "slimdiff", "--pattern", "structured", "--iterations", "0"], "--iterations 0 is outside [1, 10000000]"),
    (["--method", "slimdiff", "--pattern", "structured", "--sparsity", "0.99"], "cannot be met"),
    (["--checkpoint-dir", "FILE"], "is an existing file"),
    (["DEFAULT-CK-FILE"], "/.obslib-ckpt-out' is an existing file"),
    (["--checkpoint-dir", "/proc/obslib-x/ck"], "its parent directory '/proc/obslib-x' does not exist"),
    (["SLIM", "--pattern", "structured", "--sparsity", "0.3"], "whole heads cannot be removed from it"),
    (["--method", "gradient-flow", "--pattern", "structured", "--train-data", "LATIN1"], "not UTF-8 text (byte 0xe9"),
    (["NAN-WEIGHTS"], "are NaN or infinite (a damaged weights file"),
])
def test_bad_flags_are_one_line_before_the_work(tiny_pipe_dir, tmp_path, capsys, args, needle):
    model = tiny_pipe_dir
    args = list(args)
    if "FILE" in args:
        (tmp_path / "f.txt").write_text("mine")
        args[args.index("FILE")] = str(tmp_path / "f.txt")
    if "LATIN1" in args:
        d = tmp_path / "data"
        d.mkdir()
        (d / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\xe9"}\n'.encode("latin-1"))
        args[args.index("LATIN1")] = str(d)
    if "DEFAULT-CK-FILE" in args:  # the default checkpoint path beside --out is taken by a file
        args.remove("DEFAULT-CK-FILE")
        (tmp_path / ".obslib-ckpt-out").write_text("mine")
    if "SLIM" in args:
        args.remove("SLIM")
        model = str(_slim_output(tiny_pipe_dir, tmp_path))
    if "NAN-WEIGHTS" in args:
        args.remove("NAN-WEIGHTS")
        m = tmp_path / "m"
        shutil.copytree(tiny_pipe_dir, m)
        st = m / "text_encoder" / "model.safetensors"
        data = bytearray(st.read_bytes())
        data[-4000:] = b"\xff" * 4000  # the data section's last bytes: NaN floats, the header intact
        st.write_bytes(bytes(data))
        model = str(m)
    before = {p: tree(p) for p in (tmp_path,)}
    rc, err = cli(["prune", model, *FAST, *args, "--out", tmp_path / "out"], capsys)
    one_line(rc, err, needle)
    assert tree(tmp_path) == before[tmp_path]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".obslib") and n not in before[tmp_path]]


def test_ignored_flags_get_notes_and_the_run_succeeds(tiny_pipe_dir, tmp_path, capsys):
    from obslib.cli import main

    m = tmp_path / "m"
    shutil.copytree(tiny_pipe_dir, m)
    torch.save({"x": torch.zeros(1)}, m / "transformer" / "diffusion_pytorch_model.bin")
    rc = main(["prune", str(m), "--method", "magnitude", "--calibration", "propagate", "--record-ram-mb", "10",
               "--num-prompts", "2", "--steps", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "note: --calibration propagate is ignored: magnitude needs no calibration" in err
    assert "note: --record-ram-mb only applies to --calibration propagate; ignored" in err
    assert "note: transformer/diffusion_pytorch_model.bin is a pickle file" in err


def test_save_pruned_names_its_own_argument(tiny_pipe_dir):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    with pytest.raises(UsageError, match=r"^out '.*' is the model directory itself"):
        obslib.save_pruned(pipe, {"method": "magnitude"}, tiny_pipe_dir, overwrite=True)


def test_prompt_encoding_shows_progress(tiny_pipe, capsys):
    from obslib.sampling import CalibrationRunner

    runner = CalibrationRunner(tiny_pipe, prompts("train", 6), 2, 4.0, 0, 2, {}, progress=True)
    assert len(runner.inputs) == 3  # encoded on first use, once, in batches of 2
    assert "encode 6 prompts" in capsys.readouterr().err


def test_a_spill_directory_that_cannot_be_created_is_one_line(tiny_pipe):
    from obslib.archs import iter_blocks, spec_for
    from obslib.propagate import Propagation

    den = tiny_pipe.transformer
    spec = spec_for(den)
    with pytest.raises(UsageError, match="cannot create the propagate record's spill directory in '/proc'"):
        Propagation([b for _, b in iter_blocks(den, spec)], spec.chain, None, [1.0], 1, 0, "/proc")
