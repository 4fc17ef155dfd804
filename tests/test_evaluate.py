"""The evaluator: classifier accuracy, fidelity, FID/KID, PSNR/SSIM, CLI input checks, tiny end-to-end run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from obslib.evaluate import distribution_metrics, evaluate_pipeline, fidelity, reconstruction_metrics, render_prompts
from obslib.shapes.classifier import HEADS, head_accuracy, load_classifier, make_batch
from obslib.shapes.world import LABEL_HEADS, Scene, parse_caption, prompts, splits

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
N = 200
TEST_SEED = 3_000_000_000  # never used by training (RNG seeds < 2**31) nor by the accuracy report


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def heldout():
    ps = prompts("heldout", N)
    return ps, render_prompts(ps, TEST_SEED)


@pytest.mark.parametrize("free", [False, True], ids=["lattice", "off-lattice"])
def test_classifier_heads_on_fresh_heldout_renders(clf, free):
    scenes = splits()["heldout"][:N]
    imgs, labels = make_batch(scenes, [TEST_SEED + 7 * i for i in range(N)], free=free)
    acc = head_accuracy(clf, imgs, labels)
    assert set(acc) == set(HEADS)
    assert min(acc.values()) >= 0.98, acc


def test_fidelity_of_real_renders(clf, heldout):
    ps, imgs = heldout
    res = fidelity(imgs, ps, clf)
    assert res["prompt_fidelity"] >= 0.98, res
    for head in LABEL_HEADS:
        assert res[f"acc_{head}"] >= 0.98, (head, res)


def test_noise_scores_low(clf, heldout):
    ps, _ = heldout
    noise = np.random.default_rng(0).integers(0, 256, size=(N, 48, 48, 3), dtype=np.uint8)
    assert fidelity(noise, ps, clf)["prompt_fidelity"] <= 0.05


def test_fidelity_is_per_prompt(clf, heldout):
    ps, imgs = heldout
    # images of other prompts (shifted by one) must fail
    assert fidelity(imgs, ps[1:] + ps[:1], clf)["prompt_fidelity"] <= 0.1
    # the relation is checked: "A left of B" is not satisfied by a render of "B left of A"
    scenes = [parse_caption(p) for p in ps if " to the left of " in p or " above " in p][:20]
    pairs = [s.caption() for s in scenes]
    swapped = [Scene(s.objects[::-1], s.relation, s.background).caption() for s in scenes]
    res = fidelity(render_prompts(swapped, 5), pairs, clf)
    assert res["acc_arrangement"] <= 0.1 and res["prompt_fidelity"] <= 0.1


def test_fid_kid_separate_renders_from_noise(clf, heldout):
    ps, imgs = heldout
    other = render_prompts(ps, TEST_SEED + 10_000)
    noise = np.random.default_rng(1).integers(0, 256, size=imgs.shape, dtype=np.uint8)
    same = distribution_metrics(other, imgs, clf)
    bad = distribution_metrics(noise, imgs, clf)
    assert math.isfinite(same["fid"]) and same["fid"] >= -1e-6
    assert bad["fid"] > 10 * same["fid"] + 1.0, (same, bad)
    assert bad["kid"] > 10 * abs(same["kid"]) + 1e-3, (same, bad)
    # uint8 and [0,1] float inputs give the same features
    from obslib.evaluate import _feature_module, _nchw

    f = _feature_module(clf)
    x = _nchw(imgs[:8])
    assert torch.allclose(f(x), f(x.float() / 255.0), atol=1e-5)


def test_psnr_ssim(heldout):
    _, imgs = heldout
    same = reconstruction_metrics(imgs[:16], imgs[:16])
    assert same["psnr"] == 100.0  # identical images: capped at PSNR_CAP_DB
    assert same["ssim"] == pytest.approx(1.0, abs=1e-4)
    noisy = np.clip(imgs[:16].astype(int) + np.random.default_rng(2).integers(-20, 21, imgs[:16].shape), 0, 255).astype(np.uint8)
    diff = reconstruction_metrics(noisy, imgs[:16])
    assert 15 < diff["psnr"] < 40 and diff["ssim"] < 0.99


CLI_CASES = ("missing", "not_pipeline", "broken_pipeline", "zero", "negative")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run every bad-input CLI case as its own process (one at a time: the machine may be busy)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = {}
    for case in CLI_CASES:
        tmp = tmp_path_factory.mktemp(case)
        out = tmp / "metrics.json"
        model = tmp / "model"
        model.mkdir()
        args = ["--num-prompts", "4", "--steps", "2", "--seed", "0", "--out", str(out)]
        if case == "missing":
            model = tmp / "nope"
        elif case == "broken_pipeline":  # names a class but holds no components
            (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
            (model / "transformer").mkdir()
        elif case in ("zero", "negative"):  # a valid-looking pipeline dir: the number is what is wrong
            args[1] = "0" if case == "zero" else "-3"
            (model / "model_index.json").write_text("{}")
        r = subprocess.run([sys.executable, "-m", "obslib.cli", "evaluate", str(model), *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        runs[case] = (r.returncode, r.stderr, out, args)
    return runs


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(case, cli_runs):
    rc, err, out, args = cli_runs[case]
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("obslib: error:"), err
    assert "Traceback" not in err
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
    if case in ("zero", "negative"):
        assert args[1] in lines[0] and "allowed: 2 to" in lines[0]
    if case == "missing":
        assert "does not exist" in lines[0]
    if case == "not_pipeline":
        assert "not a diffusers pipeline" in lines[0]


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--steps", "-1"), ("--num-prompts", "100000"),
                                        ("--guidance", "-2"), ("--split", "test")])
def test_cli_bad_numbers_in_process(flag, value, tmp_path, capsys):
    from obslib.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    out = tmp_path / "m.json"
    argv = ["evaluate", str(model), "--num-prompts", "4", "--steps", "2", "--out", str(out)]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("obslib: error:") and value in err[0]
    assert not out.exists()


def test_unloadable_pipeline_is_usage_error(tmp_path):
    """Errors raised inside diffusers (ValueError, OSError, ...) become one-line UsageErrors."""
    from obslib.evaluate import _check_index, _load
    from obslib.io import UsageError

    model = tmp_path / "model"
    model.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (model / "model_index.json").write_text(json.dumps(index))
    for k in ("transformer", "vae", "scheduler"):
        (model / k).mkdir()
    _check_index(str(model))  # structurally plausible ...
    with pytest.raises(UsageError, match="could not load a pipeline") as e:
        _load(str(model))  # ... but diffusers cannot load it
    assert "\n" not in str(e.value)


def test_evaluate_pipeline_tiny(clf):
    from obslib.shapes.model import build_pipeline

    pipe = build_pipeline()
    res = evaluate_pipeline(pipe, num_prompts=4, steps=2, seed=0, reference=pipe, classifier=clf, progress=False,
                            split="unseen_background")
    assert res["split"] == "unseen_background"
    # precomputed samples (own and reference) give exactly the metrics of sampling inside
    from obslib.evaluate import generate

    imgs = generate(pipe, prompts("unseen_background", 4), 0, steps=2, progress=False)
    assert evaluate_pipeline(pipe, num_prompts=4, steps=2, seed=0, reference=imgs, classifier=clf, progress=False,
                             split="unseen_background", images=imgs) == res
    for k in ("prompt_fidelity", "fid", "kid", "psnr", "ssim", "num_prompts", "steps", "seed"):
        assert k in res
    assert {f"acc_{h}" for h in LABEL_HEADS} <= set(res)
    assert 0.0 <= res["prompt_fidelity"] <= 1.0
    assert math.isfinite(res["fid"]) and res["fid"] >= 0 and math.isfinite(res["kid"])
    assert res["psnr"] == math.inf or res["psnr"] > 60  # reference == pipe: identical images
    assert res["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert (res["num_prompts"], res["steps"], res["seed"]) == (4, 2, 0)
    for h in LABEL_HEADS:
        assert 0.0 <= res[f"acc_{h}"] <= 1.0


def test_wilson_interval_closed_form():
    from obslib.evaluate import wilson_interval

    # 0 of 10: upper bound z^2 / (n + z^2); 10 of 10 its mirror; a known middle case (8 of 10)
    z = 1.96
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    assert wilson_interval(1.0, 10) == pytest.approx((10 / (10 + z * z), 1.0))
    assert wilson_interval(0.8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = wilson_interval(0.8, 64)
    assert 0.68 < lo < 0.69 and 0.87 < hi < 0.89  # what 64 held-out prompts can tell apart
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))


def test_kid_standard_error_is_reported(clf, heldout):
    ps, real = heldout
    same = render_prompts(ps, TEST_SEED + 20_000)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    a = distribution_metrics(same, real, clf, seed=0)
    b = distribution_metrics(noise, real, clf, seed=0)
    assert 0 < a["kid_sd"] < 0.05 and b["kid_sd"] > 0
    assert abs(a["kid"]) < 3 * a["kid_sd"] + 1e-3  # renders of the same world: KID around 0, either sign
    assert b["kid"] > 10 * b["kid_sd"]  # noise: far beyond its own error


def test_summary_interval_uses_prompts_and_seeds():
    import pandas as pd

    from obslib.study.experiments import format_table, summarize

    rows = []
    for seed, (fa, fb) in enumerate([(0.80, 0.70), (0.82, 0.72), (0.78, 0.71)]):
        rows += [{"method": "a", "seed": seed, "prompt_fidelity": fa, "psnr": 30 + seed, "n_prompts": 64},
                 {"method": "b", "seed": seed, "prompt_fidelity": fb, "psnr": 20 + seed, "key": "m/64/d/pp2|x"}]
    s = summarize(pd.DataFrame(rows), ["method"], ("prompt_fidelity", "psnr"))
    ra, rb = s.set_index("method").loc["a"], s.set_index("method").loc["b"]
    # pooled: 51+52+50 = 153 hits of 192 (a); b's prompt count comes from its cache key
    from obslib.evaluate import wilson_interval

    assert (ra.prompt_fidelity_lo, ra.prompt_fidelity_hi) == pytest.approx(wilson_interval(153 / 192, 192))
    assert (rb.prompt_fidelity_lo, rb.prompt_fidelity_hi) == pytest.approx(wilson_interval(136 / 192, 192))  # 45 + 46 + 45 hits
    assert "[95% " in format_table(s, ["method"], ("prompt_fidelity",)).prompt_fidelity.iloc[0]


def test_reconstruction_metrics_are_per_image_means():
    from obslib.prompt_eval import PSNR_CAP_DB, reconstruction_metrics

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    img = ref.copy()
    img[1] = np.clip(ref[1].astype(int) + 10, 0, 255).astype(np.uint8)
    out = reconstruction_metrics(img, ref, per_prompt=True)
    mse = np.mean((img[1].astype(float) - ref[1]) ** 2) / 255 ** 2
    assert out["per_prompt"]["psnr"][1] == pytest.approx(-10 * np.log10(mse), rel=1e-5)
    assert out["per_prompt"]["psnr"][0] == PSNR_CAP_DB and out["per_prompt"]["ssim"][0] == pytest.approx(1.0)
    assert out["psnr"] == pytest.approx(np.mean(out["per_prompt"]["psnr"]))
