"""Arguments in brackets at the end of a registry name: ``lenet5[width=0.5]`` (a model builder's),
``mnist[scale=unit]`` (a data loader's). One parser; each registry gives the values their types and
its own messages."""
from __future__ import annotations


class NotKeyValue(ValueError):
    """An item in the brackets that is not ``KEY=VALUE``; ``item`` is the text."""

    def __init__(self, item: str):
        super().__init__(item)
        self.item = item


def split_bracketed(name: str) -> tuple[str, dict[str, str]]:
    """``"lenet5[width=0.5, depth=2]"`` -> ``("lenet5", {"width": "0.5", "depth": "2"})``; a name that
    does not end in ``[...]`` comes back whole with no arguments.

    >>> split_bracketed("mnist[scale=unit, val_size=1000]")
    ('mnist', {'scale': 'unit', 'val_size': '1000'})
    >>> split_bracketed("lenet5")
    ('lenet5', {})
    """
    if not name.endswith("]") or "[" not in name:
        return name, {}
    base, _, args = name[:-1].partition("[")
    items = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NotKeyValue(item)
        items[key.strip()] = value.strip()
    return base, items
