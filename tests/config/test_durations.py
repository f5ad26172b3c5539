"""Durations: the forms people write and the shortest form we print."""

from __future__ import annotations

import math

import pytest

from config import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("15m", 900.0),
        ("8h", 28800.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1m30s500ms", 90.5),
        ("1.5h", 5400.0),
        ("0.25s", 0.25),
        ("0", 0.0),
        ("0s", 0.0),
        ("30", 30.0),
        ("2.5", 2.5),
        (" 5s ", 5.0),
        (30, 30.0),
        (0, 0.0),
        (1.5, 1.5),
    ],
)
def test_parse_good_forms(text: str | int | float, seconds: float) -> None:
    result = parse_duration(text)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "s",
        "5x",
        "5 min",
        "5S",
        "1h 30m",
        "1e3",
        "inf",
        "nan",
        ".5s",
        "5.s",
        "h5",
        "30s5",
    ],
)
def test_parse_rejects_malformed_strings_and_shows_the_forms(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert '"30s", "15m", "8h" or "1h30m"' in message


@pytest.mark.parametrize("text", ["30m1h", "1h1h", "5s5m", "500ms1s"])
def test_parse_rejects_units_out_of_order_or_repeated(text: str) -> None:
    with pytest.raises(ValueError, match="from largest to smallest"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-5, -0.5, "-5s", "-5"])
def test_parse_rejects_negative(value: str | int | float) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_parse_rejects_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False, None, [30], {"s": 30}])
def test_parse_rejects_other_types(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1, "1s"),
        (30, "30s"),
        (90.5, "1m30s500ms"),
        (900, "15m"),
        (5400, "1h30m"),
        (28800, "8h"),
        (86400, "1d"),
        (93784.005, "1d2h3m4s5ms"),
        (0.0005, "0.5ms"),
        (0.1 + 0.2, "300ms"),
    ],
)
def test_format_shortest_form(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.25, 2.0, 59.999, 61.5, 3599.0, 12345.678, 1e6])
def test_format_then_parse_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("value", [-1, math.inf, math.nan, True, "5s"])
def test_format_rejects_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(ValueError, match="format_duration needs"):
        format_duration(value)  # type: ignore[arg-type]
