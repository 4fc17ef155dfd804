"""obslib installed from a wheel, outside its checkout (issue 33): the library stands without the repository.

The wheel is built from a copy of the package's sources (nothing is written into the checkout), installed without
its dependencies into a fresh virtual environment that sees the pinned ones of the test environment (a path line,
so the checkout's editable install is not visible there), and run from another folder on a copy of the embedded
model: `obslib prune`, `obslib evaluate --prompts` and the shapes-world `obslib evaluate OUT --reference MODEL`,
whose evaluator ships inside the wheel.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, env=None):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd[:3]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, f), src / f)
    shutil.copytree(os.path.join(REPO, "obslib"), src / "obslib", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(base / "dist")],
         cwd=src)
    wheel = next((base / "dist").glob("obslib-*.whl"))
    env_dir = base / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip()
    with open(os.path.join(site, "pinned-deps.pth"), "w") as f:  # the test environment's packages, not its obslib
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=base)
    work = base / "elsewhere"
    work.mkdir()
    model = work / "my-model"
    shutil.copytree(os.path.join(REPO, "models", "shapes-sd3"), model)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OBSLIB_HOME", "OBSLIB_CLASSIFIER")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return {"bin": env_dir / "bin", "py": py, "work": work, "model": model, "env": env, "site": site}


def test_the_wheel_holds_the_package_and_its_evaluator_and_not_the_checkout(wheel_env):
    r = _run([str(wheel_env["py"]), "-c", "import obslib, obslib.paths as p; print(obslib.__file__); "
              "print(p.checkout()); print(p.classifier_dir().is_dir())"], cwd=wheel_env["work"], env=wheel_env["env"])
    where, checkout, classifier = r.stdout.split()
    assert where.startswith(wheel_env["site"]) and not where.startswith(REPO)
    assert checkout == "None" and classifier == "True"


def test_prune_and_both_evaluations_run_from_the_wheel(wheel_env):
    w, env, b = wheel_env["work"], wheel_env["env"], wheel_env["bin"]
    _run([str(b / "obslib"), "prune", str(wheel_env["model"]), "--sparsity", "0.5", "--num-prompts", "2", "--out", "pruned"],
         cwd=w, env=env)
    rep = json.loads((w / "pruned" / "pruning_report.json").read_text())
    assert abs(rep["sparsity_actual"] - 0.5) < 0.01
    (w / "prompts.txt").write_text("a red circle on a white background\na blue square left of a green triangle\n")
    _run([str(b / "obslib"), "evaluate", "pruned", "--reference", str(wheel_env["model"]), "--prompts", "prompts.txt",
          "--steps", "4", "--out", "by_prompts.json"], cwd=w, env=env)
    _run([str(b / "obslib"), "evaluate", "pruned", "--reference", str(wheel_env["model"]), "--num-prompts", "4",
          "--steps", "4", "--out", "shapes.json"], cwd=w, env=env)
    shapes = json.loads((w / "shapes.json").read_text())
    assert "prompt_fidelity" in json.dumps(shapes)
    assert "psnr" in json.dumps(json.loads((w / "by_prompts.json").read_text()))
