"""obslib: OBS-Diff — one-shot, training-free pruning of text-to-image diffusion models.

    pipe = obslib.load_pipeline("models/shapes-sd3")
    report = obslib.prune(pipe, obslib.PruneConfig(pattern="2:4", sparsity=0.5, prompts=[...]))
"""
from .config import PruneConfig  # noqa: F401
from .io import load_pipeline, load_pruned, save_pruned  # noqa: F401
from .driver import prune  # noqa: F401
from .sampling import sampling_defaults  # noqa: F401
from .weighting import SCHEMES, timestep_weights  # noqa: F401

__version__ = "0.1.0"
