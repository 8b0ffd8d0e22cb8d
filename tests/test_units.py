import pytest
from hypothesis import given
from hypothesis import strategies as st

from autobatch import ConfigError, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("512 mib", 512 * 1024**2),
        ("1.5g", 1_500_000_000),
        ("1024", 1024),
        (4096, 4096),
        (2.5e3, 2500),
        ("3KiB", 3072),
        ("1e3kb", 1_000_000),
    ],
)
def test_parse_bytes_accepts_common_spellings(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "8 GiBs", "-1GiB", "0", 0, -5, float("nan"), float("inf"), True, None, [1]])
def test_parse_bytes_rejects_with_the_option_name(bad):
    with pytest.raises(ConfigError) as excinfo:
        parse_bytes(bad, name="ram_limit")
    assert "ram_limit" in str(excinfo.value)


@given(st.text(max_size=20))
def test_parse_bytes_fuzz_only_raises_config_error(text):
    try:
        value = parse_bytes(text)
    except ConfigError:
        return
    assert isinstance(value, int) and value >= 1


@given(st.integers(min_value=1, max_value=2**50))
def test_format_then_parse_round_trips_within_display_rounding(n):
    # One decimal in the largest unit that is >= 1: at most 5% off.
    assert abs(parse_bytes(format_bytes(n).replace(" ", "")) - n) <= 0.05 * n + 1


def test_format_bytes_units():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_bytes(None) == "-"
