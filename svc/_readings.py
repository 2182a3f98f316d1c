"""The data the three services exchange, validated at every boundary.

A reading is ``{"id": str, "ts": float, "values": [int, int, int]}``; a result adds
``"squares"`` and the worker that computed it. Anything else is refused with a reason before
it is forwarded anywhere.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

VALUES_PER_READING = 3
# One encoder for every message: json.dumps with separators builds a new one per call, a
# measurable share of a reading's CPU at thousands of readings a second.
compact_json = json.JSONEncoder(separators=(",", ":")).encode


class BadReading(ValueError):
    """A reading or result that does not have the expected shape; the message says why."""


@dataclass(frozen=True, slots=True)
class Reading:
    id: str
    ts: float
    values: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "values": list(self.values)}

    def encode(self) -> bytes:
        return compact_json(self.as_json()).encode()


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    ts: float
    values: tuple[int, ...]
    squares: tuple[int, ...]
    worker: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "values": list(self.values),
            "squares": list(self.squares),
            "worker": self.worker,
        }

    def encode(self) -> bytes:
        return compact_json(self.as_json()).encode()


class ReadingSource:
    """Makes readings with ids unique across instances and restarts: a random boot nonce
    per process plus a counter."""

    def __init__(self, instance: str) -> None:
        self._prefix = f"{instance}-{os.getpid()}-{secrets.token_hex(4)}"
        self._counter = itertools.count(1)

    def next(self) -> Reading:
        values = tuple(random.randint(0, 1000) for _ in range(VALUES_PER_READING))
        return Reading(f"{self._prefix}-{next(self._counter)}", time.time(), values)


def square(reading: Reading, worker: str) -> Result:
    """The worker's "heavy computation"."""
    return Result(
        reading.id, reading.ts, reading.values, tuple(v * v for v in reading.values), worker
    )


def parse_reading(data: Any) -> Reading:
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadReading(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadReading("a reading must be a JSON object")
    reading_id, ts, values = data.get("id"), data.get("ts"), data.get("values")
    if not isinstance(reading_id, str) or not reading_id or len(reading_id) > 200:
        raise BadReading("id must be a non-empty string")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise BadReading("ts must be a number (seconds since the epoch)")
    if (
        not isinstance(values, list)
        or len(values) != VALUES_PER_READING
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise BadReading(f"values must be a list of {VALUES_PER_READING} integers")
    if any(abs(v) > 10**9 for v in values):
        raise BadReading("values must be within ±1e9")
    return Reading(reading_id, float(ts), tuple(values))


def parse_result(data: Any) -> Result:
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadReading(f"not JSON: {exc}") from exc
    reading = parse_reading(data)
    squares, worker = data.get("squares"), data.get("worker")
    if (
        not isinstance(squares, list)
        or len(squares) != VALUES_PER_READING
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in squares)
    ):
        raise BadReading(f"squares must be a list of {VALUES_PER_READING} integers")
    if not isinstance(worker, str):
        raise BadReading("worker must be a string")
    return Result(reading.id, reading.ts, reading.values, tuple(squares), worker)
