"""The study: everything only the notebooks and the benchmarks use, apart from the library it studies.

``obslib.study`` runs the chapters (``python -m obslib.study``; ``settings(mode)`` holds every grid), and its modules
hold the chapters' experiment code: ``experiments`` (the resumable run cache), ``compare`` (paired intervals),
``verdicts`` and ``claims`` (what results/claims.md says), ``budgets`` and ``timesteps`` (chapters 03 and 08),
``timing`` (chapter 07), ``plots``, ``model_report`` (results/default_model.json) and the benchmarks ``bench_*``.
The library (``obslib`` outside this package) never imports from here (tests/test_layout.py).
"""
from .runner import NOTEBOOKS, main, rel, resolve_mode, run_study, settings  # noqa: F401
