"""Arguments in brackets at the end of a registry name: ``lenet5[width=0.5]`` (a model builder's),
``mnist[scale=unit]`` (a data loader's), and options given as text (``-o beta=0.5``). One parser and
one typing rule; each registry adds its own messages."""
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


def typed(text: str, default):
    """``text`` as the type of ``default`` (bool, int, float; anything else keeps the text). Raises
    ``ValueError`` saying what the value must be.

    >>> typed("3", 1), typed("0.5", 1.0), typed("yes", False), typed("unit", "std")
    (3, 0.5, True, 'unit')
    """
    try:
        if isinstance(default, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
        if isinstance(default, (int, float)):
            return type(default)(float(text)) if isinstance(default, int) else float(text)
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"must be {kind}") from None
    return text


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
