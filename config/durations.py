"""Durations as people write them in the config file.

A duration is a float number of seconds in the model.  In TOML it is either a
bare non-negative number of seconds (``30``, ``1.5``, ``"30"``) or a string of
one or more ``<number><unit>`` parts with units from largest to smallest, each
at most once: ``"500ms"``, ``"30s"``, ``"15m"``, ``"8h"``, ``"1h30m"``,
``"2d"``.  The units are ``d`` (days), ``h``, ``m``, ``s`` and ``ms``.  The
format follows Go's ``time.ParseDuration``, which ghostunnel's flags use, minus
signs and microseconds.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration", "format_duration"]

# Largest first: the order parts must appear in and the order format_duration
# writes them in.
_UNITS: tuple[tuple[str, float], ...] = (
    ("d", 86400.0),
    ("h", 3600.0),
    ("m", 60.0),
    ("s", 1.0),
    ("ms", 0.001),
)
_UNIT_SECONDS = dict(_UNITS)
_UNIT_RANK = {unit: rank for rank, (unit, _) in enumerate(_UNITS)}

# "ms" before the one-letter units so "500ms" is not read as 500 minutes + "s".
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_BARE = re.compile(r"\d+(?:\.\d+)?")

_FORMS = 'use a number of seconds or a number followed by ms, s, m, h or d, like "30s", "15m", "8h" or "1h30m"'


def parse_duration(text: str | int | float) -> float:
    """Turn a config duration into seconds.

    Args:
        text: ``"30s"``, ``"15m"``, ``"8h"``, ``"1h30m"``, ``"500ms"``, a
            numeric string such as ``"30"``, or a non-negative int or float
            meaning seconds.  Surrounding whitespace in strings is ignored.

    Returns:
        The duration in seconds (a finite float, never negative).

    Raises:
        ValueError: the value is negative, not finite, a bool, or not one of
            the forms above.  The message quotes the value and shows the
            accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {str(text).lower()}: {_FORMS}")
    if isinstance(text, int | float):
        seconds = float(text)
        if not math.isfinite(seconds):
            raise ValueError(f"invalid duration {text!r}: durations must be finite")
        if seconds < 0:
            raise ValueError(f"invalid duration {text!r}: durations cannot be negative")
        return seconds
    if not isinstance(text, str):
        raise ValueError(f"invalid duration of type {type(text).__name__}: {_FORMS}")

    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: durations cannot be negative")
    if _BARE.fullmatch(stripped):
        return float(stripped)

    total = 0.0
    position = 0
    last_rank = -1
    for match in _PART.finditer(stripped):
        if match.start() != position:
            break
        number, unit = match.groups()
        rank = _UNIT_RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {text!r}: write each unit once, from largest to "
                'smallest, like "1h30m"'
            )
        last_rank = rank
        total += float(number) * _UNIT_SECONDS[unit]
        position = match.end()
    if position == 0 or position != len(stripped):
        raise ValueError(f"invalid duration {text!r}: {_FORMS}")
    if not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r}: durations must be finite")
    return total


def format_duration(seconds: float) -> str:
    """Write seconds in the shortest config form.

    ``parse_duration(format_duration(x))`` gives back ``x`` to the microsecond.

    Args:
        seconds: A finite, non-negative number of seconds.

    Returns:
        For example ``"15m"`` for 900, ``"1h30m"`` for 5400, ``"500ms"`` for
        0.5 and ``"0s"`` for 0.

    Raises:
        ValueError: ``seconds`` is negative, not finite, or not a number.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"format_duration needs a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"format_duration needs a finite, non-negative number of seconds, got {seconds!r}"
        )
    # Work in whole microseconds so 0.1 + 0.2 style float noise never shows.
    micros = round(seconds * 1_000_000)
    if micros == 0:
        return "0s"
    parts: list[str] = []
    for unit, unit_seconds in _UNITS[:-1]:
        unit_micros = round(unit_seconds * 1_000_000)
        count, micros = divmod(micros, unit_micros)
        if count:
            parts.append(f"{count}{unit}")
    if micros:
        whole_ms, frac_us = divmod(micros, 1000)
        parts.append(f"{whole_ms}.{frac_us:03d}".rstrip("0").rstrip(".") + "ms")
    return "".join(parts)
