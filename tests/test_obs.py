"""The unstructured / N:M OBS solver against exact references on small problems."""
import itertools

import pytest
import torch

from obslib.baselines import magnitude_prune
from obslib.obs import check_nm, damped_inverse_cholesky, obs_prune, reconstruction_error


def spd(n, seed, tokens=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens or 4 * n, n, generator=g, dtype=torch.float64)
    X = X @ torch.randn(n, n, generator=g, dtype=torch.float64) * 0.5 + X  # correlated inputs
    return 2 * X.T @ X / X.shape[0]


def rand_w(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sequential_obs_reference(W, H, mask):
    """Brute force: columns left to right; pruning column j compensates the not-yet-frozen columns j+1..
    with the explicit inverse of the trailing block of H (no Cholesky, no lazy blocks)."""
    W = W.clone()
    n = W.shape[1]
    for j in range(n):
        Hinv = torch.linalg.inv(H[j:, j:])
        for r in range(W.shape[0]):
            if mask[r, j]:
                W[r, j:] -= W[r, j] / Hinv[0, 0] * Hinv[0, :]
                W[r, j] = 0.0
    return W


def test_single_obs_step_equals_closed_form():
    n = 6
    H = spd(n, 0)
    w = torch.tensor([[0.001, 1.0, -2.0, 1.5, 0.7, -1.1]], dtype=torch.float64)
    W_hat, mask = obs_prune(w, H, sparsity=1 / n, blocksize=128, percdamp=0.0, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    expected = w - (w[0, 0] / Hinv[0, 0]) * Hinv[0:1, :]
    assert mask[0].tolist() == [True] + [False] * 5
    assert torch.allclose(W_hat, expected, atol=1e-10)
    # the loss increase equals the saliency w_q^2 / (2 [H^-1]_qq)
    d = W_hat - w
    assert float(0.5 * d @ H @ d.T) == pytest.approx(float(w[0, 0] ** 2 / (2 * Hinv[0, 0])), rel=1e-8)


def test_cholesky_diagonal_is_trailing_inverse():
    H = spd(8, 1)
    U, dead = damped_inverse_cholesky(H, percdamp=0.0)
    assert not dead.any()
    for j in range(8):
        assert U[j, j] ** 2 == pytest.approx(float(torch.linalg.inv(H[j:, j:])[0, 0]), rel=1e-8)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("blocksize", [8, 128])
def test_solver_matches_bruteforce_sequential_obs(pattern, blocksize):
    H = spd(16, 2)
    W = rand_w(5, 16, 3)
    n, m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    W_hat, mask = obs_prune(W, H, 0.5, n, m, blocksize=blocksize, percdamp=0.0, dtype=torch.float64)
    ref = sequential_obs_reference(W, H, mask)
    assert torch.allclose(W_hat, ref, atol=1e-9)
    assert (W_hat[mask] == 0).all()
    assert mask.float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_nm_pattern_holds_in_every_group():
    H = spd(32, 4)
    W = rand_w(12, 32, 5)
    for n, m in ((2, 4), (4, 8)):
        W_hat, mask = obs_prune(W, H, n / m, n, m, blocksize=8)
        groups = (W_hat == 0).reshape(12, -1, m).sum(-1)
        assert (groups == n).all()
        assert check_nm(mask, n, m)
        assert not check_nm(torch.zeros_like(mask), n, m)


def optimal_error(W, H, mask):
    """Exact least-squares reconstruction for a fixed mask (kept weights re-fitted)."""
    num = 0.0
    for r in range(W.shape[0]):
        P, K = mask[r], ~mask[r]
        if P.any():
            HKK, HKP = H[K][:, K], H[K][:, P]
            d_p = -W[r, P]
            d_k = -torch.linalg.solve(HKK, HKP @ d_p) if K.any() else torch.zeros(0, dtype=W.dtype)
            d = torch.zeros_like(W[r])
            d[P], d[K] = d_p, d_k
            num += float(d @ H @ d)
    return num / float(torch.einsum("ij,jk,ik->", W, H, W))


def test_between_global_optimum_and_magnitude_bruteforce():
    """Tiny layer: enumerate every 50% mask; OBS is never worse than magnitude, never better than optimal."""
    H = spd(8, 6)
    W = rand_w(1, 8, 7)
    best = min(optimal_error(W, H, torch.tensor([[i in c for i in range(8)]]))
               for c in itertools.combinations(range(8), 4))
    W_obs, _ = obs_prune(W, H, 0.5, percdamp=0.0, dtype=torch.float64)
    W_mag, _ = magnitude_prune(W, None, 0.5, 0, 0, None)
    e_obs, e_mag = reconstruction_error(W, W_obs, H), reconstruction_error(W, W_mag, H)
    assert best - 1e-12 <= e_obs <= e_mag
    assert e_obs < 0.8 * e_mag


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_magnitude(seed):
    H = spd(64, 10 + seed, tokens=300)
    W = rand_w(32, 64, 20 + seed)
    for n, m, s in ((0, 0, 0.5), (0, 0, 0.7), (2, 4, 0.5)):
        W_obs, _ = obs_prune(W, H, s, n, m, blocksize=16)
        W_mag, _ = magnitude_prune(W, None, s, n, m, None)
        assert reconstruction_error(W, W_obs, H) < reconstruction_error(W, W_mag, H)


def test_dead_inputs_are_zeroed_and_input_unchanged():
    H = spd(8, 11)
    H[3, :] = 0
    H[:, 3] = 0
    W = rand_w(4, 8, 12)
    W0 = W.clone()
    W_hat, mask = obs_prune(W, H, 0.25)
    assert (W_hat[:, 3] == 0).all() and mask[:, 3].all()
    assert torch.equal(W, W0)


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_float32_solver_matches_float64_and_reports_its_own_error(pattern):
    """The float32 default gives the float64 masks and weights within float32 rounding, and the squared error
    the solve accumulates equals tr((W - W_hat)(H + damp I)(W - W_hat)^T)."""
    H = spd(64, 7)
    W = rand_w(24, 64, 8)
    W64, m64, e64 = obs_prune(W, H, 0.5, *pattern, blocksize=16, dtype=torch.float64, return_error=True)
    W32, m32, e32 = obs_prune(W, H, 0.5, *pattern, blocksize=16, return_error=True)
    assert W32.dtype == torch.float32 and (m32 == m64).float().mean() > 0.995
    same = (m32 == m64).all(1)
    assert torch.allclose(W32.double()[same], W64[same], rtol=1e-4, atol=1e-5 * float(W.abs().max()))
    damp = 0.01 * float(H.diagonal().mean())
    D = W - W64
    assert e64 == pytest.approx(float(torch.einsum("ij,jk,ik->", D, H + damp * torch.eye(64, dtype=torch.float64), D)), rel=1e-9)
    assert e32 == pytest.approx(e64, rel=1e-4)


def test_float32_factorisation_falls_back_to_float64():
    from obslib.obs import inverse_cholesky

    # eigenvalues spanning 1e-9..1: float32 Cholesky of the undamped matrix fails, float64 succeeds
    Q, _ = torch.linalg.qr(rand_w(32, 32, 9))
    H = Q @ torch.diag(torch.logspace(-9, 0, 32, dtype=torch.float64)) @ Q.T
    U, dead, dt = inverse_cholesky(H, percdamp=0.0)
    assert dt == torch.float64 and torch.isfinite(U).all()
    U32, _, dt32 = inverse_cholesky(spd(16, 3))
    assert dt32 == torch.float32
