"""Layer names as identifiers of the generated code (C symbols, ONNX initializers, hls4ml layers).

Layers are named after the user's modules (``features.3``, ``layer1.0.conv2``); generated code
needs identifiers, and two names must never meet in one after escaping (``features.3`` and a
module named ``features_3``).
"""
from __future__ import annotations

import re
from typing import Hashable, Iterable


def escape(name: str, lower: bool = False) -> str:
    """``name`` with every character other than a letter, digit or ``_`` written as ``_``, and
    ``n`` before a first character that is not a letter: ``features.3`` -> ``features_3``,
    ``0.0`` -> ``n0_0``."""
    out = re.sub(r"[^0-9A-Za-z_]", "_", name.lower() if lower else name)
    return out if out[:1].isalpha() else "n" + out


def identifiers(names: dict[Hashable, str] | Iterable[str], reserved: Iterable[str] = (),
                lower: bool = False) -> dict:
    """Distinct identifiers for ``names`` (a list of names, or ``{key: name}``), none in ``reserved``.

    A name that :func:`escape` leaves unchanged keeps it; the others take their escape, or, where
    that is taken, the first free ``<escape>_2``, ``<escape>_3``, ... in the order given
    (``features.3`` beside a module named ``features_3``: ``features_3_2``). Deterministic.

    >>> identifiers(["features.3", "features_3", "0.0"])
    {'features.3': 'features_3_2', 'features_3': 'features_3', '0.0': 'n0_0'}
    """
    texts = dict(names) if isinstance(names, dict) else {n: n for n in names}
    taken = set(reserved)
    out = {k: escape(t, lower) for k, t in texts.items()}
    plain = set()
    for k, t in texts.items():
        if out[k] == t and t not in taken:
            plain.add(k)
            taken.add(t)
    for k in texts:
        if k in plain:
            continue
        base = cand = out[k]
        i = 1
        while cand in taken:
            i += 1
            cand = f"{base}_{i}"
        out[k] = cand
        taken.add(cand)
    return out
