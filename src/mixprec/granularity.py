"""Granularity is the shape of a parameter tensor, not a class.

A bit-width (or scale) tensor ``p`` applies to a value tensor ``x`` when, along every dimension,
``p`` has size 1 (shared), the same size (one per index), or a divisor of it (one per slice of
consecutive indices). ``expand`` turns any such ``p`` into ``x``'s shape; every quantizer and cost
function goes through it, so per-tensor, per-channel, per-slice and per-element share one code path.

>>> import torch
>>> shape_for("per-channel", (8, 3, 3, 3))
(8, 1, 1, 1)
>>> expand(torch.tensor([[2.0], [4.0]]), (4, 3)).tolist()
[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
"""
from __future__ import annotations

import torch

GRANULARITIES = ("per-tensor", "per-channel", "per-slice", "per-element")


def shape_for(granularity: str, shape: tuple[int, ...], slices: int = 4) -> tuple[int, ...]:
    """The parameter shape for a granularity over a value tensor of ``shape`` (channel = dim 0).

    ``per-slice`` groups consecutive channels into ``slices`` groups (fewer if there are fewer
    channels; the count is reduced until it divides the channel count).
    """
    ones = (1,) * (len(shape) - 1)
    if granularity == "per-tensor":
        return (1,) + ones
    if granularity == "per-channel":
        return (shape[0],) + ones
    if granularity == "per-slice":
        n = min(slices, shape[0])
        while shape[0] % n:
            n -= 1
        return (n,) + ones
    if granularity == "per-element":
        return tuple(shape)
    raise ValueError(f"unknown granularity {granularity!r}; supported: {', '.join(GRANULARITIES)}")


def granularity_of(param_shape: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """Name the granularity of a parameter shape relative to a value shape."""
    param_shape = tuple(param_shape) or (1,)
    if all(p == 1 for p in param_shape):
        return "per-tensor"
    if tuple(param_shape) == tuple(shape) and any(s > 1 for s in shape[1:]):
        return "per-element"
    if all(p == 1 for p in param_shape[1:]):
        return "per-channel" if param_shape[0] == shape[0] else "per-slice"
    return "per-element"


def check_compatible(param_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if len(param_shape) > len(shape):
        raise ValueError(f"parameter shape {tuple(param_shape)} has more dims than value shape {tuple(shape)}")
    padded = (1,) * (len(shape) - len(param_shape)) + tuple(param_shape)
    for p, s in zip(padded, shape):
        if p != 1 and s % p:
            raise ValueError(f"parameter shape {tuple(param_shape)} does not tile value shape {tuple(shape)}")


def expand(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Expand ``param`` to ``shape``: broadcast size-1 dims, repeat each entry over its slice."""
    shape = tuple(shape)
    check_compatible(tuple(param.shape), shape)
    p = param.reshape((1,) * (len(shape) - param.dim()) + tuple(param.shape))
    for dim, (n, full) in enumerate(zip(p.shape, shape)):
        if n not in (1, full):
            p = p.repeat_interleave(full // n, dim=dim)
    return p.expand(shape)


def reduce_to(values: torch.Tensor, param_shape: tuple[int, ...], op: str = "amax") -> torch.Tensor:
    """Reduce a full tensor onto a parameter shape (the inverse of ``expand``): ``op`` is
    ``amax``, ``amin``, ``mean`` or ``sum`` per group."""
    shape = tuple(values.shape)
    check_compatible(tuple(param_shape), shape)
    param_shape = (1,) * (len(shape) - len(param_shape)) + tuple(param_shape)
    split = []
    for n, full in zip(param_shape, shape):
        split += [n, full // n]
    v = values.reshape(split)
    dims = tuple(range(1, 2 * len(shape), 2))
    reducers = {"amax": v.amax, "amin": v.amin, "mean": v.mean, "sum": v.sum}
    out = reducers[op](dim=dims)
    return out.reshape(param_shape)
