"""The model card (README.md) every pruned output carries: a hub-style YAML header, the numbers of its report,
the command, how to load it, and the evaluation once `obslib evaluate` has scored it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from obslib.card import EVAL_END, EVAL_START, base_model, with_evaluation
from obslib.shapes import prompts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _prune(model, out, *extra):
    pf = os.path.join(os.path.dirname(out), "p.txt")
    with open(pf, "w") as f:
        f.write("\n".join(prompts("train", 4)))
    r = subprocess.run([sys.executable, "-m", "obslib", "prune", model, "--prompts", pf, "--steps", "2",
                        "--packages", "2", "--out", out, "--quiet", *extra], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.load(open(os.path.join(out, "pruning_report.json")))


@pytest.mark.parametrize("extra, loader", [((), "DiffusionPipeline.from_pretrained"),
                                           (("--pattern", "structured", "--sparsity", "0.25"), "obslib.load_pipeline")])
def test_every_output_has_a_model_card(tiny_pipe_dir, tmp_path, extra, loader):
    hub = tmp_path / "hub" / "models--acme--tiny-sd3" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_pipe_dir, hub)  # a local copy laid out as huggingface_hub's cache: its name is known
    out = str(tmp_path / "pruned")
    rep = _prune(str(hub), out, *extra)
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    card = ModelCard(text)  # the hub's own parser reads the header
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "acme/tiny-sd3"
    assert {"pruning", "obs-diff", "text-to-image"} <= set(card.data.tags)
    assert f"{100 * rep['sparsity_actual']:.1f}%" in text
    assert f"{rep['params_before']:,}" in text
    assert "obslib prune " + str(hub) in text and "--packages 2" in text  # the exact command
    assert loader in text
    assert "| prompts | 4 |" in text and "| sampling steps / guidance | 2 /" in text
    assert "Not evaluated yet" in text and EVAL_START in text
    files = json.load(open(os.path.join(out, "obslib_files.json")))
    assert "README.md" in json.dumps(files)  # obslib's file: --overwrite may replace it
    if extra:  # structured: the parameters really removed
        assert f"{rep['params_after']:,}" in text and "removed" in text


def test_base_model_is_left_out_when_unknown(tiny_pipe_dir, tmp_path):
    assert base_model(tiny_pipe_dir) is None
    out = str(tmp_path / "p")
    _prune(tiny_pipe_dir, out)
    card = ModelCard(open(os.path.join(out, "README.md"), encoding="utf-8").read())
    assert card.data.base_model is None and card.data.library_name == "diffusers"
    # a pruned output's own card names its base: pruning it again keeps the name
    open(os.path.join(out, "README.md"), "a").close()
    assert base_model(out) is None


def test_evaluation_section_is_replaced_not_appended():
    text = "---\nlibrary_name: diffusers\n---\n\n# x\n\n" + EVAL_START + "\nold\n" + EVAL_END + "\ntail\n"
    ev = {"num_prompts": 8, "steps": 4, "guidance": 4.0, "seed": 0, "psnr": 31.5, "psnr_lo": 30.0, "psnr_hi": 33.0,
          "fid": 12.0}
    new = with_evaluation(with_evaluation(text, ev), ev)
    assert new.count(EVAL_START) == 1 and "old" not in new and new.endswith("tail\n")
    assert "| PSNR vs dense (dB) | 31.50 | 30.00 – 33.00 |" in new and "| FID | 12.000 | — |" in new
