"""The public API in one place (each name lives in the module of its idea; see README "How the code is laid out").

    pipe = obslib.load_pipeline("models/shapes-sd3")
    report = obslib.prune(pipe, obslib.PruneConfig(pattern="2:4", sparsity=0.5, prompts=[...]))
"""
from .config import CALIBRATIONS, MAX_SEED, PATTERNS, PruneConfig  # noqa: F401
from .errors import SolverError, UsageError  # noqa: F401
from .io import save_pruned  # noqa: F401
from .driver import prune, prune_model  # noqa: F401
from .sampling import collect_stats, default_calibration_prompts, read_prompt_file, sampling_defaults  # noqa: F401
from .surgery import NoUndo, Undo, n_remove, remove_heads, remove_neurons  # noqa: F401
from .archs import find_denoiser  # noqa: F401
