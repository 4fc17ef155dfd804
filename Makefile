# Two entry points (see README): `make study` runs the whole study, `make test` runs the tests.
# Both create the virtual environment if missing and install the pinned dependencies first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test study model clean-results

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# pytest + nbval (lax) over every notebook in quick mode (OBSLIB_MODE=quick)
test: install
	OBSLIB_MODE=quick MPLBACKEND=Agg $(PY) -m pytest tests --nbval-lax notebooks -p no:cacheprovider

# the whole study: every notebook with its full parameters through papermill
study: install
	MPLBACKEND=Agg $(PY) -m obslib.study

# retrain the embedded default model the way the committed one was trained (both stages resumable;
# ~38 + ~90 min on 2 idle CPU cores): 5,000 steps on free placement, then 9,000 on the world's lattice
model: install
	$(PY) -m obslib.shapes.train --layout free --steps 5000 --checkpoint-dir checkpoints/stage1 --out checkpoints/stage1/model
	$(PY) -m obslib.shapes.train --init-from checkpoints/stage1/model --steps 9000 --checkpoint-dir checkpoints/lattice --out models/shapes-sd3
