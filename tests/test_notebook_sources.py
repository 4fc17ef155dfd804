"""Each notebook has one editable source: the jupytext percent script beside it (notebooks/NN_name.py).
The .ipynb a reader opens must hold exactly the script's cells; after editing a script run `make notebooks`."""
import glob
import os

import jupytext
import nbformat
import pytest

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))


def _cells(nb):
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_every_notebook_has_a_script_and_every_script_a_notebook():
    scripts = sorted(glob.glob(os.path.join(NB_DIR, "*.py")))
    assert NOTEBOOKS and [p[:-3] for p in scripts] == [p[:-6] for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_matches_its_script(path):
    script = jupytext.read(path[:-6] + ".py")
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert _cells(nb) == _cells(script), (f"{os.path.basename(path)} is out of sync with its .py script; "
                                          "run `make notebooks` after editing the script")
    checked = [c for c in nb.cells if c.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in c.source]
    if not os.path.basename(path).startswith("07_"):  # 07 prints timings only
        assert checked, "every chapter checks some deterministic output (# NBVAL_CHECK_OUTPUT)"
    assert all(c.get("outputs") for c in checked), ("a checked cell has no stored output for nbval to compare: "
                                                    "run `make notebook-outputs`")
    assert sum("parameters" in c.metadata.get("tags", ()) for c in nb.cells) == 1  # papermill's parameters cell


def _texts(nb):
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            yield c, o.get("text", "") + "".join(v for k, v in o.get("data", {}).items() if k.startswith("text/"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_outputs_are_clean_and_every_chapter_answers(path):
    nb = nbformat.read(path, as_version=4)
    for c, text in _texts(nb):
        assert "TqdmWarning" not in text and "IProgress" not in text, f"{os.path.basename(path)}: progress-bar warning"
        assert "/work/" not in text and "/home/" not in text and "/root/" not in text, f"{os.path.basename(path)}: absolute path in {text[:80]!r}"
        assert "Empty DataFrame" not in text, f"{os.path.basename(path)}: an empty DataFrame is printed"
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Answer" in md and "## Try next" in md
    if not os.path.basename(path).startswith("00_"):
        assert "00_walkthrough.ipynb#Glossary-of-the-metrics" in md  # one glossary, linked, not pasted
        assert "Every quality number is the mean over" not in md
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])), \
        f"{os.path.basename(path)}: no figure among the stored outputs"
