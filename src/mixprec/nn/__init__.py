"""Quantized layers and the quantized model."""
from .model import QuantLayer, QuantModel

__all__ = ["QuantLayer", "QuantModel"]
