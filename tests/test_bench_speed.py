"""The real-shape speed benchmark's tiny mode (obslib.study.bench_speed --tiny): the shapes it times are those the
methods give the model, and bad input is one line and exit 2 with nothing written."""
import json

import pytest

import obslib
from obslib.study import bench_speed
from obslib.study.budgets import OBS_GLOBAL, OBS_UNIFORM, SLIM_OWN


def test_kept_shares_read_the_pruned_shapes(tiny_pipe_dir):
    from obslib.config import PruneConfig
    from obslib.shapes import prompts

    den0 = obslib.load_pipeline(tiny_pipe_dir).transformer
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    obslib.prune(pipe, PruneConfig(pattern="structured", sparsity=0.25, prompts=prompts("train", 2), seed=0,
                                   progress=False, count_flops=False))
    kept = bench_speed.kept_shares(den0, pipe.transformer)
    assert set(kept) == {"attention", "image FFN", "text FFN"}
    a = kept["attention"]  # 4 heads per block, 2 targeted blocks: a quarter of the heads is one per block
    assert a["heads"] == a["qk"] == a["vo"] == 0.75
    assert 0.7 <= kept["image FFN"]["neurons"] <= 0.8


def test_tiny_mode_times_every_shape_and_cuts_what_it_says(tiny_pipe_dir, tmp_path):
    md, js = tmp_path / "speed.md", tmp_path / "speed.json"
    rc = bench_speed.main(["--tiny", "--model-dir", tiny_pipe_dir, "--flux-model-dir", str(tmp_path / "none"),
                           "--budgets", "0.1,0.3", "--num-calib", "2", "--repeats", "2", "--no-progress",
                           "--out", str(md), "--json", str(js)])
    assert rc == 0
    r = json.loads(js.read_text())
    rows = {(x["block"], x["variant"], x["budget"]): x for x in r["rows"]}
    assert len(rows) == 3 * 2 + 2 * 2  # SlimDiff has no Flux single-stream row
    assert not any(b == "flux-single" and v == SLIM_OWN for b, v, _ in rows)
    for key, x in rows.items():
        assert x["params_ratio"] < 1 and x["flops_speedup"] > 1 and x["speedup_lo"] <= x["speedup"] <= x["speedup_hi"]
    for v in (OBS_UNIFORM, OBS_GLOBAL, SLIM_OWN):  # a larger budget: fewer parameters kept in the real block
        assert rows["sd3-medium-joint", v, 0.3]["params_ratio"] < rows["sd3-medium-joint", v, 0.1]["params_ratio"]
    slim = [a for a in r["allocations"]["SD3"] if a["variant"] == SLIM_OWN and a["part"] == "attention"]
    assert all(a["heads"] == 1.0 for a in slim)  # SlimDiff keeps every head and lowers ranks
    text = md.read_text()
    assert "No Flux model" in text and "SD3 model" in text and "| flux-single |" in text


@pytest.mark.parametrize("argv,msg", [(["--budgets", "0.7"], "--budgets '0.7' must be"),
                                      (["--budgets", "x"], "--budgets 'x' must be"),
                                      (["--repeats", "0"], "--repeats 0 must be a positive integer"),
                                      (["--model-dir", "nowhere"], "--model-dir 'nowhere' is not a diffusers")])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, msg):
    out = tmp_path / "speed.md"
    assert bench_speed.main(["--tiny"] + argv + ["--out", str(out), "--json", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
