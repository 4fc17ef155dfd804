"""Wanda: |W|·‖X‖ per output row; no compensation."""
from ..baselines import wanda_prune
from .base import Method

METHOD = Method("wanda", "|W|*||X|| per output row; no compensation", unstructured=wanda_prune)
