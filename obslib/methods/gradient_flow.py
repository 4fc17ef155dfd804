"""Gradient flow (our reconstruction, obslib.gradflow): soft gates on heads / neurons, GraSP criterion, training."""
from .base import Method, WholeModelRun


def driver(run: WholeModelRun) -> dict:
    from ..gradflow import gradient_flow_prune

    return gradient_flow_prune(run)


METHOD = Method("gradient-flow", "gradient-flow reconstruction: soft gates on heads / neurons, GraSP criterion, "
                "training", driver=driver, needs_calibration=False, needs_training=True, patterns=("structured",),
                ignores=("packages", "weighting", "calibration"),
                options=("iterations", "lr", "train_data", "gradient_criterion"))
