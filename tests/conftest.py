import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OBSLIB_TEST_THREADS", "2")))

TINY = dict(num_layers=4, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny random SD3 pipeline (4 blocks, 4 heads of dim 8) saved with save_pretrained."""
    from obslib.shapes.model import DEFAULT_SAMPLING, build_pipeline
    from obslib.io import write_json

    d = tmp_path_factory.mktemp("tiny") / "tiny-sd3"
    pipe = build_pipeline(seed=0, **TINY)
    pipe.save_pretrained(d)
    write_json(str(d / "obslib_defaults.json"), {**DEFAULT_SAMPLING, "num_inference_steps": 3,
                                                 "calibration_prompts": "shapes-train"})
    return str(d)


@pytest.fixture
def tiny_pipe(tiny_pipe_dir):
    from obslib import load_pipeline

    return load_pipeline(tiny_pipe_dir)
