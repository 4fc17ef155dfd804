"""The method interface (issue 33): each method answers its capability questions once, from its own file."""
import os

import pytest

import obslib.methods as methods
from obslib.methods import METHODS
from obslib.methods.base import Method

# name: (calibrates, whole model, removes heads, checkpoints, allocations, patterns, refits, weighting used)
EXPECTED = {
    "obs-diff": (True, False, True, "packages", ("uniform", "global"), ("unstructured", "2:4", "4:8", "structured"), True, "cosine"),
    "sparsegpt": (True, False, True, "packages", ("uniform", "global"), ("unstructured", "2:4", "4:8", "structured"), True, "uniform"),
    "magnitude": (False, False, False, "packages", ("uniform",), ("unstructured", "2:4", "4:8"), False, "cosine"),
    "wanda": (True, False, False, "packages", ("uniform", "global"), ("unstructured", "2:4", "4:8"), True, "cosine"),
    "dsnot": (True, False, False, "packages", ("uniform", "global"), ("unstructured", "2:4", "4:8"), True, "cosine"),
    "l1-norm": (False, False, True, "packages", ("uniform",), ("structured",), False, "cosine"),
    "flap": (True, False, True, "packages", ("uniform", "global"), ("structured",), False, "cosine"),
    "slimdiff": (True, True, False, None, ("uniform", "global"), ("structured",), False, "cosine"),
    "gradient-flow": (False, True, True, "gradient-flow", ("uniform",), ("structured",), False, None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_method_answers_its_questions(name):
    m = METHODS[name]
    got = (m.calibrates(), m.whole_model, m.removes_heads, m.checkpoint_kind, m.allocations(),
           tuple(p for p in ("unstructured", "2:4", "4:8", "structured") if m.supports(p)), m.refits,
           m.weighting("cosine"))
    assert got == EXPECTED[name]


def test_measuring_the_error_calibrates_only_in_the_package_driver():
    assert METHODS["magnitude"].calibrates(measure_error=True) is True
    assert METHODS["gradient-flow"].calibrates(measure_error=True) is False


def test_why_the_weighting_is_ignored():
    assert METHODS["obs-diff"].why_weighting_ignored() is None
    assert "uniform" in METHODS["sparsegpt"].why_weighting_ignored()
    assert "no calibration" in METHODS["l1-norm"].why_weighting_ignored()
    assert "trains" in METHODS["gradient-flow"].why_weighting_ignored()


def test_a_method_is_one_file_and_one_registry_line():
    folder = os.path.dirname(methods.__file__)
    files = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f not in ("__init__.py", "base.py"))
    assert sorted(m.__name__.rsplit(".", 1)[1] for m in methods._REGISTRY) == files
    assert all(isinstance(m.METHOD, Method) for m in methods._REGISTRY)
    assert [m.METHOD.name for m in methods._REGISTRY] == list(METHODS)
    assert sorted(n.replace("-", "_") for n in METHODS) == files  # the file is named after the method
