"""Separate head and neuron sparsity for structured pruning, and the counts the report gives."""
import pytest

import obslib
from obslib.errors import UsageError
from obslib.shapes import prompts


@pytest.mark.parametrize("method", ["obs-diff", "l1-norm"])
def test_head_and_neuron_sparsity_apply_separately(tiny_pipe_dir, method):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    before = sum(p.numel() for p in pipe.transformer.parameters())
    rep = obslib.prune(pipe, obslib.PruneConfig(method=method, pattern="structured", sparsity=0.1, head_sparsity=0.5,
                                                neuron_sparsity=0.25, prompts=prompts("train", 4), steps=2,
                                                batch_size=4, packages=1, progress=False))
    blocks = pipe.transformer.transformer_blocks
    assert [b.attn.heads for b in blocks] == [4, 2, 2, 4]  # first and last block are left alone
    assert [b.ff.net[2].weight.shape[1] for b in blocks] == [128, 96, 96, 128]
    assert [b.ff_context.net[2].weight.shape[1] for b in blocks[1:3]] == [96, 96]
    assert rep["heads_removed"] == 2 * 2 and rep["neurons_removed"] == 2 * 2 * 32
    assert rep["params_removed"] == before - sum(p.numel() for p in pipe.transformer.parameters()) > 0


def test_without_them_sparsity_applies_to_both(tiny_pipe_dir):
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    rep = obslib.prune(pipe, obslib.PruneConfig(pattern="structured", sparsity=0.25, prompts=prompts("train", 4),
                                                steps=2, batch_size=4, packages=1, progress=False))
    assert pipe.transformer.transformer_blocks[1].attn.heads == 3 and rep["heads_removed"] == 2
    assert rep["neurons_removed"] == 2 * 2 * 32


@pytest.mark.parametrize("kw, needle", [
    (dict(head_sparsity=0.5), "--head-sparsity applies to --pattern structured only (got 'unstructured')"),
    (dict(pattern="structured", neuron_sparsity=1.0), "--neuron-sparsity 1.0 is outside [0, 1)"),
    (dict(pattern="structured", head_sparsity=-0.1), "--head-sparsity -0.1 is outside [0, 1)"),
    (dict(method="slimdiff", pattern="structured", head_sparsity=0.5), "slimdiff allocates heads and neurons itself"),
])
def test_bad_group_sparsity(kw, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        obslib.PruneConfig(**kw).validate()
