"""Resumable package-by-package pruning: after an interruption (an exception, or SIGKILL at chosen points)
the rerun with resume continues from the last finished package and ends bit-identical."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import obslib
from obslib.config import PruneConfig
from obslib.io import UsageError
from obslib.shapes import prompts

BASE = dict(prompts=prompts("train", 4), steps=2, batch_size=2, packages=4, progress=False)


def _weights(pipe):
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


@pytest.mark.parametrize("pattern, sparsity, extra", [("unstructured", 0.5, {}), ("structured", 0.25, {}),
                                                      ("unstructured", 0.6, {"allocation": "global"}),
                                                      ("structured", 0.25, {"allocation": "global", "param_budget": 0.2})])
def test_interrupted_prune_resumes_to_identical_weights(tiny_pipe_dir, tmp_path, monkeypatch, pattern, sparsity, extra):
    import obslib.sampling as packages

    whole = obslib.load_pipeline(tiny_pipe_dir)
    rep_whole = obslib.prune(whole, PruneConfig(**BASE, pattern=pattern, sparsity=sparsity, **extra))
    ck = str(tmp_path / "ck")
    cfg = dict(BASE, pattern=pattern, sparsity=sparsity, checkpoint_dir=ck, **extra)
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    before = _weights(pipe)
    real, calls = packages.CalibrationRunner.run, {"n": 0}

    def dying(self, calib, desc="calibration"):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, calib, desc)

    monkeypatch.setattr(packages.CalibrationRunner, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        obslib.prune(pipe, PruneConfig(**cfg))
    monkeypatch.setattr(packages.CalibrationRunner, "run", real)
    assert {k: torch.equal(v, before[k]) for k, v in _weights(pipe).items()} == {k: True for k in before}
    assert sorted(os.listdir(ck)) == ["obslib_checkpoint.json", "pkg-0000", "pkg-0001"]
    with pytest.raises(UsageError, match="pass --resume"):
        obslib.prune(pipe, PruneConfig(**cfg))
    with pytest.raises(UsageError, match="different configuration"):
        obslib.prune(pipe, PruneConfig(**{**cfg, "seed": 1}, resume=True))
    rep = obslib.prune(pipe, PruneConfig(**cfg, resume=True))
    a, b = _weights(whole), _weights(pipe)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [layer["name"] for layer in rep["layers"]] == [layer["name"] for layer in rep_whole["layers"]]
    assert [b_.attn.heads for b_ in pipe.transformer.transformer_blocks] == \
        [b_.attn.heads for b_ in whole.transformer.transformer_blocks]


def _cli(args, kill_at=None):
    code = f"""
import os, signal, sys
import obslib.sampling as packages
real, calls = packages.CalibrationRunner.run, [0]
def run(self, calib, desc="calibration"):
    calls[0] += 1
    if calls[0] == {kill_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, calib, desc)
packages.CalibrationRunner.run = run
from obslib.cli import main
sys.exit(main({['prune', *map(str, args)]!r}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_at_chosen_points_then_resume_gives_identical_bytes(tiny_pipe_dir, tmp_path):
    args = [tiny_pipe_dir, "--num-prompts", "4", "--steps", "2", "--batch-size", "2", "--packages", "4", "--quiet"]
    r = _cli(args + ["--out", tmp_path / "whole"])
    assert r.returncode == 0, r.stderr
    ref = (tmp_path / "whole" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    for kill_at in (2, 4):
        out, ck = tmp_path / f"cut{kill_at}", tmp_path / f".obslib-ckpt-cut{kill_at}"
        r = _cli(args + ["--out", out], kill_at=kill_at)
        assert r.returncode == -signal.SIGKILL and not out.exists()
        assert sorted(os.listdir(ck)) == ["obslib_checkpoint.json"] + [f"pkg-{i:04d}" for i in range(kill_at - 1)]
        r = _cli(args + ["--out", out])
        assert r.returncode == 2 and "--resume" in r.stderr
        r = _cli(args + ["--out", out, "--resume"])
        assert r.returncode == 0, r.stderr
        assert not ck.exists()
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == ref
        assert json.load(open(out / "pruning_report.json"))["packages"] == 4
