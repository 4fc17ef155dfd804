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

# retrain the embedded default model (resumable; ~45 min on 2 idle CPU cores)
model: install
	$(PY) -m obslib.shapes.train --steps 5000
