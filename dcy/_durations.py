"""Go-style durations ("250ms", "5s", "1m30s"), as consul-template's users write them."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float | int, *, what: str = "duration") -> float:
    """Seconds in ``value``: a Go duration string, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid {what} {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid {what} {value!r}: must not be negative")
        return float(value)
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    position, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"invalid {what} {value!r}: use e.g. 500ms, 5s, 1m30s")
    return total


def parse_wait(value: str) -> tuple[float, float]:
    """``-wait min[:max]``; max defaults to 4 × min, as in consul-template."""
    low, _, high = value.partition(":")
    minimum = parse_duration(low, what="wait")
    maximum = parse_duration(high, what="wait") if high else minimum * 4
    if maximum < minimum:
        raise ValueError(f"invalid wait {value!r}: max is below min")
    return minimum, maximum
