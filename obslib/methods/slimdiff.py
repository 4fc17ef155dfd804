"""SlimDiff (our reconstruction, obslib.slimdiff): spectral QK / VO / FFN slimming with a global rank allocator."""
from .base import Method, WholeModelRun


def driver(run: WholeModelRun) -> dict:
    from ..slimdiff import slimdiff_prune

    return slimdiff_prune(run.den, run.cfg, run.steps, run.component, run.undo, run.block_ids, calibrate=run.calibrate,
                          alphas=run.alphas)


METHOD = Method("slimdiff", "SlimDiff reconstruction: spectral QK / VO / FFN slimming with a global rank allocator",
                driver=driver, patterns=("structured",), ignores=("packages", "calibration"), allocation="global")
