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
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "source notebooks carry no outputs"
    assert sum("parameters" in c.metadata.get("tags", ()) for c in nb.cells) == 1  # papermill's parameters cell
