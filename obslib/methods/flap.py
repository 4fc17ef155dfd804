"""FLAP: structured fluctuation score with bias compensation."""
from ..baselines import flap_heads, flap_neurons
from .base import Method

METHOD = Method("flap", "structured: fluctuation score with bias compensation", heads=flap_heads, neurons=flap_neurons)
