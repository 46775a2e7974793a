"""Parsing sizes and limits (policies/memory.py)."""

import pytest

from policies.memory import format_gb, parse_limit, parse_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GB", 2 * 10**9),
        ("24 GiB", 24 * 2**30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("1.5 gb", 1_500_000_000),
        (1024, 1024),
        ("1000", 1000),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1GB", "0", 0, "1e9", True, "2 G B"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_limits():
    assert parse_limit("75%", 1000) == 750
    assert parse_limit(" 100 % ", 1000) == 1000
    assert parse_limit("24GB", 1000) == 24 * 10**9
    for bad in ("0%", "101%", "lots", "-5%"):
        with pytest.raises(ValueError, match="memory_limit"):
            parse_limit(bad, 1000)


def test_format_gb():
    assert format_gb(4_200_000_000) == "4.2 GB"
    assert format_gb(1_250_000_000) == "1.2 GB"
