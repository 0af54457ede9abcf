"""How a setting's value is checked (a :class:`Rule`), and the rules the settings use: integers,
seconds, flags, text, names, choices, and amounts with units (sizes, rates) read by one parser.

A rule's check names what the caller typed (a vLLM key, a Python keyword) in its ConfigError,
with the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from netloader.errors import ConfigError, check_seconds


@dataclass(frozen=True)
class Rule:
    """How a value is checked: ``check(name, value)`` returns the value to keep (converted,
    e.g. ``"4MiB"`` -> 4194304) or raises ConfigError naming ``name``; ``decode(name, text)``
    turns command-line text into what ``check`` takes; ``show(value)`` writes a default for
    help; ``example`` is a valid command-line value (used by the tests); ``metavar`` names the
    value in ``--help``."""

    check: Callable[[str, Any], Any]
    decode: Callable[[str, str], Any] = lambda name, text: text
    show: Callable[[Any], str] = str
    example: str = "x"
    metavar: str | None = None


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An int (not a bool), in ``low..high`` where given."""
    if low is not None and high is not None:
        allowed = f"an integer in {low}..{high}"
    elif low is not None:
        allowed = f"an integer >= {low}"
    else:
        allowed = "an integer"

    def check(name: str, value: Any) -> int:
        if (
            type(value) is not int
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            raise ConfigError(f"{name} must be {allowed}, got {value!r}")
        return value

    return Rule(check, _decoded(int), example=str(2 if low is None else low + 1), metavar="N")


def _seconds(name: str, value: Any) -> float:
    check_seconds(**{name: value})
    return value


def _decoded(kind: Callable[[str], Any]) -> Callable[[str, str], Any]:
    """Command-line text as ``kind``, or left as text for the check to refuse with its rule."""

    def decode(name: str, text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text

    return decode


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _names(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _split_names(text: str) -> list[str]:
    """``"a,b"`` as typed on a command line (a vLLM key takes a JSON list)."""
    return [part.strip() for part in text.split(",")]


SECONDS = Rule(_seconds, _decoded(float), lambda s: f"{s:g}", "2.5", "SECONDS")
FLAG = Rule(_flag)
TEXT = Rule(_text)
NAMES = Rule(_names, lambda name, text: _split_names(text), metavar="A,B")


def optional(rule: Rule) -> Rule:
    """``rule``, or None (the setting's default meaning, see ``Setting.unset``)."""
    return dataclasses.replace(
        rule, check=lambda name, value: None if value is None else rule.check(name, value)
    )


def choice(options: tuple[str, ...]) -> Rule:
    """One of ``options``, case-insensitive; kept in lower case."""

    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ConfigError(f"{name} = {value!r} is not allowed; use one of {', '.join(options)}")
        return value.lower()

    return Rule(check, example=options[0])


# Amounts with units: one table and one parser for sizes and rates.

_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_BYTE_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 10**3 / 8, "mbit": 10**6 / 8, "gbit": 10**9 / 8}


def _amount(text: str, units: Mapping[str, float]) -> float | None:
    """``"1.5GiB"`` -> its value in the units' base (a bare number is in the base), or None."""
    lowered = text.strip().lower()
    unit = next((u for u in sorted(units, key=len, reverse=True) if lowered.endswith(u)), "")
    try:
        value = float(lowered.removesuffix(unit)) * units.get(unit, 1)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_rate(value: object, name: str = "rate") -> float:
    """Bytes per second from a number (bytes/s) or a string such as ``100MB/s``, ``800Mbit``,
    ``1.5GiB/s``. ConfigError names the bad value and what is allowed."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate: float | None = float(value)
    elif isinstance(value, str):
        rate = _amount(value.strip().lower().removesuffix("/s"), _BYTE_UNITS | _BIT_UNITS)
    else:
        rate = None
    if rate is None or not 0 < rate < math.inf:
        raise ConfigError(
            f"{name} = {value!r} is not a rate; give bytes per second as a number, or a string "
            f"like 100MB/s, 800Mbit/s or 1GiB/s (units: {', '.join(_BYTE_UNITS | _BIT_UNITS)})"
        )
    return rate


def parse_size(value: object, name: str = "size") -> int:
    """A byte count from an int or a string such as ``4MiB``, ``1.5GB`` or ``65536``."""
    amount = _amount(value, _BYTE_UNITS) if isinstance(value, str) else None
    if type(value) is int:
        amount = value
    if amount is None or amount < 0:
        raise ConfigError(
            f"{name} = {value!r} is not a size; give a number of bytes or a string like 4MiB "
            f"or 1.5GB (units: {', '.join(_BYTE_UNITS)})"
        )
    return int(amount)


def show_size(n: int) -> str:
    """4194304 -> ``4MiB``: the largest binary unit that divides ``n``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def size(low: int, high: int | None = None) -> Rule:
    """A byte count (an int, or a string like ``4MiB``) of at least ``low``, at most ``high``."""
    bound = f"{show_size(low)}..{show_size(high)}" if high else f">= {show_size(low)}"
    exact = f" ({low}..{high})" if high else ""

    def check(name: str, value: Any) -> int:
        n = parse_size(value, name)
        if n < low or (high is not None and n > high):
            raise ConfigError(f"{name} = {value!r} is outside {bound}{exact} bytes")
        return n

    return Rule(check, lambda name, text: parse_size(text, name), show_size, "1MiB", "SIZE")


# Units are read on the command line already, so that a bad one is named by its flag.
RATE = Rule(
    lambda name, value: parse_rate(value, name),
    lambda name, text: parse_rate(text, name),
    example="100MB/s",
    metavar="RATE",
)
