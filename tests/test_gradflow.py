"""Gradient-flow reconstruction: the Hessian-gradient product, exact hard pruning of closed gates, every
table (prune -> forward -> save -> reload), training data folders, restore on failure, and resume after
SIGKILL giving identical bytes."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import obslib
from obslib.config import PruneConfig
from obslib.driver import prune_model
from obslib.surgery import NoUndo as _NoUndo, remove_heads, remove_neurons
from obslib.archs import spec_for
from obslib.gradflow import ImageFolder, SoftMasks, hessian_gradient
from obslib.io import UsageError, load_pruned_model
from obslib.packages import structured_units

from test_archs import BUILDERS, _run

GF = dict(method="gradient-flow", pattern="structured", progress=False)


def test_hessian_gradient_is_exact_on_a_quadratic():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = A @ A.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    m = torch.rand(6, generator=g, dtype=torch.float64)
    loss = lambda x: 0.5 * x @ A @ x + b @ x  # noqa: E731
    grad = A @ m + b
    assert torch.allclose(hessian_gradient(loss, m, grad), A @ grad, rtol=1e-6)


@pytest.mark.parametrize("arch", ["sd3.5", "unet"])
def test_closed_gates_are_removed_exactly(arch):
    """Closing the gates of some heads and neurons, then removing them physically, leaves outputs unchanged."""
    torch.manual_seed(0)
    model, inputs = BUILDERS[arch]()
    model.eval()
    units = structured_units(model, spec_for(model), [1])
    masks = SoftMasks(model, units)
    chosen = [[0] if u.kind == "heads" else [1, 3, 5] for u in units]
    for ui, c in enumerate(chosen):
        masks.m[torch.tensor(c) + masks.slices[ui].start] = 0.0
    with masks:
        gated = _run(model, inputs)
    assert not torch.allclose(gated, _run(model, inputs))  # the gates do something
    for u, c in zip(units, chosen):
        (remove_heads if u.kind == "heads" else remove_neurons)(model, u, c, _NoUndo())
    assert torch.allclose(_run(model, inputs), gated, atol=1e-5)


def _synthetic(model, inputs, out_shape_of):
    def batches(i):
        g = torch.Generator().manual_seed(1000 + i)
        kw = inputs(g)
        return kw, torch.randn(out_shape_of(kw), generator=g)
    return batches


@pytest.mark.parametrize("arch", ["sd3.5", "unet"])
def test_gradient_flow_prune_forward_save_reload(arch, tmp_path):
    torch.manual_seed(0)
    model, inputs = BUILDERS[arch]()
    model.eval()
    shape = tuple(_run(model, inputs).shape)
    before = sum(p.numel() for p in model.parameters())
    cfg = PruneConfig(**GF, sparsity=0.5, iterations=9, lr=1e-3, exclude_first_last=False)
    rep = prune_model(model, None, cfg, 3, component=spec_for(model).component,
                      train_batches=_synthetic(model, inputs, lambda kw: shape))
    assert rep["params_after"] < before and rep["sparsity_actual"] > 0.3
    assert any("removed_heads" in r for r in rep["layers"]) and any("removed_neurons" in r for r in rep["layers"])
    assert len(rep["loss"]) >= 1 and all(np.isfinite(v) for _, v in rep["loss"])
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "m")
    re = load_pruned_model(str(tmp_path / "m"), type(model), rep["manifest"])
    assert torch.equal(_run(re, inputs), out)


def test_failed_training_restores_the_pipeline(tiny_pipe, monkeypatch):
    import obslib.gradflow as gf

    den = tiny_pipe.transformer
    den.pos_embed.requires_grad_(False)  # a user's own flag: must survive
    snapshot = {k: v.clone() for k, v in den.state_dict().items()}
    flags = {n: p.requires_grad for n, p in den.named_parameters()}
    real = gf.training_batches

    def dying(pipe, cfg, defaults):
        batches = real(pipe, cfg, defaults)

        def b(i):
            if i == 5:
                raise KeyboardInterrupt
            return batches(i)
        return b

    monkeypatch.setattr(gf, "training_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        obslib.prune(tiny_pipe, PruneConfig(**GF, sparsity=0.25, prompts=["x"], iterations=10, lr=1e-2, batch_size=2))
    assert all(torch.equal(v, snapshot[k]) for k, v in den.state_dict().items())
    assert {n: p.requires_grad for n, p in den.named_parameters()} == flags


def _png_folder(tmp_path, n=3):
    from PIL import Image

    d = tmp_path / "data"
    d.mkdir()
    with open(d / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n")
    return d


def test_train_data_folder(tiny_pipe, tmp_path):
    d = _png_folder(tmp_path)
    caps, x = ImageFolder(str(d), 48, 4, 0)(0)
    assert len(caps) == 4 and x.shape == (4, 3, 48, 48) and -1 <= float(x.min()) <= float(x.max()) <= 1
    assert ImageFolder(str(d), 48, 4, 0)(3)[0] == ImageFolder(str(d), 48, 4, 0)(3)[0]  # a pure function of i
    rep = obslib.prune(tiny_pipe, PruneConfig(**GF, sparsity=0.25, prompts=["x"], iterations=3, batch_size=2,
                                              train_data=str(d)))
    assert rep["params_after"] < rep["params_before"]
    (d / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(UsageError, match="names 'missing.png'"):
        ImageFolder(str(d), 48, 4, 0)
    with pytest.raises(UsageError, match="expected a folder with images and metadata.jsonl"):
        ImageFolder(str(tmp_path / "nothing"), 48, 4, 0)


def _cli(*args, kill_at=None):
    """The prune command in a subprocess; with ``kill_at`` it SIGKILLs itself when training batch
    ``kill_at`` is requested (a kill at a chosen point, reproducibly)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = f"""
import os, signal, sys
import obslib.gradflow as gf
real = gf.training_batches
def patched(*a, **k):
    b = real(*a, **k)
    def batch(i):
        if i == {kill_at!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        return b(i)
    return batch
gf.training_batches = patched
from obslib.cli import main
sys.exit(main({['prune', *map(str, args)]!r}))
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("kill_at", [37])  # between the checkpoints at 25 and 50
def test_resume_after_sigkill_finishes_with_identical_bytes(tiny_pipe_dir, tmp_path_factory, kill_at):
    tmp_path = tmp_path_factory.getbasetemp() / "gf-resume"
    tmp_path.mkdir(exist_ok=True)
    args = [tiny_pipe_dir, "--method", "gradient-flow", "--pattern", "structured", "--sparsity", "0.25",
            "--iterations", "60", "--lr", "1e-3", "--batch-size", "2", "--quiet"]
    if not (tmp_path / "whole").exists():
        r = _cli(*args, "--out", tmp_path / "whole")
        assert r.returncode == 0, r.stderr
    cut = tmp_path / f"cut{kill_at}"
    ck = tmp_path / f".obslib-ckpt-cut{kill_at}"
    r = _cli(*args, "--out", cut, kill_at=kill_at)
    assert r.returncode == -signal.SIGKILL
    assert not cut.exists() and sorted(os.listdir(ck)) == sorted(["obslib_checkpoint.json", f"it-{25 * (kill_at // 25):07d}"])
    r = _cli(*args, "--out", cut)  # without --resume: refused, nothing lost
    assert r.returncode == 2 and "--resume" in r.stderr and ck.exists()
    r = _cli(*args, "--out", cut, "--resume")
    assert r.returncode == 0, r.stderr
    assert not ck.exists()  # removed once the output is complete
    a = (tmp_path / "whole" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (cut / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
    ra = json.load(open(tmp_path / "whole" / "pruning_report.json"))
    rb = json.load(open(cut / "pruning_report.json"))
    assert ra["groups_removed"] == rb["groups_removed"] and ra["loss"] == rb["loss"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["slimdiff", "gradient-flow"])
def test_peer_methods_on_unet_pipelines_save_and_reload(request, tmp_path, method, kind):
    """Pipeline level on SD 2.x- and SDXL-style UNets: calibration by sampling (SlimDiff) or training on the
    model's own epsilon loss from a --train-data folder (gradient flow); saved, reloaded, identical images."""
    tiny_sd_pipe = request.getfixturevalue("tiny_sd_pipe" if kind == "sd" else "tiny_sdxl_pipe")
    d = _png_folder(tmp_path)
    cfg = PruneConfig(method=method, pattern="structured", sparsity=0.25, prompts=["a red circle", "a blue square"],
                      steps=2, batch_size=2, iterations=3, train_data=str(d), exclude_first_last=False, progress=False)
    before = sum(p.numel() for p in tiny_sd_pipe.unet.parameters())
    rep = obslib.prune(tiny_sd_pipe, cfg)
    assert rep["params_after"] < before == rep["params_before"]
    img = lambda p: p("a red circle", num_inference_steps=2, output_type="np",  # noqa: E731
                      generator=torch.Generator().manual_seed(0)).images
    out = img(tiny_sd_pipe)
    assert np.isfinite(out).all()
    obslib.save_pruned(tiny_sd_pipe, rep, str(tmp_path / "p"))
    re = obslib.load_pipeline(str(tmp_path / "p"))
    assert type(re).__name__ == type(tiny_sd_pipe).__name__ and (img(re) == out).all()
