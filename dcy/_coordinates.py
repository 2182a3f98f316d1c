"""Distance between datacenters, estimated from Consul's Vivaldi network coordinates.

Consul gives every server a WAN coordinate (``GET /v1/coordinate/datacenters``). The estimated
round trip time between two coordinates is the euclidean distance of their vectors plus both
heights, then plus both adjustments unless that would make it non-positive; see "Working with
coordinates" in https://developer.hashicorp.com/consul/docs/architecture/coordinates. The
distance to a datacenter is the median over every pair of (local server, remote server), the
way Consul's own ``/v1/catalog/datacenters`` sorts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Coordinate:
    """One node's network coordinate; every length is in seconds."""

    vec: tuple[float, ...]
    height: float = 0.0
    adjustment: float = 0.0

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> Coordinate:
        return cls(
            vec=tuple(float(x) for x in raw.get("Vec") or ()),
            height=float(raw.get("Height") or 0.0),
            adjustment=float(raw.get("Adjustment") or 0.0),
        )


def rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated round trip time in seconds; infinite when the dimensions differ (Consul
    refuses to compare those)."""
    if len(a.vec) != len(b.vec):
        return math.inf
    distance = math.dist(a.vec, b.vec) + a.height + b.height
    adjusted = distance + a.adjustment + b.adjustment
    # The adjustments may only correct an estimate, never make it zero or negative.
    return adjusted if adjusted > 0 else distance


def coordinates_by_datacenter(body: Iterable[Mapping[str, Any]]) -> dict[str, list[Coordinate]]:
    """Decode ``/v1/coordinate/datacenters``: datacenter → its servers' coordinates."""
    found: dict[str, list[Coordinate]] = {}
    for area in body or ():
        coords = found.setdefault(str(area.get("Datacenter") or ""), [])
        for entry in area.get("Coordinates") or ():
            if entry.get("Coord"):
                coords.append(Coordinate.from_api(entry["Coord"]))
    return found


def median_rtt(local: Sequence[Coordinate], remote: Sequence[Coordinate]) -> float:
    """Median estimated RTT between two groups of servers; infinite when either is empty."""
    pairs = [rtt(a, b) for a in local for b in remote]
    return statistics.median(pairs) if pairs else math.inf


def datacenters_by_distance(
    local: str, known: Sequence[str], coordinates: Mapping[str, Sequence[Coordinate]]
) -> tuple[str, ...]:
    """Every datacenter of ``known`` except ``local``, nearest first.

    Datacenters without coordinates come last, in the order of ``known`` (Consul's catalog
    order, itself by distance); equal distances keep that order too."""
    origin = coordinates.get(local, ())
    position = {dc: i for i, dc in enumerate(known)}
    others = [dc for dc in known if dc != local]
    return tuple(
        sorted(others, key=lambda dc: (median_rtt(origin, coordinates.get(dc, ())), position[dc]))
    )
