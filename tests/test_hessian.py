"""Hook-collected timestep-aware Hessians against explicit sums."""
import pytest
import torch
import torch.nn as nn

from obslib.hessian import Calibration
from obslib.weighting import timestep_weights


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def test_weighted_hessian_matches_explicit_sum():
    toy = Toy()
    T = 4
    alphas = timestep_weights("log-decrease", T)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, 5, generator=g) for _ in range(T)]  # CFG-style batch of 2, 7 tokens
    imgs = [torch.randn(2, 2, 4, 4, generator=g) for _ in range(T)]
    calib = Calibration(toy, {"lin": toy.lin, "conv": toy.conv}, alphas)
    with calib:
        for _ in range(2):  # two sampling runs (two prompt batches)
            calib.begin_run()
            for x, im in zip(xs, imgs):
                toy(x, im)
            calib.end_run()
    num = sum(2 * a * x.reshape(-1, 5).T @ x.reshape(-1, 5) for a, x in zip(alphas, xs)) * 2
    den = sum(a * 14 for a in alphas) * 2
    assert torch.allclose(calib.stats["lin"].H, num / den, atol=1e-5)
    mean = sum(a * x.reshape(-1, 5).sum(0) for a, x in zip(alphas, xs)) * 2 / den
    assert torch.allclose(calib.stats["lin"].mean, mean, atol=1e-6)
    assert calib.stats["lin"].tokens == 2 * T * 14
    # conv: unfolded patches (2*3*3 inputs), one column per output position
    assert calib.stats["conv"].H.shape == (18, 18) and calib.stats["conv"].tokens == 2 * T * 2 * 16
    # hooks are gone after the context
    toy(xs[0], imgs[0])
    assert calib.stats["lin"].tokens == 2 * T * 14


def test_step_count_mismatch_is_reported():
    toy = Toy()
    calib = Calibration(toy, {"lin": toy.lin}, [1.0, 1.0, 1.0])
    with calib:
        calib.begin_run()
        toy(torch.randn(1, 5), torch.randn(1, 2, 4, 4))
        with pytest.raises(RuntimeError, match="1 denoiser calls but 3 weights"):
            calib.end_run()


def test_pipeline_calibration_counts_cfg_tokens(tiny_pipe):
    from obslib.sampling import CalibrationRunner

    den = tiny_pipe.transformer
    layer = den.transformer_blocks[0].attn.to_q
    calib = Calibration(den, {"q": layer, "aq": den.transformer_blocks[0].attn.add_q_proj}, [1.0, 1.0, 1.0])
    runner = CalibrationRunner(tiny_pipe, ["a small red circle", "a large blue square"], steps=3, guidance=4.0,
                               seed=0, batch_size=2, call_kwargs={"max_sequence_length": 8}, progress=False)
    with calib:
        runner.run(calib)
    # 2 prompts x 2 (CFG) x 36 image tokens x 3 steps; text: 32 tokens (24 CLIP + 8 T5 slots)
    assert calib.stats["q"].tokens == 2 * 2 * 36 * 3
    assert calib.stats["aq"].tokens == 2 * 2 * 32 * 3
