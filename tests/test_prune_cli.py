"""obslib.prune end to end on a tiny random SD3 pipeline, and the CLI's handling of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import obslib
from obslib.errors import UsageError
from obslib.shapes import prompts


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "obslib.cli", *args], capture_output=True, text=True, env=env)


def test_cli_unstructured_and_24_load_with_stock_pipeline(tiny_pipe_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    for pattern, s in (("unstructured", "0.5"), ("2:4", "0.5")):
        out = tmp_path / pattern.replace(":", "_")
        r = run_cli("prune", tiny_pipe_dir, "--pattern", pattern, "--sparsity", s, "--num-prompts", "4",
                    "--steps", "2", "--packages", "2", "--batch-size", "4", "--out", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        rep = json.load(open(out / "pruning_report.json"))
        for key in ("method", "pattern", "sparsity_target", "sparsity_actual", "params_before", "params_after",
                    "timings", "layers"):
            assert key in rep
        assert set(rep["timings"]) >= {"calibration_s", "solve_s", "total_s"}
        assert rep["sparsity_actual"] == pytest.approx(0.5, abs=0.01)
        assert len(rep["layers"]) == 4 * 12 - 3  # last block: no to_add_out / ff_context
        assert all(0 <= layer["rel_error"] < 1 for layer in rep["layers"])
        pipe = StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
        w = pipe.transformer.transformer_blocks[1].ff.net[2].weight
        if pattern == "2:4":
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        img = pipe("a small red circle", num_inference_steps=2, max_sequence_length=8, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 48, 48, 3) and torch.isfinite(torch.from_numpy(img)).all()


def test_structured_cli_reloads(tiny_pipe_dir, tmp_path):
    out = tmp_path / "s"
    r = run_cli("prune", tiny_pipe_dir, "--pattern", "structured", "--sparsity", "0.25", "--num-prompts", "4",
                "--steps", "2", "--packages", "1", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.load(open(out / "pruning_report.json"))
    assert rep["params_after"] < rep["params_before"]
    pipe = obslib.load_pruned(str(out))
    assert pipe.transformer.transformer_blocks[1].attn.heads == 3
    assert pipe.transformer.transformer_blocks[1].ff.net[2].weight.shape[1] == 96  # 128 - 25%


def test_same_seed_gives_identical_weights(tiny_pipe_dir):
    ws = []
    for _ in range(2):
        pipe = obslib.load_pipeline(tiny_pipe_dir)
        obslib.prune(pipe, obslib.PruneConfig(sparsity=0.5, prompts=prompts("train", 4), steps=2, batch_size=2,
                                              packages=2, progress=False))
        ws.append(torch.cat([p.flatten() for p in pipe.transformer.parameters()]))
    assert torch.equal(ws[0], ws[1])


def test_pruned_model_does_not_depend_on_batch_size(tiny_pipe_dir):
    """Each prompt's noise comes from its own seed (obslib.sampling.prompt_seed), so 8 prompts sampled one by one
    or all at once give the same masks (the weights agree to float32 rounding: the sums are added in another order)."""
    ws = []
    for bs in (1, 3, 8):
        pipe = obslib.load_pipeline(tiny_pipe_dir)
        obslib.prune(pipe, obslib.PruneConfig(sparsity=0.5, prompts=prompts("train", 8), steps=2, batch_size=bs,
                                              packages=2, progress=False, count_flops=False))
        ws.append({k: v.clone() for k, v in pipe.transformer.state_dict().items()})
    for w in ws[1:]:
        for k in ws[0]:
            assert torch.equal(w[k] == 0, ws[0][k] == 0), k
            torch.testing.assert_close(w[k], ws[0][k], rtol=1e-4, atol=1e-5)


def test_prompt_seeds_are_per_prompt_and_distinct():
    from obslib.seeds import prompt_generators, prompt_seed

    seeds = {prompt_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)  # no two prompts share noise across seeds
    assert prompt_seed(0, 5) == prompt_seed(0, 5) != prompt_seed(1, 4)
    a = torch.randn(4, generator=prompt_generators(7, [3])[0])
    b = torch.randn(4, generator=prompt_generators(7, [0, 1, 2, 3])[3])
    assert torch.equal(a, b)


def test_more_processes_than_prompts_is_one_line(tiny_pipe_dir, monkeypatch):
    """Sharding is by prompt: 3 processes need at least 3 prompts (a fake 3-rank group; no process is started)."""
    from obslib import distributed

    class Fake:
        rank, size, backend, sent = 0, 3, "gloo", 0

        def check_agreement(self, what, den):
            pass

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "Context", Fake)
    pipe = obslib.load_pipeline(tiny_pipe_dir)
    with pytest.raises(UsageError, match=r"3 processes but only 2 calibration prompts.*allowed: 1 to 2"):
        obslib.prune(pipe, obslib.PruneConfig(sparsity=0.5, prompts=prompts("train", 2), steps=2, progress=False,
                                              count_flops=False))


@pytest.mark.parametrize("args, needle", [
    (["--sparsity", "1.0"], "sparsity 1.0 is outside [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity -0.1 is outside [0, 1)"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "does not match pattern 2:4"),
    (["--pattern", "3:7"], "pattern '3:7' is unknown"),
    (["--weighting", "log"], "weighting 'log' is unknown"),
    (["--packages", "0"], "--packages 0 is outside [1, ∞)"),
    (["--method", "nope"], "method 'nope' is unknown"),
    (["--num-prompts", "0"], "--num-prompts 0"),
    (["--prompts", "EMPTY"], "is empty"),
    (["--prompts", "MISSING"], "does not exist"),
])
def test_bad_configuration_is_one_line_exit_2(tiny_pipe_dir, tmp_path, capsys, args, needle):
    """In-process (the CLI's own main); test_missing_model_directory runs the same path as a real process."""
    from obslib.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = [str(empty) if a == "EMPTY" else str(tmp_path / "nope.txt") if a == "MISSING" else a for a in args]
    out = tmp_path / "out"
    try:
        code = main(["prune", tiny_pipe_dir, *args, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("obslib: error:") and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_missing_model_directory(tmp_path):
    r = run_cli("prune", str(tmp_path / "nothing"), "--num-prompts", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_model_without_default_prompts_needs_prompt_file(tiny_pipe_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_pipe_dir, d)
    os.remove(d / "obslib_defaults.json")
    r = run_cli("prune", str(d), "--num-prompts", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--prompts FILE" in r.stderr


def test_help_documents_every_flag_with_its_default_and_version():
    from obslib.cli import build_parser

    for cmd in ("prune", "evaluate"):
        sub = build_parser()._subparsers._group_actions[0].choices[cmd]
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and not action.required:
                assert action.help, f"{cmd} {action.option_strings} has no help"
                if action.default not in (None, False) or action.dest in ("packages", "num_prompts", "iterations", "lr"):
                    assert "default" in action.help, f"{cmd} {action.option_strings} does not state its default"
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"obslib {obslib.__version__}"


def test_calibration_free_method_skips_calibration_and_closing_line_says_what(tiny_pipe_dir, tmp_path):
    r = run_cli("prune", tiny_pipe_dir, "--method", "magnitude", "--num-prompts", "2", "--packages", "2",
                "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    rep = json.load(open(tmp_path / "m" / "pruning_report.json"))
    assert rep["timings"]["calibration_s"] == 0 and all(layer["rel_error"] is None for layer in rep["layers"])
    line = r.stdout.strip().splitlines()[-1]
    assert "50.0% of the targeted layers' weights are zero" in line and "of the denoiser's" in line
    assert "parameter count is unchanged" in line and "wall (load" in line and "save" in line
    r = run_cli("prune", tiny_pipe_dir, "--method", "magnitude", "--num-prompts", "2", "--steps", "2", "--packages", "2",
                "--report-error", "--quiet", "--out", str(tmp_path / "e"))
    assert r.returncode == 0 and r.stdout == ""
    rep = json.load(open(tmp_path / "e" / "pruning_report.json"))
    assert all(0 < layer["rel_error"] < 1 for layer in rep["layers"])
    r = run_cli("prune", tiny_pipe_dir, "--pattern", "structured", "--sparsity", "0.25", "--num-prompts", "2",
                "--steps", "2", "--packages", "1", "--out", str(tmp_path / "s"))
    assert "removed" in r.stdout and "of the denoiser's" in r.stdout, r.stdout
