"""L1-norm structured pruning: the L1 norm of output-projection columns; no calibration, no compensation."""
from ..baselines import l1_heads, l1_neurons
from .base import Method

METHOD = Method("l1-norm", "structured: L1 norm of output-projection columns; no compensation", heads=l1_heads,
                neurons=l1_neurons, needs_calibration=False)
