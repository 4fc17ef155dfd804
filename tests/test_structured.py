"""Structured OBS (heads, neurons, RRF) against closed forms, and physical removal against zero-masking."""
import copy

import pytest
import torch

import obslib
from obslib.shapes import prompts
from obslib.structured import group_saliency, group_update, prune_heads, prune_neurons, rrf_fuse


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(5 * n, n, generator=g, dtype=torch.float64)
    X = X + 0.5 * X @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return 2 * X.T @ X / X.shape[0]


def test_group_update_is_optimal_and_costs_the_saliency():
    H = spd(12, 0)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    S = [3, 4, 5]
    W2 = group_update(W, Hinv, S)
    D = W2 - W
    assert (W2[:, S] == 0).all()
    # optimal: the gradient of 1/2 tr(D H D^T) w.r.t. the kept columns vanishes
    R = [i for i in range(12) if i not in S]
    assert torch.allclose((D @ H)[:, R], torch.zeros(5, len(R), dtype=torch.float64), atol=1e-9)
    cost = 0.5 * torch.einsum("ij,jk,ik->", D, H, D)
    assert float(group_saliency(W, Hinv, [S])[0]) == pytest.approx(float(cost), rel=1e-8)


def test_exact_head_choice_matches_bruteforce_and_diag_is_an_approximation():
    H = spd(16, 2)
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    groups = [list(range(i * 4, i * 4 + 4)) for i in range(4)]
    costs = []
    for S in groups:  # brute force: the reconstruction error left after the optimal compensation
        D = group_update(W, Hinv, S) - W
        costs.append(float(0.5 * torch.einsum("ij,jk,ik->", D, H, D)))
    exact = group_saliency(W, Hinv, groups, exact=True)
    assert torch.allclose(exact, torch.tensor(costs, dtype=torch.float64), rtol=1e-8)
    diag = group_saliency(W, Hinv, groups, exact=False)
    assert not torch.allclose(diag, exact)


def test_prune_neurons_removes_requested_columns_and_beats_no_compensation():
    H = spd(24, 4)
    W = torch.randn(8, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    W2, removed = prune_neurons(W, H, 6, batch=2, percdamp=0.0)
    assert len(removed) == 6 and (W2[:, removed] == 0).all()
    W_plain = W.clone()
    W_plain[:, removed] = 0
    err = lambda A: float(torch.einsum("ij,jk,ik->", A - W, H, A - W))  # noqa: E731
    assert err(W2) < err(W_plain)


def test_rrf_fusion_k60():
    a = torch.tensor([0.1, 0.5, 0.3])  # ranks (1 = least salient): 1, 3, 2
    b = torch.tensor([0.9, 0.2, 0.4])  # ranks: 3, 1, 2
    s = rrf_fuse([a, b], k=60)
    expected = torch.tensor([1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62 + 1 / 62], dtype=torch.float64)
    assert torch.allclose(s, expected)


def test_joint_heads_remove_the_same_head_from_both_projections():
    Ws = [torch.randn(6, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in (6, 7)]
    Hs = [spd(16, 8), spd(16, 9)]
    new, removed = prune_heads(Ws, Hs, head_dim=4, n_remove=2)
    assert len(removed) == 2
    for W in new:
        for h in removed:
            assert (W[:, h * 4:(h + 1) * 4] == 0).all()


def _zero_masked_dense(dense, pruned, report):
    """Put the pruned model's (compensated) weights back into full-size zero-padded matrices."""
    model = copy.deepcopy(dense)
    for entry in report["layers"]:
        name = entry["name"]
        full = model.get_submodule(name).weight.data
        small = pruned.get_submodule(name).weight.data
        if "removed_heads" in entry:
            hd = full.shape[1] // dense.get_submodule(name.rsplit(".", 2)[0] if name.endswith("to_out.0") else name.rsplit(".", 1)[0]).heads
            keep = [c for c in range(full.shape[1]) if c // hd not in entry["removed_heads"]]
        else:
            keep = None
        if keep is None:  # neurons: find kept columns by matching the up-projection rows
            up = name.replace("net.2", "net.0.proj")
            rows_full, rows_small = dense.get_submodule(up).weight.data, pruned.get_submodule(up).weight.data
            keep = [int(torch.nonzero((rows_full == r).all(1))[0]) for r in rows_small]
        full.zero_()
        full[:, keep] = small
    return model


def test_structured_pruned_model_equals_zero_masked_dense(tiny_pipe, tmp_path):
    dense = copy.deepcopy(tiny_pipe.transformer)
    cfg = obslib.PruneConfig(pattern="structured", sparsity=0.25, prompts=prompts("train", 4), steps=2,
                             batch_size=4, packages=2, progress=False)
    report = obslib.prune(tiny_pipe, cfg)
    pruned = tiny_pipe.transformer
    assert report["params_after"] < report["params_before"]
    heads = [m.heads for n, m in pruned.named_modules() if n.endswith(".attn")]
    assert heads == [4, 3, 3, 4]  # first and last block excluded; 25% of 4 heads = 1
    ref = _zero_masked_dense(dense, pruned, report)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 12, generator=g)
    ctx = torch.randn(2, 32, 128, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    t = torch.tensor([500.0, 100.0])
    with torch.no_grad():
        a = pruned(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        b = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    assert torch.allclose(a, b, atol=1e-5)
    # save -> reload (manifest) -> identical outputs
    obslib.save_pruned(tiny_pipe, report, str(tmp_path / "p"))
    re = obslib.load_pruned(str(tmp_path / "p"))
    with torch.no_grad():
        c = re.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    assert torch.equal(a, c)
