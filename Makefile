# Two entry points (see README): `make study` runs the whole study, `make test` runs the tests.
# Both create the virtual environment if missing and install the pinned dependencies first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test study tour model model-flux bench-gpu bench-speed notebooks notebook-outputs clean-results

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# pytest + nbval over every notebook in quick mode (OBSLIB_MODE=quick): every cell must run, and cells marked
# "# NBVAL_CHECK_OUTPUT" must print what notebooks/*.ipynb hold (their quick-mode outputs, refreshed by `make notebook-outputs`)
# The notebooks (nbval: each runs in one kernel, in order) and the tests run as two pytest processes side by side,
# one torch thread each (2 cores); the notebooks' report follows the tests', and either failing fails the target.
# The checked outputs are float32 results, so they are pinned to AVX2 kernels (torch, MKL, oneDNN): an AVX-512 machine
# would otherwise round differently and move printed PSNRs by ~0.1 dB (on an AVX2-only machine these are no-ops).
# OMP_WAIT_POLICY=PASSIVE: the two halves share 2 cores, and where a notebook asks for 2 threads (chapter 09's noise
# floor) spinning OpenMP workers halve throughput (a 2-thread matmul loop beside a 2-thread job: 1070 calls/s spinning,
# 1950 passive, 2370 on 1 thread); it changes scheduling only, not the order of any sum
TEST_ENV := OBSLIB_MODE=quick MPLBACKEND=Agg OBSLIB_THREADS=1 OBSLIB_TEST_THREADS=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test: install
	@mkdir -p .tmp
	$(TEST_ENV) $(PY) -m pytest --nbval-lax notebooks --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider --durations=25 \
	  > .tmp/nbval.log 2>&1 & nb=$$!; \
	$(TEST_ENV) $(PY) -m pytest tests -p no:cacheprovider --durations=25; t=$$?; \
	wait $$nb; n=$$?; echo "--- notebooks (nbval) ---"; cat .tmp/nbval.log; \
	echo "tests exit $$t, notebooks exit $$n"; test $$t -eq 0 && test $$n -eq 0

# the notebooks' sources are the jupytext scripts notebooks/NN_*.py: after editing one, refresh its .ipynb
# (make test fails while a pair is out of sync)
notebooks: install
	$(VENV)/bin/jupytext --update --to ipynb notebooks/[0-9]*.py

# run every notebook in quick mode in place, so notebooks/*.ipynb hold the reference outputs nbval checks
notebook-outputs: install
	rm -rf .tmp/quick  # as on a fresh clone: every quick row computed again, with the thread count make test uses
	for nb in notebooks/[0-9]*.ipynb; do $(TEST_ENV) $(VENV)/bin/jupyter nbconvert --to notebook \
	  --execute --inplace --ExecutePreprocessor.timeout=1800 $$nb || exit 1; done

# five minutes: the walkthrough in quick mode, one prune, one evaluation (outputs under .tmp)
tour: install
	OBSLIB_MODE=quick MPLBACKEND=Agg $(PY) -m obslib.study 00_walkthrough.ipynb --mode quick
	mkdir -p .tmp
	$(VENV)/bin/obslib prune models/shapes-sd3 --sparsity 0.5 --num-prompts 16 --out .tmp/obs50 --overwrite
	$(VENV)/bin/obslib evaluate .tmp/obs50 --reference models/shapes-sd3 --num-prompts 64 --out .tmp/obs50.json

# the whole study: every notebook with its full parameters through papermill, under one numerical regime (two torch
# threads, AVX2 kernels in torch, MKL and oneDNN): the regime is part of every cached row's key (obslib.study.experiments.regime),
# so the committed results/runs.csv is reused on any x86-64 machine with AVX2, and rows of another regime are recomputed
STUDY_ENV := MPLBACKEND=Agg OBSLIB_THREADS=2 OMP_NUM_THREADS=2 \
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
study: install
	$(STUDY_ENV) $(PY) -m obslib.study

# real-shape CPU speed of structurally pruned blocks (results/speed_real.md; ~15 min on 2 idle cores)
bench-speed: install
	$(STUDY_ENV) $(PY) -m obslib.study.bench_speed

# the GPU benchmark (results/gpu.md): needs CUDA; `--tiny` runs it on the CPU
bench-gpu: install
	$(PY) -m obslib.study.bench_gpu

# retrain the embedded default model the way the committed one was trained (both stages resumable;
# ~38 + ~90 min on 2 idle CPU cores): 5,000 steps on free placement, then 9,000 on the world's lattice
model: install
	$(PY) -m obslib.shapes.train --layout free --steps 5000 --checkpoint-dir checkpoints/stage1 --out checkpoints/stage1/model
	$(PY) -m obslib.shapes.train --init-from checkpoints/stage1/model --steps 9000 --checkpoint-dir checkpoints/lattice --out models/shapes-sd3

# the second embedded model (obslib/shapes/flux.py): FluxPipeline, trained around the SD3 model's VAE; resumable
# (rerun the same command after an interruption); run it in the background: it takes hours on 2 cores
model-flux: install
	$(PY) -m obslib.shapes.train --arch flux --steps 12000 --batch 64 --checkpoint-dir checkpoints/shapes-flux \
	  --log checkpoints/shapes-flux/train_loss.csv --out models/shapes-flux
	cp checkpoints/shapes-flux/train_loss.csv results/train_loss_flux.csv  # the loss log joins results/ once complete
