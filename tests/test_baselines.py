"""Each baseline's defining property on a small problem."""
import pytest
import torch

import obslib
from obslib.baselines import dsnot_refine, wanda_score
from obslib.hessian import LayerStats
from obslib.methods import METHODS
from obslib.shapes import prompts


def stats_for(n, seed, tokens=400, shift=0.7):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) * torch.rand(n, generator=g) * 2 + shift * torch.randn(n, generator=g)
    st = LayerStats(n, "cpu")
    st.add(X, 1.0)
    return st, X.double()


class Cfg:
    blocksize, percdamp, head_saliency, neuron_batch, extra = 128, 0.01, "exact", 4, {}


def W_(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_magnitude_one_threshold_per_matrix():
    W = W_(8, 16, 0)
    Wh, mask = METHODS["magnitude"].unstructured(W, None, 0.5, 0, 0, Cfg)
    assert mask.sum() == 64 and W.abs()[mask].max() <= W.abs()[~mask].min()


def test_wanda_prunes_exactly_per_row_by_weight_times_input_norm():
    st, X = stats_for(16, 1)
    W = W_(8, 16, 2)
    Wh, mask = METHODS["wanda"].unstructured(W, st, 0.5, 0, 0, Cfg)
    assert (mask.sum(1) == 8).all()
    score = W.abs() * X.norm(dim=0)
    for r in range(8):  # per row, every pruned score <= every kept score
        assert score[r][mask[r]].max() <= score[r][~mask[r]].min() + 1e-9
    assert torch.allclose(wanda_score(W, st) / score, (wanda_score(W, st) / score)[0, 0].expand(8, 16), rtol=1e-5)
    Wh, mask = METHODS["wanda"].unstructured(W, st, 0.5, 2, 4, Cfg)
    assert (mask.reshape(8, -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("m", [0, 4])
def test_dsnot_never_increases_its_objective(m):
    st, X = stats_for(32, 3)
    W = W_(16, 32, 4)
    _, mask0 = METHODS["wanda"].unstructured(W, st, 0.5, 2 if m else 0, m, Cfg)
    mask, hist = dsnot_refine(W, st, mask0, m)
    assert all(b <= a + 1e-12 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]
    assert (mask.sum(1) == mask0.sum(1)).all()  # same sparsity per row
    if m:
        assert (mask.reshape(16, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_equals_obs_diff_with_uniform_weights(tiny_pipe_dir):
    ws = {}
    for method, weighting in (("sparsegpt", "log-decrease"), ("obs-diff", "uniform")):
        pipe = obslib.load_pipeline(tiny_pipe_dir)
        rep = obslib.prune(pipe, obslib.PruneConfig(method=method, weighting=weighting, sparsity=0.5,
                                                    prompts=prompts("train", 2), steps=3, packages=2, progress=False))
        assert rep["weighting"] == "uniform"
        ws[method] = torch.cat([p.flatten() for p in pipe.transformer.parameters()])
    assert torch.equal(ws["sparsegpt"], ws["obs-diff"])


def test_l1_and_flap_structured_properties():
    st, X = stats_for(16, 5)
    W = W_(6, 16, 6)
    Wl, removed, bias = METHODS["l1-norm"].neurons(W, None, 4, Cfg)
    assert bias is None and (Wl[:, removed] == 0).all()
    norms = W.abs().sum(0)
    assert norms[removed].max() <= min(norms[i] for i in range(16) if i not in removed)
    kept = [i for i in range(16) if i not in removed]
    assert torch.equal(Wl[:, kept], W[:, kept])  # no compensation
    Wf, removed, bias = METHODS["flap"].neurons(W, st, 4, Cfg)
    # bias compensation keeps the mean output: W X + b == W_f X + b + delta on average
    out_mean = (X @ W.T).mean(0)
    assert torch.allclose((X @ Wf.T).mean(0) + bias, out_mean, atol=1e-6)
    Ws, heads, biases = METHODS["flap"].heads([W, W_(5, 16, 7)], [st, st], 4, 1, Cfg)
    assert len(heads) == 1 and len(biases) == 2


@pytest.mark.parametrize("method", ["magnitude", "wanda", "dsnot", "sparsegpt"])
def test_every_unstructured_baseline_runs_through_the_driver(tiny_pipe_dir, method):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    rep = obslib.prune(pipe, obslib.PruneConfig(method=method, pattern="2:4", sparsity=0.5,
                                                prompts=prompts("train", 2), steps=2, packages=1, progress=False))
    assert rep["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
    assert all(0 <= layer["rel_error"] for layer in rep["layers"])


def test_obs_diff_has_lower_error_than_every_baseline(tiny_pipe_dir):
    errs = {}
    for method in ("magnitude", "wanda", "dsnot", "obs-diff"):
        pipe = obslib.load_pipeline(tiny_pipe_dir)
        rep = obslib.prune(pipe, obslib.PruneConfig(method=method, sparsity=0.5, prompts=prompts("train", 4),
                                                    steps=2, packages=1, progress=False))
        errs[method] = sum(layer["rel_error"] for layer in rep["layers"])
    assert errs["obs-diff"] < min(errs["magnitude"], errs["wanda"], errs["dsnot"])
