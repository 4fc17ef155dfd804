"""Where obslib finds data that is not code: the only module that looks at where obslib itself is installed.

* The **shapes-world evaluator** (the classifier that reads the embedded models' images) ships inside the package,
  as package data (``obslib/shapes/data/shapes-classifier``): it works from a wheel as from a checkout.
  ``OBSLIB_CLASSIFIER`` points elsewhere (e.g. a retrained one).
* The **repository** (embedded models, results, notebooks: what the study reads and writes) is the source checkout
  obslib runs from (the folder above the package, when it holds ``models/`` and ``pyproject.toml``), or
  ``OBSLIB_HOME``. Installed from a wheel outside a checkout there is none: ``repo_root`` then says so in one line,
  and library commands that do not need it (``obslib prune``, ``obslib evaluate``) never ask.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

PACKAGE = Path(__file__).resolve().parent
CLASSIFIER_DIR = PACKAGE / "shapes" / "data" / "shapes-classifier"
EMBEDDED = "shapes-sd3"  # the study's model, under <repository>/models


def checkout() -> Path | None:
    """The source checkout obslib is imported from, if it is one (else None: an installed wheel)."""
    root = PACKAGE.parent
    return root if (root / "models").is_dir() and (root / "pyproject.toml").is_file() else None


def repo_root() -> Path:
    """The repository: ``OBSLIB_HOME`` if set, else the checkout obslib runs from."""
    home = os.environ.get("OBSLIB_HOME")
    if home:
        if not Path(home).is_dir():
            raise UsageError(f"OBSLIB_HOME {home!r} is not a folder; set it to a checkout of the obslib repository")
        return Path(home).resolve()
    root = checkout()
    if root is None:
        raise UsageError(f"obslib at {str(PACKAGE)!r} is not in a checkout of its repository (no models/ beside it); "
                         "set OBSLIB_HOME to one, or give the model's path")
    return root


def _root_or_guess() -> Path:
    """The repository if there is one, else the folder above the package (for defaults that are only strings until
    used)."""
    try:
        return repo_root()
    except UsageError:
        return PACKAGE.parent


def embedded_model() -> str:
    """The study's embedded model (``models/shapes-sd3`` of the repository)."""
    return str(_root_or_guess() / "models" / EMBEDDED)


def results_dir() -> str:
    return str(_root_or_guess() / "results")


def classifier_dir() -> Path:
    """The shapes-world evaluator's weights: ``OBSLIB_CLASSIFIER`` if set, else the package's own."""
    env = os.environ.get("OBSLIB_CLASSIFIER")
    return Path(env).resolve() if env else CLASSIFIER_DIR


DEFAULT_MODEL = embedded_model()
