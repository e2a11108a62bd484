"""Byte sizes as people write them, and back.

``parse_size`` reads the sizes users type on a command line or in a profile file:

* a bare integer is a number of bytes: ``"123456"``;
* decimal units are powers of 1000: ``B``, ``KB``, ``MB``, ``GB``, ``TB``, ``PB``;
* binary units are powers of 1024: ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB``;
* case does not matter (``"1.5gb"`` == ``"1.5GB"``), spaces around and before the unit are allowed,
  and the number may have a fractional part (``"1.5GB"`` is 1 500 000 000 bytes; a fraction of a
  byte left over is dropped).

A lone ``K``/``M``/``G``/``T`` is refused: tools disagree on whether ``2G`` means 2·10⁹ or 2·2³⁰
bytes, and for a memory budget the difference (7 %) matters. ``format_bytes`` writes binary units.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from edge_sdk._errors import ConfigError

__all__ = ["format_bytes", "parse_size", "size_argument"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_AMBIGUOUS = {"k", "m", "g", "t", "p"}
_SIZE_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_FORMAT_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str) -> int:
    """Return the number of bytes ``text`` names; raise :class:`ConfigError` naming ``text`` if malformed."""
    if not isinstance(text, str):
        raise ConfigError(f"a size must be text such as '1.5GB' or '512MiB', not {type(text).__name__}")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(
            f"malformed size {text!r}: expected a non-negative number with an optional unit "
            "(B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB), e.g. '1.5GB' or '512MiB'"
        )
    unit = match.group("unit").lower()
    if unit in _AMBIGUOUS:
        raise ConfigError(
            f"ambiguous unit in size {text!r}: write {unit.upper()}B for powers of 1000 "
            f"or {unit.upper()}iB for powers of 1024"
        )
    if unit not in _UNITS:
        raise ConfigError(
            f"unknown unit {match.group('unit')!r} in size {text!r}: "
            "use B, KB, MB, GB, TB, PB (powers of 1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024)"
        )
    try:
        number = Decimal(match.group("number"))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ConfigError(f"malformed number in size {text!r}") from exc
    multiplier = _UNITS[unit]
    if multiplier == 1 and number != number.to_integral_value():
        raise ConfigError(f"size {text!r} is a fraction of a byte: give whole bytes or a larger unit")
    return int(number * multiplier)


def format_bytes(n: int) -> str:
    """Human form of ``n`` bytes in binary units: ``"512 B"``, ``"1.50 GiB"``, ``"293.81 MiB"``.

    Exact integer arithmetic (hundredths of the unit, ties to even as ``f"{x:.2f}"`` rounds), so any
    int works, even one no float can hold (``10**400`` bytes is a very large number of PiB).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_bytes takes an int number of bytes, not {type(n).__name__}")
    sign = "-" if n < 0 else ""
    size = abs(n)
    if size < 1024:
        return f"{sign}{size} B"
    for power, unit in enumerate(_FORMAT_UNITS, start=1):
        scale = 1024**power
        hundredths, rest = divmod(size * 100, scale)
        if 2 * rest > scale or (2 * rest == scale and hundredths % 2):
            hundredths += 1
        if hundredths < 1024_00 or unit == _FORMAT_UNITS[-1]:  # 1023.996 would print as "1024.00"
            return f"{sign}{hundredths // 100}.{hundredths % 100:02d} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def size_argument(text: str) -> int:
    """argparse ``type=`` for sizes: a malformed size becomes argparse's usage error with our message."""
    import argparse

    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
