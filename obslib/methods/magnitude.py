"""Magnitude pruning: |W| per layer; no calibration, no compensation."""
from ..baselines import magnitude_prune
from .base import Method

METHOD = Method("magnitude", "|W| per layer; no calibration, no compensation", unstructured=magnitude_prune,
                needs_calibration=False)
