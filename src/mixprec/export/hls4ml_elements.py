"""Per-element (and per-channel) precision in hls4ml: its ``FixedPointQuantizer`` layer.

hls4ml types one tensor per layer, but its ``FixedPointQuantizer`` layer (made for HGQ's proxy
models) casts every element to its own ``ap_[u]fixed<b, i, RND, SAT>`` (``b = 0``: the element is
0) in ``io_parallel``. A tensor whose elements have their own grids and ranges is exported as the
producing layer's exact result, then such a quantizer, whose output type is the tensor's common
(finest, widest) grid: the values the next layer reads are the reference's, exactly.

The PyTorch front end knows no such layer: :func:`element_quantizer` makes an identity module that
hls4ml's tracer keeps whole (an ``HLS4MLModule``), and :func:`register` teaches the front end to
turn it into the quantizer layer.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from ..lower import IntNode
from ..numerics import qrange
from .base import ExportError

LAYER_CLASS = "ElementQuantizer"


def element_masks(node: IntNode, relu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per-element ``(keep sign, bits, integer bits)`` of ``node``'s output grid, in its output
    shape, or None where one type holds the whole tensor. Raises ExportError where an element's
    clamp is not its type's own range (after a ReLU where ``relu``)."""
    g = node.grid
    shape = tuple(node.out_shape)
    bits = np.broadcast_to(np.asarray(g.bits, dtype=np.int64), shape)
    lo = np.broadcast_to(np.asarray(g.lo, dtype=np.int64), shape)
    hi = np.broadcast_to(np.asarray(g.hi, dtype=np.int64), shape)
    uniform = g.post_shift is None and np.unique(bits).size == 1 and np.unique(lo).size == 1 and np.unique(hi).size == 1
    if uniform:
        return None
    qlo, qhi = qrange(bits, g.signed)
    want_lo = np.maximum(qlo, 0) if relu else qlo
    if not (np.array_equal(lo, want_lo) and np.array_equal(hi, qhi)):
        raise ExportError(f"node {node.name!r}: per-element clamps other than each element's own "
                          f"{'ReLU ' if relu else ''}range cannot be expressed in hls4ml")
    scale = np.broadcast_to(np.asarray(g.elem_scale, dtype=np.float64), shape)
    frac = -np.log2(scale)
    if not np.array_equal(frac, np.round(frac)):
        raise ExportError(f"node {node.name!r}: element scales are not powers of two")
    keep = np.full(shape, int(g.signed), dtype=np.int64)
    return keep, bits.copy(), bits - np.round(frac).astype(np.int64)


def channels_last(a: np.ndarray) -> np.ndarray:
    """hls4ml's order of a (C, ...) tensor: channels last, as its PyTorch front end converts them."""
    return np.moveaxis(a, 0, -1) if a.ndim > 1 else a


def element_quantizer(masks: tuple[np.ndarray, np.ndarray, np.ndarray], rounding: str, flat: bool) -> nn.Module:
    """An identity module that hls4ml turns into a ``FixedPointQuantizer`` with per-element
    ``(k, b, i)`` ``masks`` (given in the tensor's shape; hls4ml's channels-last order unless
    ``flat``), rounding ``rounding`` (``RND``: half up, the requantization; ``RND_CONV``: half to
    even, the input quantizer) and saturation."""
    order = (lambda a: a.reshape(-1)) if flat else channels_last
    module = _module_class()()
    module.masks = tuple(order(m)[None] for m in masks)  # hls4ml wants a leading batch axis of 1
    module.rounding = rounding
    return module


_CLASS: list = []


def _module_class() -> type:
    """The module class, built on first use: its base (hls4ml's leaf marker) loads hls4ml."""
    if not _CLASS:
        from hls4ml.utils.torch import HLS4MLModule

        _CLASS.append(type(LAYER_CLASS, (HLS4MLModule,), {"forward": lambda self, x: x,
                                                           "__doc__": "Identity; hls4ml's FixedPointQuantizer."}))
    return _CLASS[0]


def _handler(operation, layer_name, input_names, input_shapes, node, class_object, data_reader, config):
    layer = {"class_name": "FixedPointQuantizer", "name": layer_name, "inputs": input_names,
             "RND": class_object.rounding, "SAT": "SAT", "fusible": False, "overrides": {},
             "mask_kbi": class_object.masks}
    return layer, list(input_shapes[0])


def register() -> None:
    """Teach hls4ml's PyTorch front end the :func:`element_quantizer` module (once per process)."""
    from hls4ml.converters.pytorch_to_hls import get_supported_pytorch_layers, register_pytorch_layer_handler

    if LAYER_CLASS not in get_supported_pytorch_layers():
        register_pytorch_layer_handler(LAYER_CLASS, _handler)


def wide_input_frac(fracs: np.ndarray) -> int:
    """Fractional bits of an input port that holds every float64 value the finest element grid can
    round differently from its neighbours: at ``f + 53`` bits a double at or above half a step of
    the finest grid ``2^-f`` is exact, and one below it rounds to 0 either way, so truncating to the
    port and then rounding once per element gives the reference's single rounding."""
    return int(np.max(fracs)) + 53 if fracs.size else 53
