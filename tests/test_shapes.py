"""The shapes world and the embedded default model (issue: foundation)."""
import os

import numpy as np
import pytest
import torch

from obslib.shapes import all_scenes, is_novel_combination, parse_caption, prompts, render, splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "shapes-sd3")


def test_renderer_is_deterministic_and_seed_dependent():
    sc = parse_caption("a small red circle to the left of a large blue square on a white background")
    a, b, c = render(sc, 7), render(sc, 7), render(sc, 8)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a == 255).all(-1).mean() > 0.5  # white background dominates


def test_world_size_and_grammar():
    scenes = all_scenes()
    objs = {o for s in scenes for o in s.objects}
    assert len({o.shape for o in objs}) >= 4 and len({o.colour for o in objs}) >= 6 and len({o.size for o in objs}) == 2
    for s in scenes[::997]:
        assert parse_caption(s.caption()) == s
    with pytest.raises(ValueError, match="grammar"):
        parse_caption("a purple elephant")


def test_splits_are_deterministic_disjoint_and_hold_out_novel_combinations():
    a, b = splits(), splits()
    assert [s.caption() for s in a["train"]] == [s.caption() for s in b["train"]]
    train = {s.caption() for s in a["train"]}
    held = [s.caption() for s in a["heldout"]]
    assert not train & set(held) and len(held) >= 256
    assert not any(is_novel_combination(s) for s in a["train"])
    first = [parse_caption(p) for p in prompts("heldout", 256)]
    assert sum(is_novel_combination(s) for s in first) > 50 and sum(len(s.objects) == 1 for s in first) > 20


def test_every_word_is_one_clip_token():
    from obslib.shapes.model import build_tokenizer

    tok = build_tokenizer()
    words = {w for s in all_scenes() for w in s.caption().split()}
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)


@pytest.mark.skipif(not os.path.exists(os.path.join(MODEL, "model_index.json")), reason="default model not trained yet")
def test_default_model_loads_offline_with_stock_pipeline_and_is_deterministic(monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, max_sequence_length=8, output_type="np")
    p = ["a large green triangle above a small yellow cross", "a small cyan square"]
    a = pipe(p, generator=torch.Generator().manual_seed(3), **kw).images
    b = pipe(p, generator=torch.Generator().manual_seed(3), **kw).images
    c = pipe(p, generator=torch.Generator().manual_seed(4), **kw).images
    assert a.shape == (2, 48, 48, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL) for f in fs)
    assert size < 30 * 2**20
    assert len(pipe.transformer.transformer_blocks) >= 6
    assert all(b.attn.heads >= 4 for b in pipe.transformer.transformer_blocks)
    assert pipe.transformer.transformer_blocks[-1].context_pre_only
