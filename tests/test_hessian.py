"""Hook-collected timestep-aware Hessians against explicit sums."""
import pytest
import torch
import torch.nn as nn

from obslib.hessian import Calibration
from obslib.shapes import prompts
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


def _linear_layers(den):
    return {n: m for n, m in den.named_modules() if isinstance(m, nn.Linear) and "transformer_blocks" in n}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_layers_reading_one_input_share_one_accumulator(tiny_pipe, arch):
    """to_q/to_k/to_v (and add_q/k/v_proj; Flux single-stream: with proj_mlp) read one tensor: one X^T X, the same
    Hessians as accumulating each layer on its own."""
    from test_archs import _flux

    if arch == "sd3":
        den = tiny_pipe.transformer
        c = den.config

        def call(g):
            den(hidden_states=torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g),
                encoder_hidden_states=torch.randn(2, 8, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                timestep=torch.rand(2, generator=g) * 1000)
    else:
        torch.manual_seed(0)
        den, inputs = _flux()
        den.eval()

        def call(g):
            den(**inputs(g))
    layers = _linear_layers(den)
    out = {}
    for share in (True, False):
        calib = Calibration(den, layers, [1.0, 0.5], share_inputs=share)
        g = torch.Generator().manual_seed(0)
        with calib, torch.no_grad():
            calib.begin_run()
            call(g)
            call(g)
            calib.end_run()
        out[share] = calib
    shared = out[True].shared
    for name in layers:
        assert torch.equal(out[True].stats[name].xtx, out[False].stats[name].xtx), name
    assert not out[False].shared
    if arch == "sd3":
        b = "transformer_blocks.1.attn."
        assert shared[b + "to_k"] == shared[b + "to_v"] == b + "to_q"
        assert shared[b + "add_k_proj"] == shared[b + "add_v_proj"] == b + "add_q_proj"
        assert out[True].stats[b + "to_k"] is out[True].stats[b + "to_q"]
    else:
        b = "single_transformer_blocks.0."
        group = {b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"}
        roots = {shared.get(n, n) for n in group}
        assert len(roots) == 1 and roots.pop() in group
    assert b + "attn.to_out.0" not in shared if arch == "sd3" else b + "proj_out" not in shared


def test_calib_tokens_keep_a_seeded_subset_per_image_and_step(tiny_pipe):
    """--calib-tokens N: N of each image's tokens per step; N >= tokens is the full accumulation; the subset follows
    the prompt (its number) and the seed, not the batch."""
    def stats(tokens, seed=0, batch=4):
        from obslib.archs import find_denoiser
        from obslib.sampling import CalibrationRunner

        den = find_denoiser(tiny_pipe)[1]
        name = "transformer_blocks.1.ff.net.2"
        calib = Calibration(den, {name: den.get_submodule(name)}, [1.0, 1.0], tokens=tokens, token_seed=seed)
        runner = CalibrationRunner(tiny_pipe, prompts("train", 4), 2, 4.0, 0, batch, {"max_sequence_length": 8}, False)
        with calib:
            runner.run(calib)
        return calib.stats[name]

    full, same = stats(None), stats(10_000)
    assert torch.equal(full.xtx, same.xtx) and full.tokens == same.tokens == 4 * 2 * 2 * 36  # prompts x CFG x steps x image tokens
    sub = stats(16)
    assert sub.tokens == 4 * 2 * 2 * 16
    torch.testing.assert_close(stats(16, batch=1).H, sub.H, rtol=1e-4, atol=1e-6)  # batching does not move the subset
    assert not torch.allclose(stats(16, seed=1).H, sub.H)
    err = [float((stats(n).H - full.H).norm() / full.H.norm()) for n in (4, 30)]
    assert err[1] < err[0] < 1.0  # more tokens, closer to the full Hessian
