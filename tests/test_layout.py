"""The package's layout (issue 18): imports flow one way and no module takes another's private names. Read
with ``ast`` from the sources, lazy (function-level) imports included."""
import ast
import importlib
import os

import obslib

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "obslib")


def _modules() -> dict[str, str]:
    out = {}
    for here, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(here, f), ROOT)[:-3].replace(os.sep, ".")
                name = "obslib" if rel == "__init__" else "obslib." + rel.removesuffix(".__init__")
                out[name] = os.path.join(here, f)
    return out


def _imports(name: str, path: str):
    """(imported module, names taken from it) for every obslib import in the file."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("obslib"):
                yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("obslib"):
                    yield a.name, []


def _graph():
    mods = _modules()
    g, private = {m: set() for m in mods}, []
    for m, path in mods.items():
        for target, names in _imports(m, path):
            for n in names:  # "from .pkg import module" names a module, not an attribute
                if f"{target}.{n}" in mods:
                    g[m].add(f"{target}.{n}")
                elif n.startswith("_") and not n.endswith("__") and target != m:
                    private.append(f"{m} takes {target}.{n}")
            inside = m.startswith(target + ".")  # "from . import sibling" names a module, not the package's __init__
            if target in mods and target != m and not (inside and (target == "obslib" or (
                    names and all(f"{target}.{n}" in mods for n in names)))):
                g[m].add(target)
    return g, private


def _cycles(g):
    seen, stack, onstack, out = {}, [], set(), []

    def visit(v):
        seen[v] = True
        stack.append(v)
        onstack.add(v)
        for w in sorted(g.get(v, ())):
            if w in onstack:
                out.append(stack[stack.index(w):] + [w])
            elif w not in seen:
                visit(w)
        stack.pop()
        onstack.discard(v)

    for v in sorted(g):
        if v not in seen:
            visit(v)
    return out


def test_no_import_circles():
    g, _ = _graph()
    # the package's __init__ re-exports; a module importing "obslib" itself (for __version__) is not a circle
    g = {m: {t for t in ts if t != "obslib"} for m, ts in g.items() if m != "obslib"}
    assert _cycles(g) == []


def test_no_private_names_across_modules():
    _, private = _graph()
    assert private == []


def test_the_checks_can_fail(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    f = tmp_path / "x.py"
    f.write_text("from .io import _tree_bytes\nfrom . import api\n")
    assert list(_imports("obslib.x", str(f))) == [("obslib.io", ["_tree_bytes"]), ("obslib", ["api"])]


@pytest.mark.parametrize("name", ["PruneConfig", "prune", "sampling_defaults", "save_pruned", "load_pipeline",
                                  "load_pruned", "SCHEMES", "timestep_weights", "__version__"])
def test_public_names_keep_working(name):
    import obslib
    import obslib.api

    assert hasattr(obslib, name)
    for n in ("PruneConfig", "prune", "prune_model", "collect_stats", "read_prompt_file", "save_pruned"):
        assert hasattr(obslib.api, n)


# ------------------------------------------------------------------ the library stands without its study (issue 33)
STUDY, TRAINER = "obslib.study", "obslib.shapes.train"
ENTRY_POINTS = {"obslib", "obslib.__main__", "obslib.api", "obslib.cli", "obslib.shapes", "obslib.shapes.train",
                "obslib.shapes.classifier"}  # run or imported from outside (python -m, console script, notebooks)


def _in_study(m: str) -> bool:
    return m == STUDY or m.startswith(STUDY + ".")


def _library_violations(g) -> list[str]:
    """Library modules (outside obslib.study) that import the study or the trainer."""
    return sorted(f"{m} imports {t}" for m, ts in g.items() if not _in_study(m) and m != TRAINER
                  for t in ts if _in_study(t) or t == TRAINER)


def _study_only(g) -> list[str]:
    """Modules outside obslib.study that no library module imports and that are no entry point: they serve only
    the study and belong in it."""
    used = {t for m, ts in g.items() if not _in_study(m) for t in ts if t != m}
    return sorted(m for m in g if not _in_study(m) and m not in used and m not in ENTRY_POINTS)


def test_the_library_never_imports_the_study_nor_the_trainer():
    g, _ = _graph()
    assert _library_violations(g) == []


def test_what_only_the_study_uses_lives_in_the_study():
    g, _ = _graph()
    assert _study_only(g) == []


def test_the_direction_checks_can_fail():
    g = {"obslib.cli": {"obslib.study.compare", "obslib.gradflow"}, "obslib.gradflow": {"obslib.shapes.train",
                                                                                   "obslib.bootstrap"},
         "obslib.study.compare": {"obslib.bootstrap", "obslib.helper"}, "obslib.bootstrap": set(), "obslib.helper": set(),
         "obslib.shapes.train": set()}
    assert _library_violations(g) == ["obslib.cli imports obslib.study.compare", "obslib.gradflow imports obslib.shapes.train"]
    assert _study_only(g) == ["obslib.helper"]


def test_only_paths_looks_where_obslib_is_installed():
    offenders = [m for m, path in _modules().items() if m != "obslib.paths" and "__file__" in open(path, encoding="utf-8").read()]
    assert offenders == []


def test_every_relative_import_names_an_existing_module():
    """Lazy imports inside functions are not executed by the other tests' imports: a module moved by a redesign
    (``obslib.shapes.report`` -> ``obslib.study.model_report``) must not leave one behind that fails only at run time."""
    import ast
    import importlib.util
    import pathlib

    root = pathlib.Path(obslib.__file__).parent
    missing = []
    for path in root.rglob("*.py"):
        pkg = ".".join(("obslib",) + path.relative_to(root).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
                if importlib.util.find_spec(target) is None:
                    missing.append(f"{path.relative_to(root)}:{node.lineno} {target}")
                elif node.module is None:
                    missing += [f"{path.relative_to(root)}:{node.lineno} {target}.{a.name}" for a in node.names
                                if importlib.util.find_spec(f"{target}.{a.name}") is None
                                and not hasattr(importlib.import_module(target), a.name)]
    assert missing == []
