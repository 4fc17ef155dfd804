"""--allocation global (obslib.allocation): the budget is met, cheap layers give more, and the prune runs."""
import pytest
import torch

import obslib
from obslib.allocation import allocate, relative_costs
from obslib.errors import UsageError
from obslib.shapes import prompts


def test_allocation_meets_the_budget_and_spends_it_where_removal_is_cheap():
    g = torch.Generator().manual_seed(0)
    costs = {"cheap": torch.rand(40, 50, generator=g) * 0.01, "dear": torch.rand(30, 50, generator=g),
             "mid": torch.rand(20, 50, generator=g) * 0.1}
    for s in (0.3, 0.5, 0.7):
        out = allocate(costs, s)
        removed = sum(out[k] * v.numel() for k, v in costs.items())
        assert removed == pytest.approx(s * sum(v.numel() for v in costs.values()), abs=1.0)
        assert out["cheap"] >= out["mid"] >= out["dear"]
        assert all(s - 0.2 - 1e-9 <= v <= s + 0.2 + 1e-9 for v in out.values())
    same = {k: torch.full((10, 10), 0.5) + 0.0 * v[:10, :10] for k, v in costs.items()}
    assert all(v == pytest.approx(0.5, abs=0.011) for v in allocate(same, 0.5).values())


def test_relative_costs_are_the_obs_costs_over_the_output_energy():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 8, generator=g)
    H = 2 * X.t() @ X / 200
    W = torch.randn(4, 8, generator=g)
    r = relative_costs(W, H, percdamp=0.0)
    Hinv = torch.linalg.inv(H.double())
    expect = W.double() ** 2 / Hinv.diagonal() / float(((W.double() @ H.double()) * W.double()).sum())
    assert torch.allclose(r.double(), expect, rtol=1e-4)
    assert torch.allclose(relative_costs(3 * W, H, 0.0), r, rtol=1e-4)  # scale-free per layer


def test_prune_with_global_allocation(tiny_pipe_dir):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    rep = obslib.prune(pipe, obslib.PruneConfig(sparsity=0.6, allocation="global", prompts=prompts("train", 4), steps=2,
                                                batch_size=4, packages=2, progress=False))
    per = [e["sparsity"] for e in rep["layers"]]
    assert rep["sparsity_actual"] == pytest.approx(0.6, abs=0.01)
    assert max(per) - min(per) > 0.05 and all(0.39 <= p <= 0.81 for p in per)


@pytest.mark.parametrize("kw, needle", [
    (dict(allocation="best"), "allocation 'best' is unknown; allowed: uniform, global"),
    (dict(allocation="global", pattern="2:4"), "--allocation global does not apply to 2:4"),
    (dict(allocation="global", method="magnitude"), "--allocation global needs a method that calibrates a Hessian"),
])
def test_allocation_bad_input(kw, needle):
    with pytest.raises(UsageError, match=needle):
        obslib.PruneConfig(**kw).validate()
