"""SparseGPT: OBS-Diff's solver with uniform timestep weights (the weighting ablation's baseline)."""
from .base import Method
from .obs_diff import obs_heads, obs_neurons, obs_unstructured

METHOD = Method("sparsegpt", "OBS-Diff's solver with uniform timestep weights", unstructured=obs_unstructured,
                heads=obs_heads, neurons=obs_neurons, forced_weighting="uniform",
                options=("head_saliency", "neuron_batch"))
