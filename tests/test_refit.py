"""Refit on a fixed mask (obslib.refit) against a direct least-squares solve, and through prune and the CLI."""
import json

import pytest
import torch

import obslib
from obslib.errors import UsageError
from obslib.obs import obs_prune
from obslib.refit import damped_hessian, refit, refit_exact, row_errors
from obslib.shapes import prompts


def _layer(seed, rows=24, cols=48):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3 + 0.1 * torch.randn(400, cols, generator=g)
    return torch.randn(rows, cols, generator=g), 2 * X.t() @ X / 400


@pytest.mark.parametrize("seed, sparsity, nm", [(0, 0.5, (0, 0)), (1, 0.7, (0, 0)), (2, 0.5, (2, 4))])
def test_refit_reaches_the_direct_solve_and_never_raises_the_error(seed, sparsity, nm):
    W, H = _layer(seed)
    Wo, M = obs_prune(W, H, sparsity, *nm)[:2]
    Hd = damped_hessian(H, 0.01, torch.float64)
    e_obs = float(row_errors(W.double(), Wo.double(), Hd).sum())
    Wx = refit_exact(W, M, H)
    e_x = float(row_errors(W.double(), Wx.double(), Hd).sum())
    assert e_x < e_obs * 0.99  # the sequential OBS update is not the optimum for its own mask
    last = e_obs
    for it in (1, 3, 10, 60):
        Wr, info = refit(W, Wo, M, H, iterations=it)
        assert info["error_before"] == pytest.approx(e_obs, rel=1e-4)
        assert info["error_after"] <= last * (1 + 1e-5) and info["error_after"] >= e_x * (1 - 1e-4)
        assert torch.equal(Wr[M], torch.zeros(int(M.sum())))  # the mask is kept
        last = info["error_after"]
    assert torch.allclose(Wr, Wx, atol=1e-3) and last == pytest.approx(e_x, rel=1e-4)


def test_refit_of_the_optimum_changes_nothing_and_a_row_that_would_get_worse_keeps_its_start():
    W, H = _layer(3)
    M = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    Wx = refit_exact(W, M, H)
    Wr, info = refit(W, Wx, M, H, iterations=5)
    assert info["error_after"] <= info["error_before"] * (1 + 1e-6) and torch.allclose(Wr, Wx, atol=1e-4)
    assert refit(W, Wx, M, H, iterations=0)[1]["rows_kept"] == 0
    with pytest.raises(ValueError, match="iterations -1"):
        refit(W, Wx, M, H, iterations=-1)


def test_prune_with_refit_lowers_every_layer_error(tiny_pipe_dir):
    errs = {}
    for it in (0, 20):
        pipe = obslib.load_pipeline(tiny_pipe_dir)
        rep = obslib.prune(pipe, obslib.PruneConfig(sparsity=0.6, prompts=prompts("train", 4), steps=2, batch_size=4,
                                                    packages=1, refit_iterations=it, progress=False))
        errs[it] = {e["name"]: e["rel_error"] for e in rep["layers"]}
        w = pipe.transformer.transformer_blocks[1].ff.net[2].weight
        assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert errs[0].keys() == errs[20].keys()
    assert all(errs[20][k] <= errs[0][k] * 1.001 + 1e-9 for k in errs[0])
    assert sum(errs[20].values()) < 0.95 * sum(errs[0].values())


@pytest.mark.parametrize("kw, needle", [
    (dict(method="magnitude"), "--refit needs a method that calibrates a Hessian; 'magnitude' has none"),
    (dict(pattern="structured", sparsity=0.25), "--refit applies to unstructured and N:M patterns"),
    (dict(refit_iterations=-1), r"refit_iterations -1 is outside \[0, 100000\]"),
])
def test_refit_bad_input(kw, needle):
    with pytest.raises(UsageError, match=needle):
        obslib.PruneConfig(**{"refit_iterations": 5, **kw}).validate()


def test_cli_refit_bad_method_is_one_line_exit_2(tiny_pipe_dir, tmp_path, capsys):
    from obslib.cli import main

    out = tmp_path / "o"
    assert main(["prune", tiny_pipe_dir, "--method", "magnitude", "--refit", "--num-prompts", "2", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--refit needs a method" in lines[0] and not out.exists()
    assert main(["prune", tiny_pipe_dir, "--refit", "--refit-iterations", "5", "--sparsity", "0.5", "--num-prompts", "2", "--steps", "2",
                 "--packages", "1", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert json.load(open(out / "pruning_report.json"))["config"]["refit_iterations"] == 5
