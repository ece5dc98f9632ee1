"""Deployment targets: what a device can store and run, as data in ``cost/targets/*.yaml``.

>>> t = load_target("mpic")
>>> t.weight_bits, t.throughput(8, 4)
((0, 2, 4, 8), 2.3)
>>> "cortex-m4" in list_targets()
True

A target file holds exactly the fields of ``Target`` (``description`` and ``alignment`` may be
left out). Integer lists may be written as a range string, ``"1..16"``. Capacities may be an int
or a size string (``"512KiB"``, see ``units.parse_size``) or null (no limit). Unknown, missing or
mistyped keys raise ``ValueError`` naming the file and the key.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from ..granularity import GRANULARITIES
from ..numerics import zero_bit_groups_allowed
from .units import parse_size

NUMERICS = ("scaled", "fixed")
_RANGE = re.compile(r"^\s*(\d+)\s*\.\.\s*(\d+)\s*$")


#: Signed symmetric weight codes: 1 bit holds only 0 (codes -(2^(b-1)-1) .. 2^(b-1)-1)
MIN_VALUE_WEIGHT_BITS = 2

@dataclass(frozen=True)
class ParamBytes:
    """Bytes of each stored per-scale / per-channel parameter (0 = not stored)."""

    bias: int
    multiplier: int
    shift: int
    zero_point: int

    @property
    def requant(self) -> int:
        """Bytes of one requantization step (multiplier + shift + zero point)."""
        return self.multiplier + self.shift + self.zero_point


@dataclass(frozen=True)
class Target:
    name: str
    flash_bytes: int | None
    ram_bytes: int | None
    numerics: str
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    weight_granularities: tuple[str, ...]
    act_granularities: tuple[str, ...]
    weight_containers: tuple[int, ...]
    act_containers: tuple[int, ...]
    param_bytes: ParamBytes
    clock_hz: float
    power_mw: float
    macs_per_cycle: dict = field(hash=False)  # {act bits: {weight bits: MACs per cycle}}
    elementwise_per_cycle: float
    description: str = ""
    alignment: int = 1  # byte alignment of every activation buffer offset and size in the arena

    @property
    def value_weight_bits(self) -> tuple[int, ...]:
        """The weight widths that hold a value other than 0. Weights are signed and symmetric, so
        1 bit holds only 0: pruning by another name, at a bit per weight (a uniform 1-bit MNIST MLP
        scored 11.35% at 0 EBOPs), never a width to choose for a layer that is not being pruned."""
        return tuple(b for b in self.weight_bits if b >= MIN_VALUE_WEIGHT_BITS)

    @property
    def min_weight_bits(self) -> int:
        """Smallest weight width that holds a non-zero value (see :attr:`value_weight_bits`)."""
        return min(self.value_weight_bits)

    @property
    def min_act_bits(self) -> int:
        return min(self.act_bits)

    @property
    def allows_pruning(self) -> bool:
        return 0 in self.weight_bits

    def act_bits_of(self, groups: int) -> tuple[int, ...]:
        """The widths the entries of an activation grid of ``groups`` bit groups may take: the
        target's, and 0 where :func:`~mixprec.numerics.zero_bit_groups_allowed`."""
        return (0, *self.act_bits) if zero_bit_groups_allowed(self.numerics, groups) else self.act_bits

    def throughput(self, act_bits: float, weight_bits: float) -> float:
        """MACs per cycle at the table entry of the next supported width up (clamped to the largest).

        >>> load_target("mpic").throughput(3, 5)
        2.1
        """
        row = self.macs_per_cycle[_key_up(act_bits, self.macs_per_cycle)]
        return row[_key_up(weight_bits, row)]


def _key_up(bits: float, table: Mapping[int, object]) -> int:
    keys = sorted(table)
    return next((k for k in keys if k >= bits - 1e-6), keys[-1])


# ----------------------------------------------------------------------------- choices on a target

def default_weight_granularity(target: Target) -> str:
    """Per channel where the target's kernels allow it (it costs a few bytes and buys accuracy)."""
    for g in ("per-channel", "per-tensor"):
        if g in target.weight_granularities:
            return g
    return target.weight_granularities[0]


def weight_granularity_for(t: Target, requested: str | None) -> str:
    """The requested weight granularity (the target's default when ``None``), refused with the
    supported ones when the target's kernels cannot run it."""
    gran = requested or default_weight_granularity(t)
    if gran not in t.weight_granularities:
        raise ValueError(f"target {t.name} does not support {gran} weights; it supports "
                         f"{', '.join(t.weight_granularities)}")
    return gran


def nonzero_widths(t: Target) -> list[int]:
    """The target's weight widths that hold non-zero values, widest first: neither 0 (pruning is
    not a uniform width) nor 1 (a signed symmetric 1-bit weight is 0)."""
    return sorted(t.value_weight_bits, reverse=True)


def activation_width_for(weight_bits: int, t: Target) -> int:
    """The narrowest supported activation width at least as wide as the weights (uniform pairing)."""
    return min((a for a in t.act_bits if a >= weight_bits), default=max(t.act_bits))


# ----------------------------------------------------------------------------- loading

def list_targets() -> list[str]:
    """Names of the targets shipped with mixprec."""
    return sorted(p.name[: -len(".yaml")] for p in _target_dir().iterdir() if p.name.endswith(".yaml"))


def load_target(name_or_path: str | Path) -> Target:
    """A shipped target by name (``"cortex-m4"``) or a target YAML file by path."""
    path = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    return target_from_dict(data, source=str(path))


def as_target(target: str | Target) -> Target:
    """``target`` itself, or the target it names (see :func:`load_target`)."""
    return target if isinstance(target, Target) else load_target(target)


def _target_dir():
    return resources.files("mixprec.cost").joinpath("targets")


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    shipped = _target_dir().joinpath(f"{path.name}.yaml")
    if str(name_or_path) == path.name and not path.suffix and shipped.is_file():
        return Path(str(shipped))
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if not path.is_file():
            raise ValueError(f"target file {str(path)!r} does not exist")
        return path
    raise ValueError(f"unknown target {str(name_or_path)!r}; shipped targets: {', '.join(list_targets())} "
                     "(or give the path of a .yaml file)")


def target_from_dict(data: object, source: str = "<dict>") -> Target:
    """Validate a parsed target mapping strictly and build the ``Target``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a target file must hold a mapping of keys, got {type(data).__name__}")
    known = {f.name for f in fields(Target)}
    optional = {"description", "alignment"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"known keys: {', '.join(sorted(known))}")
    missing = sorted(known - optional - set(data))
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(map(repr, missing))}")
    values = {key: _PARSERS[key](data[key], _Where(source, key)) for key in data}
    _check_consistent(values, source)
    return Target(**values)


@dataclass(frozen=True)
class _Where:
    source: str
    key: str

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: key {self.key!r}: {message}")


def _str(value, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {value!r}")
    return value


def _int(value, where: _Where, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise where.error(f"expected an integer >= {minimum}, got {value!r}")
    return value


def _positive(value, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise where.error(f"expected a positive number, got {value!r}")
    return float(value)


def _capacity(value, where: _Where) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as err:
        raise where.error(f"expected null, an int or a size string such as '512KiB': {err}") from err


def _ints(value, where: _Where, minimum: int = 0) -> tuple[int, ...]:
    if isinstance(value, str) and (m := _RANGE.match(value)):
        value = list(range(int(m.group(1)), int(m.group(2)) + 1))
    if not isinstance(value, list) or not value:
        raise where.error(f"expected a non-empty list of integers or a range 'lo..hi', got {value!r}")
    ints = tuple(_int(v, where, minimum) for v in value)
    if list(ints) != sorted(set(ints)):
        raise where.error(f"expected strictly increasing integers, got {list(ints)}")
    return ints


def _choices(allowed: tuple[str, ...]):
    def parse(value, where: _Where) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or any(v not in allowed for v in value):
            raise where.error(f"expected a non-empty list from {list(allowed)}, got {value!r}")
        return tuple(value)
    return parse


def _numerics(value, where: _Where) -> str:
    if value not in NUMERICS:
        raise where.error(f"expected one of {list(NUMERICS)}, got {value!r}")
    return value


def _param_bytes(value, where: _Where) -> ParamBytes:
    names = [f.name for f in fields(ParamBytes)]
    if not isinstance(value, dict) or set(value) != set(names):
        raise where.error(f"expected a mapping with exactly the keys {names}, got {value!r}")
    return ParamBytes(**{k: _int(value[k], _Where(where.source, f"{where.key}.{k}")) for k in names})


def _table(value, where: _Where) -> dict[int, dict[int, float]]:
    if not isinstance(value, dict) or not value:
        raise where.error("expected a mapping {act bits: {weight bits: MACs per cycle}}")
    table = {}
    for a, row in value.items():
        inner = _Where(where.source, f"{where.key}.{a}")
        if not isinstance(row, dict) or not row:
            raise inner.error(f"expected a mapping {{weight bits: MACs per cycle}}, got {row!r}")
        table[_int(a, where, 1)] = {_int(w, inner, 1): _positive(v, inner) for w, v in row.items()}
    return table


_PARSERS = {
    "name": _str,
    "description": _str,
    "flash_bytes": _capacity,
    "ram_bytes": _capacity,
    "numerics": _numerics,
    "weight_bits": _ints,
    "act_bits": lambda v, w: _ints(v, w, 1),
    "weight_granularities": _choices(GRANULARITIES),
    "act_granularities": _choices(GRANULARITIES),
    "weight_containers": lambda v, w: _ints(v, w, 1),
    "act_containers": lambda v, w: _ints(v, w, 1),
    "param_bytes": _param_bytes,
    "alignment": lambda v, w: _int(v, w, 1),
    "clock_hz": _positive,
    "power_mw": _positive,
    "macs_per_cycle": _table,
    "elementwise_per_cycle": _positive,
}


def _check_consistent(v: dict, source: str) -> None:
    for bits, containers in (("weight_bits", "weight_containers"), ("act_bits", "act_containers")):
        if max(v[bits]) > max(v[containers]):
            raise ValueError(f"{source}: key {containers!r}: largest container {max(v[containers])} "
                             f"cannot hold {max(v[bits])}-bit values listed in {bits!r}")
    if not any(b > 0 for b in v["weight_bits"]):
        raise ValueError(f"{source}: key 'weight_bits': needs at least one non-zero width")
    columns = {tuple(sorted(row)) for row in v["macs_per_cycle"].values()}
    if len(columns) != 1:
        raise ValueError(f"{source}: key 'macs_per_cycle': every activation row needs the same weight columns")
