"""Quantizers: the shared interface and the fixed-bit quantizers every method ends in."""
from .base import Frozen, LearnedQuantizer, QParams, Quantizer, ceil_ste, fake_quant, round_ste
from .dnas import DNASActQuantizer, DNASWeightQuantizer
from .dq import DQActQuantizer, DQWeightQuantizer
from .fixed import ActQuantizer, FixedWeightQuantizer, freeze_observers
from .hgq import HGQActQuantizer, HGQRound, HGQWeightQuantizer

__all__ = ["Frozen", "LearnedQuantizer", "QParams", "Quantizer", "ceil_ste", "fake_quant", "round_ste", "ActQuantizer",
           "FixedWeightQuantizer", "freeze_observers",
           "HGQActQuantizer", "HGQRound", "HGQWeightQuantizer", "DQActQuantizer", "DQWeightQuantizer",
           "DNASActQuantizer", "DNASWeightQuantizer"]
