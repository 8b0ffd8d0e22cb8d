"""Byte quantities: parse user input, format for display.

Everything inside autobatch is plain ``int`` bytes; only the display edge turns
them into MiB/GiB.
"""

from __future__ import annotations

import math
import re

from autobatch.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: int | float | str, *, name: str = "value") -> int:
    """Parse a memory size such as ``"8GiB"``, ``"512MB"``, ``"1.5g"`` or ``1073741824``.

    Decimal units (kB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB)
    powers of 1024, as in the IEC convention.

    Args:
        value: bytes as a number, or a number followed by a unit.
        name: the option's name, used in the error message.

    Returns:
        The size in bytes, rounded down.

    Raises:
        ConfigError: the value is negative, zero, not finite, or not understood.
    """
    if isinstance(value, bool):
        raise ConfigError(f"`{name}` must be a size like '8GiB' or a number of bytes. Received: {name}={value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"`{name}` must be a size like '8GiB', '512MB' or a number of bytes. Received: {name}={value!r}"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ConfigError(f"`{name}` must be a size like '8GiB' or a number of bytes. Received: {name}={value!r}")
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"`{name}` must be a positive size. Received: {name}={value!r}")
    result = int(number * _UNITS[unit])
    if result < 1:
        raise ConfigError(f"`{name}` must be at least one byte. Received: {name}={value!r}")
    return result


def format_bytes(n: float | None) -> str:
    """Format bytes in binary units for display, e.g. ``1.5 GiB``."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"
