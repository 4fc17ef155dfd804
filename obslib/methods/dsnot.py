"""DSnoT: Wanda's mask refined by training-free swaps."""
from ..baselines import dsnot_prune
from .base import Method

METHOD = Method("dsnot", "Wanda mask refined by training-free swaps", unstructured=dsnot_prune)
