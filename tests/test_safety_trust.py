"""What obslib cleans up must prove it is obslib's; SIGTERM, a full disk and concurrent runs end in one line;
flags cannot swallow the model path (issue 31). Every case checks that the user's bytes survive."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import obslib
from obslib import owned
from obslib.io import UsageError, check_output_dir, clean_stale, write_json
from obslib.owned import write_file_list
from test_safety import cli, one_line, tree
from test_safety_checkpoints import FAST, STRUCT, _cli_sub

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-sd3")
DEAD = 2**22 + 4321  # above the default pid_max: no such process


def _user_files(tmp_path, skip=("out",)):
    return {k: v for k, v in tree(tmp_path).items() if k.split(os.sep)[0] not in skip}


def _fake_output(d, **report):
    """A complete obslib output as far as ownership goes: files and their file list."""
    d.mkdir(parents=True, exist_ok=True)
    write_json(str(d / "pruning_report.json"), {"written_by": "obslib", **report})
    write_file_list(str(d))


def _left_by_dead_run(parent, name, purpose, content=None):
    """A scratch directory exactly as a killed obslib process leaves it: its marker names it and the dead PID."""
    d = parent / name
    d.mkdir()
    if content is not None:
        content(d)
    owned.mark_scratch(str(d), purpose)
    m = json.load(open(d / owned.SCRATCH))
    m["pid"] = DEAD
    (d / owned.SCRATCH).write_text(json.dumps(m))
    return d


# ------------------------------------------------------ leftovers beside --out: proven obslib's, or left alone
def _user_tmp(p):
    d = p / f".obslib-tmp-out-{DEAD}-keep"
    d.mkdir()
    (d / "thesis.tex").write_text("\\chapter{one}")


def _user_old(p):
    d = p / f".obslib-old-out-{DEAD}-keep"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "notes.md").write_text("# mine")


def _copied_marker(p):  # a user's copy of a real leftover: the marker names another directory (device, inode)
    d = _left_by_dead_run(p, f".obslib-tmp-out-{DEAD}-real", "tmp", lambda d: (d / "a.json").write_text("{}"))
    shutil.copytree(d, p / f".obslib-tmp-out-{DEAD}-copy")
    shutil.rmtree(d)


def _marker_pid_mismatch(p):
    d = _left_by_dead_run(p, f".obslib-tmp-out-{DEAD + 1}-x", "tmp", lambda d: (d / "a.json").write_text("{}"))
    assert d.exists()


def _user_file_in_real_tmp(p):  # a killed run's temporary output into which a user put a file
    _left_by_dead_run(p, f".obslib-tmp-out-{DEAD}-ab", "tmp", lambda d: (d / "thesis.tex").write_text("mine"))


def _old_half_without_list(p):  # named and marked like the old half of a swap, but no complete file list
    _left_by_dead_run(p, f".obslib-old-out-{DEAD}-ab", "old", lambda d: (d / "pruning_report.json").write_text("{}"))


def _forged_list_in_old(p):  # the old half's file list names a user's file that is not there any more
    def content(d):
        _fake_output(d)
        (d / "notes.md").write_text("mine")
    _left_by_dead_run(p, f".obslib-old-out-{DEAD}-ab", "old", content)


def _user_record(p):
    d = p / f".obslib-record-{DEAD}-keep"
    (d / "b0000").mkdir(parents=True)
    (d / "b0000" / "b0000-000000.safetensors").write_bytes(b"mine")
    (d / "obslib_record.json").write_text('{"written_by": "obslib", "kind": "propagate-record"}')


def _other_host(p):  # another machine's run on a shared file system: its PIDs mean nothing here
    d = _left_by_dead_run(p, f".obslib-tmp-out-{DEAD}-nfs", "tmp", lambda d: (d / "a.json").write_text("{}"))
    m = json.load(open(d / owned.SCRATCH))
    m["host"] = "another-node"
    (d / owned.SCRATCH).write_text(json.dumps(m))


LEFT_ALONE = [  # (what lies beside --out, the note's words)
    ("a user's folder named like obslib's temporary output", _user_tmp, "no valid .obslib-scratch.json marker"),
    ("a user's folder named like the old half of a swap, --out missing", _user_old, "no valid .obslib-scratch.json"),
    ("a copy of a real leftover (marker names another inode)", _copied_marker, "no valid .obslib-scratch.json"),
    ("a marker whose PID is not the name's", _marker_pid_mismatch, "its marker names process"),
    ("a user's file inside a real leftover", _user_file_in_real_tmp, "thesis.tex, which obslib does not write there"),
    ("the old half without a complete file list", _old_half_without_list, "which obslib does not write there"),
    ("the old half whose list does not match", _forged_list_in_old, "notes.md"),
    ("another host's leftover", _other_host, "made by a run on host 'another-node'"),
]


@pytest.mark.parametrize("what, make, needle", LEFT_ALONE, ids=[c[0] for c in LEFT_ALONE])
def test_a_leftover_obslib_cannot_prove_is_left_alone_with_one_note(tiny_pipe, tmp_path, capsys, what, make, needle):
    make(tmp_path)
    before = tree(tmp_path)
    obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert (tmp_path / "out" / "model_index.json").exists()  # the run succeeded, --out written anew
    assert _user_files(tmp_path) == before  # every byte of what lies beside it unchanged
    assert len(err) == 1 and err[0].startswith("obslib: note: left ") and needle in err[0], err


def test_a_user_record_folder_is_left_alone(tiny_pipe, tmp_path, capsys):
    from obslib.archs import iter_blocks, spec_for
    from obslib.propagate import Propagation

    _user_record(tmp_path)
    before = tree(tmp_path)
    den = tiny_pipe.transformer
    spec = spec_for(den)
    Propagation([b for _, b in iter_blocks(den, spec)], spec.chain, None, [1.0], 1, 0, str(tmp_path)).close()
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == [f".obslib-record-{DEAD}-keep"]
    assert "named like an obslib propagate record, but it has no valid" in capsys.readouterr().err


def test_real_leftovers_of_a_killed_run_are_removed_or_restored(tmp_path):
    """Including one whose PID is this process's own (a restarted container gives the same PID): its marker's
    start time tells the two processes apart."""
    out = tmp_path / "out"
    me = tmp_path / f".obslib-tmp-out-{os.getpid()}-old"
    me.mkdir()
    owned.mark_scratch(str(me), "tmp")
    m = json.load(open(me / owned.SCRATCH))
    m["started"] = "another-boot:1"
    (me / owned.SCRATCH).write_text(json.dumps(m))
    (tmp_path / f".obslib-tmp-out-{DEAD}-empty").mkdir()  # killed before it held anything
    _left_by_dead_run(tmp_path, f".obslib-tmp-out-{DEAD}-abc", "tmp",  # killed during save_pretrained: no list yet
                      lambda d: ((d / "transformer").mkdir(), (d / "transformer" / "w.safetensors").write_bytes(b"x")))
    _left_by_dead_run(tmp_path, f".obslib-old-out-{DEAD}-xyz", "old", lambda d: _fake_output(d, marker=1))
    done = clean_stale(str(out), note=None)
    assert sorted(done) == sorted([f"restored {out} from .obslib-old-out-{DEAD}-xyz", f"removed .obslib-tmp-out-{DEAD}-abc",
                                   f"removed .obslib-tmp-out-{DEAD}-empty", f"removed .obslib-tmp-out-{os.getpid()}-old"])
    assert sorted(os.listdir(tmp_path)) == ["out"] and owned.not_ours(str(out)) == []
    assert json.load(open(out / "pruning_report.json"))["marker"] == 1


# ------------------------------------------------------ checkpoint directories: a marker naming the run, entries that match
def test_a_planted_checkpoint_directory_is_refused_and_kept(tiny_pipe_dir, tmp_path, capsys):
    """A marker written by hand for no run (no fingerprint, as older obslib wrote them), over a user's file
    named like a checkpoint entry: refused before any work, with and without --resume, every byte kept."""
    ck = tmp_path / ".obslib-ckpt-out"
    (ck / "pkg-0000.tmp-1234").mkdir(parents=True)
    (ck / "obslib_checkpoint.json").write_text(json.dumps({"written_by": "obslib", "kind": "packages"}))
    (ck / "pkg-0000.tmp-1234" / "weights.safetensors").write_bytes(b"my thesis, named like a checkpoint")
    before = tree(tmp_path)
    for extra in ([], ["--resume"]):
        one_line(*cli(["prune", tiny_pipe_dir, *FAST, "--out", tmp_path / "out", *extra], capsys),
                 "names no run (an older obslib's checkpoint")
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == [".obslib-ckpt-out"]


def test_a_users_file_in_a_real_checkpoint_entry_survives_its_removal(tmp_path, capsys):
    """Inside a checkpoint directory obslib did write, a file it cannot prove (a user's file in a temporary
    entry, or an entry edited since) is never deleted: the directory stays, with one note per entry."""
    from obslib.checkpoint import CheckpointDir

    ck = CheckpointDir(str(tmp_path / "ck"), "packages", fingerprint={"a": 1})
    ck.write(0, {"w": torch.ones(2)}, {"fingerprint": {"a": 1}, "package": 0})
    ck.write(1, {"w": torch.ones(2)}, {"fingerprint": {"a": 1}, "package": 1})
    planted = tmp_path / "ck" / "pkg-0002.tmp-1234"
    planted.mkdir()
    (planted / "weights.safetensors").write_bytes(b"my thesis, named like a checkpoint")
    edited = tmp_path / "ck" / "pkg-0001" / "weights.safetensors"
    edited.write_bytes(b"edited by the user")
    ck.check()  # still obslib's: an entry cut short is never read
    assert not ck.remove()
    assert sorted(os.listdir(tmp_path / "ck")) == ["obslib_checkpoint.json", "pkg-0001", "pkg-0002.tmp-1234"]
    assert edited.read_bytes() == b"edited by the user"
    assert (planted / "weights.safetensors").read_bytes() == b"my thesis, named like a checkpoint"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("obslib: note: left ") for e in err), err


def test_an_interrupted_checkpoint_write_leaves_no_half_entry(tmp_path, monkeypatch):
    import safetensors.torch as st

    from obslib.checkpoint import CheckpointDir

    ck = CheckpointDir(str(tmp_path / "ck"), "packages", fingerprint={"a": 1})
    monkeypatch.setattr(st, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.write(0, {"w": torch.ones(2)}, {"fingerprint": {"a": 1}, "package": 0})
    assert sorted(os.listdir(tmp_path / "ck")) == ["obslib_checkpoint.json"]


def test_a_checkpoint_marker_of_another_run_is_refused(tiny_pipe_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "obslib_checkpoint.json").write_text(json.dumps({"written_by": "obslib", "kind": "packages",
                                                           "fingerprint": {"sparsity": 0.9}}))
    before = tree(tmp_path)
    one_line(*cli(["prune", tiny_pipe_dir, *FAST, "--out", tmp_path / "out", "--checkpoint-dir", ck, "--resume"],
                  capsys), "belongs to a different configuration (method None there, 'obs-diff' here")
    assert tree(tmp_path) == before


# ------------------------------------------------------ file lists are checked before they are used
@pytest.mark.parametrize("files, needle", [
    ({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}, "which is not a relative path inside it"),
    ({"../notes.txt": {"bytes": 1, "sha256": "0" * 64}}, "which is not a relative path inside it"),
    ({"a//b": {"bytes": 1, "sha256": "0" * 64}}, "which is not a relative path inside it"),
    ({"x.json": {"bytes": -1, "sha256": "0" * 64}}, "entry for 'x.json' is malformed"),
    ({"x.json": {"bytes": 1, "sha256": "not-a-hash"}}, "entry for 'x.json' is malformed"),
    ({f"f{i}": {"bytes": 1, "sha256": None} for i in range(100_001)}, "at most 100000 are allowed"),
])
def test_a_crafted_file_list_neither_hangs_nor_reaches_outside(tmp_path, capsys, files, needle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    write_json(str(out / "obslib_files.json"), {"written_by": "obslib", "files": files})
    before = tree(tmp_path)
    t = time.perf_counter()
    with pytest.raises(UsageError, match="was not written by obslib") as e:
        check_output_dir(str(out), overwrite=True)
    assert needle in str(e.value) and time.perf_counter() - t < 30
    assert tree(tmp_path) == before


def test_overwrite_refuses_a_large_weights_file_edited_in_place(tmp_path, capsys):
    """Every file is hashed, whatever its size: an in-place edit that keeps the size is found."""
    out = tmp_path / "out"
    pipe = obslib.load_pipeline(DEFAULT_MODEL)  # its transformer's weights are 14 MB
    obslib.save_pruned(pipe, {"method": "magnitude"}, str(out))
    w = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert w.stat().st_size > 2**20
    data = bytearray(w.read_bytes())
    data[-8:] = b"\x00" * 8
    w.write_bytes(bytes(data))
    before = tree(out)
    with pytest.raises(UsageError, match=r"holds files obslib did not write \(transformer/diffusion_pytorch_model"
                                         r".safetensors \(changed\)\)"):
        obslib.save_pruned(pipe, {"method": "magnitude"}, str(out), overwrite=True)
    assert tree(out) == before


def test_evaluate_never_replaces_a_users_json_with_metrics_like_keys(tiny_pipe_dir, tmp_path, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"fid": 1.0, "kid": 0.1, "prompt_fidelity": 0.9, "num_prompts": 4, "split": "x",
                                "my_notes": "keep"}))
    before = tree(tmp_path)
    one_line(*cli(["evaluate", tiny_pipe_dir, "--num-prompts", "2", "--out", mine], capsys),
             "exists and is not an obslib metrics file")
    assert tree(tmp_path) == before


# ------------------------------------------------------ flags: nothing swallowed, nothing silently ignored
@pytest.mark.parametrize("args, needle", [
    (["prune", "MODEL", "--refit", "30", "--out", "OUT"], "--refit takes no value (got '30'); give the iterations as "
                                                          "--refit-iterations 30"),
    (["prune", "MODEL", "--refit-iterations", "0", "--refit", "--out", "OUT"], "--refit-iterations 0: must be at least 1"),
    (["prune", "MODEL", "--checkpoint-dir", "", "--out", "OUT"], "--checkpoint-dir '': expected a path"),
    (["prune", "MODEL", "--prompts", "", "--out", "OUT"], "--prompts '': expected a path"),
    (["evaluate", "MODEL", "--reference", "MODEL", "--pruned-steps", "-1-2", "--out", "OUT.json"],
     "--pruned-steps '-1-2': a value that starts with '-' is read as an option; write --pruned-steps=-1-2"),
    (["evaluate", "MODEL", "--reference", "MODEL", "--pruned-steps=-1-2", "--num-prompts", "2", "--out", "OUT.json"],
     "--pruned-steps '-1-2': expected FIRST-LAST"),
    (["prune", "MODEL", "--num-prompts", "3", "--out", "OUT", "WORLD=4"],
     "torchrun started 4 processes but there are only 3 calibration prompts"),
])
def test_bad_flags_name_their_value(tiny_pipe_dir, tmp_path, capsys, monkeypatch, args, needle):
    if "WORLD=4" in args:
        args.remove("WORLD=4")
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("RANK", "0")
    args = [tiny_pipe_dir if a == "MODEL" else str(tmp_path / a) if a.startswith("OUT") else a for a in args]
    before = tree(tmp_path)
    one_line(*cli(args, capsys), needle)
    assert tree(tmp_path) == before and os.listdir(tmp_path) == []


def test_a_refusal_before_the_work_is_printed_by_rank_0_only(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = ["prune", tiny_pipe_dir, "--num-prompts", "3", "--out", tmp_path / "out"]
    monkeypatch.setenv("RANK", "0")
    one_line(*cli(args, capsys), "torchrun started 4 processes but there are only 3 calibration prompts")
    monkeypatch.setenv("RANK", "2")
    rc, err = cli(args, capsys)
    assert rc == 2 and err == [] and os.listdir(tmp_path) == []
    monkeypatch.setenv("WORLD_SIZE", "1")  # RANK without torchrun's WORLD_SIZE: a single process, which speaks
    one_line(*cli(["prune", tiny_pipe_dir, "--num-prompts", "0", "--out", tmp_path / "out"], capsys),
             "--num-prompts 0 must be >= 1")


def test_refit_is_a_switch_that_never_takes_the_model_path(tiny_pipe_dir, tmp_path, capsys):
    rc, err = cli(["prune", "--refit", tiny_pipe_dir, *FAST, "--packages", "1", "--out", tmp_path / "a"], capsys)
    assert rc == 0, err
    assert json.load(open(tmp_path / "a" / "pruning_report.json"))["config"]["refit_iterations"] == 20
    rc, err = cli(["prune", tiny_pipe_dir, "--refit", "--refit-iterations", "3", *FAST, "--packages", "1",
                   "--out", tmp_path / "b"], capsys)
    assert rc == 0 and json.load(open(tmp_path / "b" / "pruning_report.json"))["config"]["refit_iterations"] == 3


@pytest.mark.parametrize("args, note", [
    (["--weighting", "sensitivity", "--alpha-ratio", "4", "--method", "magnitude"], "--weighting / --alpha-ratio is "
                                                                                  "ignored by magnitude"),
    (["--weighting", "uniform", "--alpha-ratio", "4"], "--alpha-ratio is ignored with --weighting uniform"),
    (["--weighting", "sensitivity", "--alpha-ratio", "4", "WHAT"], "--alpha-ratio is ignored with --weighting sensitivity"),
    (["--method", "magnitude", "--calib-tokens", "8"], "--calib-tokens is ignored: magnitude needs no calibration"),
    (["--refit-iterations", "5", "--method", "magnitude"], "--refit-iterations is ignored without --refit"),
])
def test_every_ignored_flag_gets_its_note(tiny_pipe_dir, tmp_path, capsys, monkeypatch, args, note):
    import obslib.cli as c

    if "WHAT" in args:  # the check is before the work: stop right after the notes
        args.remove("WHAT")
    monkeypatch.setattr(c, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(UsageError("stop here")))
    rc, err = cli(["prune", tiny_pipe_dir, "--num-prompts", "2", "--out", tmp_path / "out", *args], capsys)
    assert rc == 2 and err[-1] == "obslib: error: stop here"
    assert sum(note in e for e in err) == 1 and all(e.startswith("obslib: note: ") for e in err[:-1]), err


# ------------------------------------------------------ no output obslib's own loader would refuse
def test_gradient_flow_that_diverges_is_one_line_and_writes_nothing(tiny_pipe_dir, tmp_path, capsys):
    real = torch.optim.AdamW.step

    def blowup(self, *a, **k):  # what --lr 1 does to the embedded model within a few steps, at once
        out = real(self, *a, **k)
        for g in self.param_groups:
            for p in g["params"]:
                p.data.fill_(float("nan"))
        return out

    torch.optim.AdamW.step = blowup
    try:
        rc, err = cli(["prune", tiny_pipe_dir, "--method", "gradient-flow", "--pattern", "structured", "--sparsity",
                       "0.25", "--iterations", "3", "--lr", "1", "--batch-size", "2", "--quiet", "--out",
                       tmp_path / "out"], capsys)
    finally:
        torch.optim.AdamW.step = real
    one_line(rc, err, "gradient-flow training diverged at iteration 1 of 3")
    assert "lower --lr" in err[0] and os.listdir(tmp_path) == []


def test_a_non_finite_pruned_model_is_refused_naming_the_layers(tiny_pipe, monkeypatch):
    import obslib.driver as drv

    before = {k: v.clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    real = drv.prune_model

    def poisoned(den, *a, **k):
        r = real(den, *a, **k)
        with torch.no_grad():
            den.transformer_blocks[1].attn.to_q.weight[0, 0] = float("inf")
        return r

    monkeypatch.setattr(drv, "prune_model", poisoned)
    from obslib.config import PruneConfig
    from obslib.shapes import prompts

    with pytest.raises(UsageError, match=r"the pruned weights of 1 parameter\(s\) are NaN or infinite "
                                         r"\(transformer_blocks.1.attn.to_q.weight\); no output was written"):
        obslib.prune(tiny_pipe, PruneConfig(prompts=prompts("train", 2), steps=2, batch_size=2, packages=1,
                                            progress=False))
    after = tiny_pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # put back exactly


# ------------------------------------------------------ a full disk wherever obslib writes
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_full(*a, **k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where, args, needle", [
    ("checkpoint", ["--packages", "2"], "while writing '.*pkg-0000'"),
    ("checkpoint-second", ["--packages", "3"], "while writing '.*pkg-0001'.*1 finished step\\(s\\) are checkpointed"),
    ("record", ["--packages", "2", "--calibration", "propagate", "--record-ram-mb", "0"],
     "while writing '.*b0000-000000.safetensors'"),
    ("save", ["--packages", "2"], "while writing '.*out' .*2 finished step\\(s\\) are checkpointed in .* continue with"),
])
def test_a_full_disk_is_one_line_naming_the_path(tiny_pipe_dir, tmp_path, capsys, monkeypatch, where, args, needle):
    import re

    import safetensors.torch as st

    import obslib.propagate as prop

    real = st.save_file
    calls = [0]

    def full_at(n):
        def save(tensors, path, *a, **k):
            calls[0] += 1
            if calls[0] >= n:
                _safetensors_full()
            return real(tensors, path, *a, **k)
        return save

    if where.startswith("checkpoint"):
        monkeypatch.setattr(st, "save_file", full_at(1 if where == "checkpoint" else 2))
    elif where == "record":
        monkeypatch.setattr(prop, "save_file", full_at(1))
    else:
        monkeypatch.setattr(type(obslib.load_pipeline(tiny_pipe_dir)), "save_pretrained", _enospc)
    (tmp_path / "keep.txt").write_text("mine")
    rc, err = cli(["prune", tiny_pipe_dir, *FAST, *args, "--out", tmp_path / "out"], capsys)
    one_line(rc, err, "no space left on the device while writing")
    assert re.search(needle, err[0]), err
    left = sorted(os.listdir(tmp_path))
    assert "out" not in left and (tmp_path / "keep.txt").read_text() == "mine"
    assert not [n for n in left if n.startswith(".obslib-tmp") or n.startswith(".obslib-lock")
                or n.startswith(".obslib-record")]
    ck = tmp_path / ".obslib-ckpt-out"
    if ck.exists():  # only complete entries: no half-written one
        assert all(not n.endswith(tuple(f".tmp-{i}" for i in range(10))) and ".tmp-" not in n for n in os.listdir(ck))


def test_evaluate_on_a_full_disk_is_one_line_and_keeps_the_previous_metrics(tiny_pipe_dir, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "m.json"
    assert cli(["evaluate", tiny_pipe_dir, "--num-prompts", "2", "--steps", "2", "--out", out], capsys)[0] == 0
    before = out.read_bytes()
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: _enospc() if str(a).endswith((".tmp", ".tmp.png")) else real(a, b))
    one_line(*cli(["evaluate", tiny_pipe_dir, "--num-prompts", "2", "--steps", "2", "--out", out], capsys),
             "no space left on the device while writing")
    assert out.read_bytes() == before and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ------------------------------------------------------ SIGTERM like Ctrl-C, also during the save
def test_sigterm_says_where_the_checkpoint_is_and_the_run_continues(tiny_pipe_dir, tmp_path):
    r = _cli_sub([tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut"], kill_at=3, sig=signal.SIGTERM)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obslib: terminated (SIGTERM); 2 finished step(s) are "
                                                   "checkpointed in "), lines
    assert lines[0].endswith(f"--out {tmp_path / 'cut'} --resume")
    assert sorted(os.listdir(tmp_path)) == [".obslib-ckpt-cut"]
    r = _cli_sub([tiny_pipe_dir, *STRUCT, "--out", tmp_path / "cut", "--resume"])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["cut"]


def _save_sub(args, sig):
    code = f"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import diffusers
real = diffusers.DiffusionPipeline.save_pretrained
def dying(self, d, **kw):
    real(self, d, **kw)
    os.kill(os.getpid(), {int(sig)})   # during the save: after the weights, before the swap
diffusers.DiffusionPipeline.save_pretrained = dying
from obslib.cli import main
sys.exit(main({['prune', *map(str, args)]!r}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_the_save_names_the_checkpoint(tiny_pipe_dir, tmp_path, sig, rc, word):
    r = _save_sub([tiny_pipe_dir, *FAST, "--packages", "2", "--out", tmp_path / "out"], sig)
    assert r.returncode == rc, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"obslib: {word}; 2 finished step(s) are checkpointed in "), lines
    assert sorted(os.listdir(tmp_path)) == [".obslib-ckpt-out"]  # no temporary output, no lock, no --out


# ------------------------------------------------------ two runs on one --out or checkpoint directory
def _start(args, go):
    """A prune that, once in its calibration, waits until the file ``go`` exists (so the second run meets it)."""
    code = f"""
import os, sys, time
import obslib.sampling as s
real = s.CalibrationRunner.run
def run(self, *a, **k):
    while not os.path.exists({str(go)!r}):
        time.sleep(0.05)
    return real(self, *a, **k)
s.CalibrationRunner.run = run
from obslib.cli import main
sys.exit(main({['prune', *map(str, args)]!r}))
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("second", ["same --out", "same --checkpoint-dir"])
def test_a_second_run_on_the_same_paths_is_refused_while_the_first_finishes(tiny_pipe_dir, tmp_path, second):
    ck, go = tmp_path / "ck", tmp_path.parent / f"{tmp_path.name}-go"
    first = _start([tiny_pipe_dir, *FAST, "--packages", "4", "--out", tmp_path / "out", "--checkpoint-dir", ck], go)
    lock = tmp_path / (".obslib-lock-ck" if second == "same --checkpoint-dir" else ".obslib-lock-out")
    t = time.time()
    while not lock.exists() and time.time() - t < 120 and first.poll() is None:
        time.sleep(0.05)
    assert lock.exists()
    other = tmp_path / ("out" if second == "same --out" else "out2")
    r = subprocess.run([sys.executable, "-c", f"from obslib.cli import main; import sys; sys.exit(main("
                        f"{['prune', tiny_pipe_dir, *FAST, '--out', str(other), '--checkpoint-dir', str(ck)]!r}))"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    flag = "--out" if second == "same --out" else "--checkpoint-dir"
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"obslib: error: {flag} ") \
        and "another obslib run (process " in lines[0], lines
    go.write_text("")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out"]  # exactly one output, nothing else left
    obslib.load_pipeline(str(tmp_path / "out"))


def test_a_lock_file_obslib_did_not_write_is_never_touched(tiny_pipe_dir, tmp_path, capsys):
    (tmp_path / ".obslib-lock-out").write_text("my notes")
    one_line(*cli(["prune", tiny_pipe_dir, *FAST, "--out", tmp_path / "out"], capsys),
             "is in the way and obslib did not write it")
    assert sorted(os.listdir(tmp_path)) == [".obslib-lock-out"]
    assert (tmp_path / ".obslib-lock-out").read_text() == "my notes"


@pytest.mark.parametrize("pid", [DEAD, os.getpid()], ids=["dead PID", "this PID (a restarted container)"])
def test_a_dead_runs_lock_is_taken_over(tiny_pipe, tmp_path, pid):
    """Whatever PID it names: nobody holds its flock, so its process is gone."""
    (tmp_path / ".obslib-lock-out").write_text(json.dumps({"written_by": "obslib", "kind": "lock", "pid": pid}))
    obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_marker_a_killed_swap_left_in_the_old_output_is_removed(tiny_pipe, tmp_path):
    out = tmp_path / "out"
    obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(out))
    _marked = json.dumps({"written_by": "obslib", "purpose": "old", "pid": DEAD, "ino": os.lstat(out).st_ino})
    (out / owned.SCRATCH).write_text(_marked)  # killed after marking the old output, before the swap
    obslib.save_pruned(tiny_pipe, {"method": "magnitude"}, str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and owned.not_ours(str(out)) == []


def test_a_lock_is_re_entrant_and_refuses_a_live_owner(tmp_path):
    with owned.RunLock(str(tmp_path / "out")):
        with owned.RunLock(str(tmp_path / "out")):  # the library's save inside the command's run
            pass
        assert (tmp_path / ".obslib-lock-out").exists()
        info = json.load(open(tmp_path / ".obslib-lock-out"))
        assert info["pid"] == os.getpid()
        code = ("import sys; from obslib.owned import RunLock\n"
                f"try:\n    RunLock({str(tmp_path / 'out')!r}).__enter__()\nexcept ValueError as e:\n    print(e)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert f"another obslib run (process {os.getpid()}) is using it" in r.stdout
    assert os.listdir(tmp_path) == []


def test_an_interrupt_right_after_the_swap_says_the_output_is_complete(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    import obslib.io as io

    out = tmp_path / "out"
    assert cli(["prune", tiny_pipe_dir, *FAST, "--packages", "2", "--out", out], capsys)[0] == 0
    real = io._drop_old

    def interrupted(path):  # Ctrl-C delivered as the swap's held signals are let through
        real(path)
        raise KeyboardInterrupt()

    monkeypatch.setattr(io, "_drop_old", interrupted)
    rc, err = cli(["prune", tiny_pipe_dir, *FAST, "--packages", "2", "--sparsity", "0.3", "--overwrite", "--out", out],
                  capsys)
    assert rc == 130 and err == [f"obslib: interrupted after {out} was written (it is complete)"], err
    assert sorted(os.listdir(tmp_path)) == ["out"]  # its checkpoint removed, nothing else left
    assert json.load(open(out / "pruning_report.json"))["sparsity_target"] == 0.3


def test_ctrl_c_inside_the_swap_waits_until_the_swap_is_done(tiny_pipe, tmp_path, monkeypatch):
    import obslib.io as io

    out = tmp_path / "out"
    obslib.save_pruned(tiny_pipe, {"method": "magnitude", "marker": 1}, str(out))
    real = io._exchange

    def exchange_under_ctrl_c(a, b):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the renames
        return real(a, b)

    monkeypatch.setattr(io, "_exchange", exchange_under_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        obslib.save_pruned(tiny_pipe, {"method": "magnitude", "marker": 2}, str(out), overwrite=True)
    assert json.load(open(out / "pruning_report.json"))["marker"] == 2  # the swap finished first
    assert sorted(os.listdir(tmp_path)) == ["out"] and owned.not_ours(str(out)) == []


def test_a_failed_swap_leaves_the_old_output_exactly_as_it_was(tiny_pipe, tmp_path, monkeypatch):
    import obslib.io as io

    out = tmp_path / "out"
    obslib.save_pruned(tiny_pipe, {"method": "magnitude", "marker": 1}, str(out))
    before = tree(out)
    monkeypatch.setattr(io, "_exchange", lambda a, b: _enospc())
    with pytest.raises(UsageError, match="no space left"):
        obslib.save_pruned(tiny_pipe, {"method": "magnitude", "marker": 2}, str(out), overwrite=True)
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["out"]  # no marker left in it, no temporary
