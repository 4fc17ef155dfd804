"""The helpers the walkthrough (notebooks/00_walkthrough.py) uses to explain the solver: the damping it applies,
and the worked OBS step on a 4 x 4 layer it checks by hand."""
import pytest
import torch

from obslib.hessian import LayerStats
from obslib.obs import damped_inverse, damping, obs_prune, saliency


def test_damping_is_percdamp_times_the_mean_live_diagonal():
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0, 6.0], dtype=torch.float64))
    dead, lam = damping(H, 0.1)
    assert dead.tolist() == [False, True, False, False]
    assert lam == pytest.approx(0.1 * 4.0)  # mean of 2, 4, 6: the dead input does not count


def test_damped_inverse_uses_that_damping():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 5, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 32
    _, lam = damping(H, 0.01)
    Hinv, _ = damped_inverse(H, 0.01)
    assert torch.allclose(Hinv, torch.linalg.inv(H + lam * torch.eye(5, dtype=torch.float64)), atol=1e-12)


def test_worked_example_first_step_is_the_textbook_obs_step():
    """The walkthrough's 4 x 4 example: input 1 nearly repeats input 0, so row 1's weight on input 0 is its
    cheapest although not its smallest; the solver removes it and only it, and the row equals one textbook step."""
    g = torch.Generator().manual_seed(16)
    W = torch.randn(4, 4, generator=g, dtype=torch.float64)
    X = torch.randn(16, 4, generator=g)
    X[:, 1] = X[:, 0] + 0.2 * torch.randn(16, generator=g)
    st = LayerStats(4, "cpu")
    st.add(X, alpha=1.0)
    H = st.H.double()
    W_hat, mask = obs_prune(W, H, 0.5, percdamp=0.01, dtype=torch.float64)
    _, lam = damping(H, 0.01)
    Hinv = torch.linalg.inv(H + lam * torch.eye(4, dtype=torch.float64))
    r, w = 1, W[1]
    L = w**2 / (2 * Hinv.diagonal())
    q = int(L.argmin())
    delta = -w[q] / Hinv[q, q] * Hinv[:, q]
    assert q == 0 and int(w.abs().argmin()) != q  # the cheapest weight is not the smallest one
    assert torch.allclose(L, saliency(W, H, 0.01)[r])
    assert mask[r].tolist() == [True, False, False, False]
    assert torch.allclose(W_hat[r], w + delta, atol=1e-6)
    assert int(mask.sum()) == 8
