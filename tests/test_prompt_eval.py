"""`obslib evaluate --prompts FILE` on any pipeline: tiny random SD3, SDXL and Flux pipelines and a tiny CLIP built
here (nothing is downloaded). PSNR/SSIM per prompt against the dense reference at the same seeds, CLIP score,
FID/KID in CLIP space, each with an interval; the grid; the model card; and bad input as one line, exit 2."""
import json
import os

import numpy as np
import pytest
import torch

import obslib
from obslib.cli import main
from obslib.evaluate import generate
from obslib.io import write_json
from obslib.owned import not_ours
from obslib.prompt_eval import fid_kid, is_obslib_grid
from obslib.shapes import prompts

PROMPTS = prompts("heldout", 4)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (transformers CLIPModel + processor) saved as a local directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from obslib.shapes.model import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=tok.model_max_length),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2), projection_dim=16)
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).eval().save_pretrained(d)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(d)
    return str(d)


def _save(pipe, d, **defaults):
    pipe.save_pretrained(d)
    write_json(os.path.join(d, "obslib_defaults.json"), {"num_inference_steps": 2, "guidance_scale": 3.0, **defaults})
    return str(d)


def _pruned(dense_dir, out, method="magnitude"):
    pipe = obslib.load_pipeline(dense_dir)
    rep = obslib.prune(pipe, obslib.PruneConfig(method=method, sparsity=0.5, progress=False, count_flops=False,
                                                prompts=PROMPTS[:2], steps=2))
    obslib.save_pruned(pipe, rep, out)
    return out


@pytest.fixture(scope="module")
def sd3_pair(tiny_pipe_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3")
    return tiny_pipe_dir, _pruned(tiny_pipe_dir, str(d / "sd3-obs50"), method="obs-diff")


@pytest.fixture
def sdxl_dir(tiny_sdxl_pipe, tmp_path):
    return _save(tiny_sdxl_pipe, str(tmp_path / "sdxl"))


@pytest.fixture
def flux_dir(tiny_pipe, tmp_path):
    """A tiny random Flux pipeline (CLIP pooled + T5 sequence, 1 double- and 1 single-stream block)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    t5 = tiny_pipe.text_encoder_3
    torch.nn.init.ones_(t5.encoder.final_layer_norm.weight)  # the shapes placeholder T5 outputs zeros; this one reads
    te = CLIPTextModel(tiny_pipe.text_encoder.config).eval()
    lat = tiny_pipe.vae.config.latent_channels
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4 * lat, num_layers=1, num_single_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5.config.d_model,
                                pooled_projection_dim=te.config.hidden_size, guidance_embeds=False,
                                axes_dims_rope=(2, 2, 4)).eval()
    pipe = FluxPipeline(scheduler=tiny_pipe.scheduler, vae=tiny_pipe.vae, text_encoder=te, tokenizer=tiny_pipe.tokenizer,
                        text_encoder_2=t5, tokenizer_2=tiny_pipe.tokenizer_3, transformer=tr)
    return _save(pipe, str(tmp_path / "flux"), height=32, width=32, max_sequence_length=16)


def _prompt_file(tmp_path, ps=PROMPTS):
    f = tmp_path / "eval.txt"
    f.write_text("\n".join(ps) + "\n")
    return str(f)


def _evaluate(model, out, *extra):
    code = main(["evaluate", model, "--out", str(out), *extra])
    assert code == 0
    assert torch.is_grad_enabled()  # the command leaves the caller's autograd state alone
    return json.load(open(out))


def test_sd3_pruned_against_dense_with_clip(sd3_pair, clip_dir, tmp_path, capsys):
    dense, pruned = sd3_pair
    m = _evaluate(pruned, tmp_path / "m.json", "--reference", dense, "--prompts", _prompt_file(tmp_path),
                  "--clip-model", clip_dir, "--steps", "2")
    assert m["num_prompts"] == 4 and m["steps"] == 2
    for k in ("psnr", "ssim", "clip_score", "clip_score_dense", "fid", "kid"):
        assert m[f"{k}_lo"] <= m[k] <= m[f"{k}_hi"], k
        assert np.isfinite(m[k]), k
    assert len(m["per_prompt"]["psnr"]) == 4 and 0 < m["psnr"] < 100  # pruned: not identical to the dense images
    assert m["psnr"] == pytest.approx(np.mean(m["per_prompt"]["psnr"]))
    assert m["clip_score_diff"] == pytest.approx(m["clip_score"] - m["clip_score_dense"])
    assert "CLIP image-embedding space" in m["fid_against"]
    grid = str(tmp_path / "m_grid.png")
    assert m["grid"] == os.path.abspath(grid) and is_obslib_grid(grid)
    card = open(os.path.join(pruned, "README.md"), encoding="utf-8").read()
    assert "| PSNR vs dense (dB) | " + f"{m['psnr']:.2f}" in card and "Not evaluated yet" not in card
    assert not_ours(pruned) == []  # the card and its file-list entry were updated together: still obslib's
    assert "psnr=" in capsys.readouterr().out


def test_a_model_against_itself(tiny_pipe_dir, clip_dir, tmp_path):
    """Identical images: PSNR at its cap for every prompt, SSIM 1, the same CLIP score, FID 0."""
    m = _evaluate(tiny_pipe_dir, tmp_path / "m.json", "--reference", tiny_pipe_dir, "--prompts",
                  _prompt_file(tmp_path), "--clip-model", clip_dir, "--steps", "2", "--batch-size", "3")
    assert m["per_prompt"]["psnr"] == [100.0] * 4 and m["ssim"] == pytest.approx(1.0)
    assert m["clip_score_diff"] == 0 and m["clip_score_diff_lo"] == 0 and m["clip_score_diff_hi"] == 0
    assert abs(m["fid"]) < 1e-3
    assert not os.path.exists(os.path.join(tiny_pipe_dir, "README.md"))  # not obslib's output: no card written


def test_images_do_not_depend_on_batch_size(tiny_pipe):
    a = generate(tiny_pipe, PROMPTS, 5, steps=2, batch_size=1, progress=False)
    b = generate(tiny_pipe, PROMPTS, 5, steps=2, batch_size=3, progress=False)
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float32 rounding may move a pixel by one level
    c = generate(tiny_pipe, PROMPTS[1:2], 5, steps=2, batch_size=1, progress=False)
    assert not np.array_equal(a[1], c[0])  # prompt 1's noise belongs to its number, not to its text


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_other_pipelines(family, request, clip_dir, tmp_path):
    dense = request.getfixturevalue(f"{family}_dir")
    pruned = _pruned(dense, str(tmp_path / f"{family}-mag50"))
    m = _evaluate(pruned, tmp_path / "m.json", "--reference", dense, "--prompts", _prompt_file(tmp_path),
                  "--clip-model", clip_dir)
    assert m["steps"] == 2 and m["guidance"] == 3.0  # the model's own defaults
    assert 0 < m["psnr"] < 100 and m["psnr_lo"] <= m["psnr"] <= m["psnr_hi"]
    assert np.isfinite(m["clip_score"]) and np.isfinite(m["fid"])
    assert "## Evaluation" in open(os.path.join(pruned, "README.md"), encoding="utf-8").read()


def test_real_images(sd3_pair, clip_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    m = _evaluate(sd3_pair[1], tmp_path / "m.json", "--prompts", _prompt_file(tmp_path), "--clip-model", clip_dir,
                  "--real-images", str(folder), "--steps", "2")
    assert m["fid_against"].startswith("real images") and "psnr" not in m and np.isfinite(m["fid"])


def test_fid_bootstrap_interval_covers_and_shifts():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    near = fid_kid(a, b, boot=50)
    far = fid_kid(a + 3.0, b, boot=50)
    assert near["fid_lo"] <= near["fid"] <= near["fid_hi"]
    assert far["fid"] == pytest.approx(near["fid"] + 8 * 9.0, rel=0.2)  # a mean shift of 3 in 8 dims adds 72
    assert far["fid_lo"] > near["fid_hi"] and far["kid"] > near["kid"] + 5 * far["kid_sd"]


def _bad(args, tmp_path, capsys, needle):
    out = tmp_path / "bad.json"
    assert main(["evaluate", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "bad_grid.png").exists()


def test_bad_input_is_one_line(sd3_pair, sdxl_dir, clip_dir, tmp_path, capsys):
    dense, pruned = sd3_pair
    pf = _prompt_file(tmp_path)
    not_clip = tmp_path / "t5"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "t5"}))
    _bad([pruned, "--reference", dense, "--prompts", pf, "--clip-model", str(not_clip)], tmp_path, capsys,
         "is not a CLIP directory (its config.json has model_type 't5'")
    _bad([pruned, "--reference", dense, "--prompts", pf, "--clip-model", str(tmp_path)], tmp_path, capsys,
         "is not a CLIP directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    _bad([pruned, "--prompts", pf, "--clip-model", clip_dir, "--real-images", str(empty)], tmp_path, capsys,
         "holds 0 image(s)")
    long_prompt = " ".join(["a big red circle left of a small blue square"] * 5)
    _bad([pruned, "--reference", dense, "--prompts", _prompt_file(tmp_path, [PROMPTS[0], long_prompt]),
          "--steps", "2"], tmp_path, capsys, "prompt 2 is")
    _bad([pruned, "--reference", sdxl_dir, "--prompts", pf], tmp_path, capsys, "is a StableDiffusionXLPipeline")
    _bad([pruned, "--prompts", pf], tmp_path, capsys, "nothing to measure")
    _bad([pruned, "--prompts", pf, "--real-images", str(empty)], tmp_path, capsys, "holds 0 image(s)")
    _bad([sdxl_dir, "--num-prompts", "4"], tmp_path, capsys, "give --prompts FILE")
    other = tmp_path / "bad_grid.png"
    other.write_bytes(b"someone's picture")
    assert main(["evaluate", pruned, "--reference", dense, "--prompts", pf, "--out", str(tmp_path / "bad.json")]) == 2
    assert "is not an obslib grid" in capsys.readouterr().err and other.read_bytes() == b"someone's picture"


def test_edited_card_is_left_alone(sd3_pair, tmp_path):
    from obslib.card import add_evaluation

    pruned = str(tmp_path / "copy")
    import shutil

    shutil.copytree(sd3_pair[1], pruned)
    with open(os.path.join(pruned, "README.md"), "a", encoding="utf-8") as f:
        f.write("\nmy own notes\n")
    before = open(os.path.join(pruned, "README.md"), encoding="utf-8").read()
    assert add_evaluation(pruned, {"psnr": 30.0}) is False
    assert open(os.path.join(pruned, "README.md"), encoding="utf-8").read() == before
