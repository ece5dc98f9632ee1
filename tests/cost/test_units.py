from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixprec.cost.units import UNITS, format_size, parse_number, parse_size


@pytest.mark.parametrize("text, expected", [
    ("512", 512), ("512B", 512), ("0", 0), ("32KiB", 32768), ("32 KiB", 32768), ("1.5KiB", 1536),
    ("2kB", 2000), ("2MB", 2_000_000), ("2MiB", 2 * 1024**2), ("1GiB", 1024**3), ("0.5 kB", 500),
    ("1e3", 1000), (" 8KiB ", 8192), (4096, 4096),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("12 KB", "ambiguous"), ("12kb", "ambiguous"), ("1.3B", "whole number"), ("0.1KiB", "whole number"),
    ("12 parsecs", "unknown unit"), ("", "cannot parse"), ("KiB", "cannot parse"), ("-4KiB", "cannot parse"),
    ("1,024", "cannot parse"), (-3, "negative"), (1.5, "string or an int"), (True, "string or an int"),
])
def test_parse_size_bad(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def test_parse_size_error_lists_units():
    with pytest.raises(ValueError, match="kB, MB, GB, KiB, MiB, GiB"):
        parse_size("3 XB")


@given(st.integers(0, 2**40), st.sampled_from(sorted(UNITS)))
def test_parse_size_roundtrip(n, unit):
    assert parse_size(f"{n}{unit}") == n * UNITS[unit]
    assert parse_size(f"{n} {unit}") == n * UNITS[unit]


@given(st.integers(0, 2**40))
def test_parse_size_fraction_roundtrip(n):
    text = format(Decimal(n) / 1024, "f") + "KiB"  # exact: 1024 is a power of two
    assert parse_size(text) == n


def test_parse_number():
    assert parse_number("1e6") == 1e6 and parse_number(" 2500 ") == 2500.0 and parse_number(3) == 3.0
    for bad in ("ten", "nan", "inf", "", True, None):
        with pytest.raises(ValueError):
            parse_number(bad)


def test_format_size():
    assert format_size(100) == "100 B"
    assert format_size(3481) == "3.4 KiB"
    assert format_size(3 * 1024**2) == "3.0 MiB"
    assert format_size(512, "KiB") == "0.5 KiB"
