"""torch.distributed (gloo, 2 CPU processes): torchrun's pruned pipeline equals the single-process one
(identical masks, weights equal within float32 rounding), the Python API does the same inside a user's own
process group, and ranks that disagree on the settings stop with one line and exit code 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from obslib.shapes import prompts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _weights(out):
    d = os.path.join(out, "transformer")
    w = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            w.update(load_file(os.path.join(d, f)))
    return w


def _prune_cmd(model, out, pf, *extra):
    # the default --batch-size (16): one process samples the 8 prompts in one batch, each rank its 4 (prompt i on
    # rank i mod 2, with prompt i's own noise seed), so the masks are the same whatever the batching
    return ["-m", "obslib", "prune", model, "--out", out, "--prompts", pf, "--steps", "2", "--quiet", *extra]


# (uniform allocation and resample, the plainest case, is the union of the first two)
@pytest.mark.parametrize("extra, exact", [(("--packages", "2", "--allocation", "global", "--sparsity", "0.6"), True),
                                          (("--packages", "3", "--calibration", "propagate"), True),
                                          (("--pattern", "2:4", "--packages", "3", "--calibration", "propagate"), False)])
def test_torchrun_two_processes_equal_one(tiny_pipe_dir, tmp_path, extra, exact):
    """Unstructured: identical masks. 2:4 picks 2 of every 4 weights, and on the tiny model's nearly
    collinear text-stream inputs some picks are near-ties that the reduction order's float32 rounding
    flips (then later packages see slightly different inputs): there the masks agree on >= 98%."""
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(prompts("train", 8)))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = subprocess.run([sys.executable, *_prune_cmd(tiny_pipe_dir, one, str(pf), *extra)], env=ENV,
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         *_prune_cmd(tiny_pipe_dir, two, str(pf), *extra)], env=ENV, capture_output=True, text=True,
                        timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    pruned = differ = 0
    for k in a:
        if exact:
            assert torch.equal(a[k] == 0, b[k] == 0), k  # identical masks
            # the kept weights to float32 rounding, which the OBS update amplifies: one batch of 8 against two of 4
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
        differ += int(((a[k] == 0) != (b[k] == 0)).sum())
        pruned += int((a[k] == 0).sum())
    assert pruned > 0 and differ <= 0.02 * pruned
    rep = json.loads(open(os.path.join(two, "pruning_report.json")).read())
    d = rep["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    assert len(d["bytes_sent_per_package"]) == rep["packages"] and min(d["bytes_sent_per_package"]) > 0
    rep1 = json.loads(open(os.path.join(one, "pruning_report.json")).read())
    assert rep1["distributed"] is None
    assert [x["name"] for x in rep["layers"]] == [x["name"] for x in rep1["layers"]]
    for x, y in zip(rep["layers"], rep1["layers"]):
        assert x["rel_error"] == pytest.approx(y["rel_error"], rel=1e-3 if exact else 0.1, abs=1e-7)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".obslib")]  # no checkpoints or temporaries left


def _worker(rank, world, init, model, sparsity_by_rank, pattern, out, extra=None):
    import torch.distributed as dist

    import obslib
    from obslib.config import PruneConfig
    from obslib.io import UsageError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        pipe = obslib.load_pipeline(model)
        cfg = PruneConfig(sparsity=sparsity_by_rank[rank], pattern=pattern, prompts=prompts("train", 8), steps=2,
                          batch_size=2, packages=2, progress=False, **(extra or {}))
        try:
            rep = obslib.prune(pipe, cfg)
            result = {"ok": True, "sent": rep["distributed"]["bytes_sent_per_package"]}
            if rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()},
                          os.path.join(out, "w.safetensors"))
        except UsageError as e:
            result = {"ok": False, "error": str(e)}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, model, sparsities, pattern="unstructured", extra=None):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, model, sparsities, pattern, str(tmp_path), extra), nprocs=2, join=True)
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]


@pytest.mark.parametrize("extra", [{}, {"allocation": "global", "param_budget": 0.25}])
def test_python_api_in_a_process_group_structured(tiny_pipe_dir, tmp_path, extra):
    import obslib
    from obslib.config import PruneConfig

    res = _spawn(tmp_path, tiny_pipe_dir, [0.25, 0.25], "structured", extra)
    assert all(r["ok"] for r in res), res
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    obslib.prune(pipe, PruneConfig(sparsity=0.25, pattern="structured", prompts=prompts("train", 8), steps=2,
                                   batch_size=2, packages=2, progress=False, **extra))
    got = load_file(str(tmp_path / "w.safetensors"))
    ref = pipe.transformer.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape, k  # the same heads and neurons removed
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_ranks_that_disagree_stop_with_one_line(tiny_pipe_dir, tmp_path):
    res = _spawn(tmp_path, tiny_pipe_dir, [0.5, 0.4])
    assert [r["ok"] for r in res] == [False, False]
    assert all("ranks disagree" in r["error"] and "\n" not in r["error"] for r in res)


@pytest.mark.parametrize("case, n_prompts, needle", [
    ("ranks that disagree", 8, "obslib: error: torchrun ranks disagree on the model or settings"),
    ("more ranks than prompts", 1, "obslib: error: torchrun started 2 processes but there are only 1 calibration prompts"),
])
def test_cli_refusals_under_torchrun_are_one_obslib_line(tiny_pipe_dir, tmp_path, case, n_prompts, needle):
    """Every rank exits 2 and rank 0 alone prints the one line (torchrun then reports the failed ranks in its own
    words, which obslib cannot suppress)."""
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(prompts("train", n_prompts)))
    code = ("import os, sys; from obslib.cli import main; r = os.environ['RANK']; "
            "sys.exit(main(sys.argv[1:] + ['--sparsity', '0.5' if r == '0' else '0.4']))") if n_prompts > 1 else \
        "import sys; from obslib.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--no-python", sys.executable, "-c", code,
                        *_prune_cmd(tiny_pipe_dir, str(tmp_path / "out"), str(pf))[2:]],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("obslib: ") == 1 and r.stderr.count(needle) == 1, r.stderr
    ours = r.stderr.split("torch/distributed/elastic")[0]  # what the ranks wrote before torchrun's own report
    assert "obslib: error:" in ours and "Traceback" not in ours
    assert "exitcode: 2" in r.stderr  # torchrun reports the ranks' exit code in its own failure summary
    assert not (tmp_path / "out").exists()
