"""The GPU benchmark's tiny CPU mode (obslib.study.bench_gpu --tiny): every part runs, prunes what it says, and
bad input is one line and exit 2 with nothing written."""
import json

import pytest

from obslib.study import bench_gpu


def test_tiny_mode_runs_every_part_on_the_cpu(tmp_path):
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    rc = bench_gpu.main(["--tiny", "--repeats", "2", "--blocks", "2", "--steps", "2", "--out", str(md), "--json", str(js)])
    assert rc == 0
    r = json.loads(js.read_text())
    p = r["prune"]
    assert p["layers"] == 24 and abs(p["sparsity"] - 0.5) < 0.01  # 12 targeted linears per joint block, half zero
    assert r["semi_structured"] == [] and "Not run: 2:4 semi-structured kernels need CUDA." in md.read_text()
    rows = {(x["block"], x["share_removed"]): x for x in r["structured"]}
    assert len(rows) == 6
    for b in ("sd3-medium-joint", "flux-single"):  # more removed: fewer parameters and FLOPs
        kept = [rows[b, s]["params_ratio"] for s in bench_gpu.SHARES]
        assert kept == sorted(kept, reverse=True) and kept[-1] < 0.85
        assert rows[b, 0.3]["flops_ratio_inv"] > rows[b, 0.2]["flops_ratio_inv"] > 1.2


@pytest.mark.parametrize("argv,msg", [(["--tiny", "--blocks", "0"], "--blocks 0 must be a positive integer"),
                                      ([], "no CUDA device")])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, msg):
    import torch

    if not argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is there: the full benchmark would run")
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(argv + ["--out", str(out), "--json", str(tmp_path / "gpu.json")]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
