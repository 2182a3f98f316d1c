"""Service names and queries, parsed once, and the records they resolve to.

A query names a service in one of these forms (``D`` is the agent's DNS domain, ``sd`` here):

    worker                          the service in the local datacenter
    v2.worker@dc2|passing,warning   consul-template's form: [tag.]name[@dc][|states]
    worker.service.sd               Consul DNS: [tag.]name.service[.dc].D
    v2.worker.service.dc2.sd
    _worker._v2.service.sd          RFC 2782 SRV form (``_tcp`` means no tag)

States are ``passing`` (the default), ``warning``, ``critical``, ``maintenance`` or ``any``.

A name is parsed here once; everything after works on the :class:`ServiceQuery`: its watch
(``HealthServiceSpec.of(query)``), its health filter (:meth:`ServiceQuery.admits`), its DNS
name. This module also holds the one rule for which text is in DNS form
(:meth:`ServiceQuery.parse_dns`) and for which names can be registered
(:func:`is_registrable_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal

from dcy._errors import InvalidName

Status = Literal["passing", "warning", "critical", "maintenance"]
STATES: frozenset[str] = frozenset({"passing", "warning", "critical", "maintenance"})
PASSING_ONLY: frozenset[str] = frozenset({"passing"})

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_\-]*"
_TAG = r"[A-Za-z0-9_=:\-./]+"
_DC = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_TEMPLATE_FORM = re.compile(
    rf"^(?:(?P<tag>{_TAG})\.)?(?P<name>{_NAME})(?:@(?P<dc>{_DC}))?(?:\|(?P<states>[a-z,\s]*))?$"
)
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_\-]*)$")
# A name Consul's DNS interface can answer for: a DNS label of at most 63 characters.
_REGISTRABLE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class ServiceQuery:
    """A parsed query: which service, which tag and datacenter, which health states."""

    name: str
    tag: str | None = None
    datacenter: str | None = None
    states: frozenset[str] = PASSING_ONLY

    @classmethod
    def parse(cls, text: str, *, domain: str = "sd") -> ServiceQuery:
        """Parse any of the forms in this module's docstring; raise InvalidName otherwise."""
        # Checked before the cache: an unhashable argument would raise TypeError there.
        if not isinstance(text, str):
            raise InvalidName(f"a service name must be a string, not {type(text).__name__}")
        return _parse_cached(text, domain)

    @classmethod
    def parse_dns(cls, text: str, *, domain: str = "sd") -> ServiceQuery | None:
        """The query of ``[tag.]name.service[.dc].<domain>`` (or the SRV form); None when
        ``text`` is not in DNS form at all; InvalidName when it is, but malformed."""
        return _parse_dns_form(text.strip(), domain)

    def admits(self, status: str) -> bool:
        """Whether an instance in ``status`` matches this query's health states: the one
        filter behind lookups, picks, HTTP by name and templates."""
        return status in self.states

    def with_states(self, states: str) -> ServiceQuery:
        """This query with its states replaced by ``states`` (``"passing,warning"``,
        ``"any"``): consul-template's second argument to ``service``."""
        return replace(self, states=_parse_states(states, f"{self}|{states}"))

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text = f"{self.tag}.{text}"
        if self.datacenter:
            text = f"{text}@{self.datacenter}"
        if self.states != PASSING_ONLY:
            text += "|" + ("any" if self.states == STATES else ",".join(sorted(self.states)))
        return text


@lru_cache(maxsize=4096)
def _parse_cached(text: str, domain: str) -> ServiceQuery:
    stripped = text.strip()
    if not stripped:
        raise InvalidName("empty service name")
    dns = _parse_dns_form(stripped, domain)
    if dns is not None:
        return dns
    match = _TEMPLATE_FORM.match(stripped)
    if match is None:
        raise InvalidName(
            f"malformed service query {text!r}: expected [tag.]name[@dc][|states] "
            f"or [tag.]name.service[.dc].{domain}"
        )
    states = _parse_states(match.group("states"), text)
    return ServiceQuery(match.group("name"), match.group("tag"), match.group("dc"), states)


def _parse_states(raw: str | None, text: str) -> frozenset[str]:
    if raw is None:
        return PASSING_ONLY
    words = [w.strip() for w in raw.split(",") if w.strip()]
    if not words:
        raise InvalidName(f"malformed service query {text!r}: empty health state list after '|'")
    if "any" in words:
        if len(words) > 1:
            raise InvalidName(f"malformed service query {text!r}: 'any' cannot be combined")
        return STATES
    unknown = [w for w in words if w not in STATES]
    if unknown:
        raise InvalidName(
            f"malformed service query {text!r}: unknown health state {unknown[0]!r} "
            f"(use {', '.join(sorted(STATES))} or any)"
        )
    return frozenset(words)


def _parse_dns_form(text: str, domain: str) -> ServiceQuery | None:
    """Parse ``[tag.]name.service[.dc].<domain>``; None when ``text`` is not in that form."""
    name = text[:-1] if text.endswith(".") else text
    suffix = "." + domain.strip(".")
    if not name.lower().endswith(suffix.lower()):
        return None
    labels = name[: -len(suffix)].split(".")
    if "service" not in labels:
        return None
    at = len(labels) - 1 - labels[::-1].index("service")
    before, after = labels[:at], labels[at + 1 :]
    labels_ok = all(map(_DNS_LABEL.fullmatch, before + after))
    if len(after) > 1 or not 1 <= len(before) <= 2 or not labels_ok:
        raise InvalidName(
            f"malformed DNS service name {text!r}: expected [tag.]name.service[.dc]{suffix}"
        )
    datacenter = after[0] if after else None
    if len(before) == 2 and before[0].startswith("_") and before[1].startswith("_"):
        # RFC 2782: _service._tag, where the protocol label _tcp/_udp means "no tag".
        service, protocol_or_tag = before[0][1:], before[1][1:]
        srv_tag = None if protocol_or_tag in ("tcp", "udp") else protocol_or_tag
        return ServiceQuery(service, srv_tag, datacenter)
    return ServiceQuery(before[-1], before[0] if len(before) == 2 else None, datacenter)


def is_registrable_name(name: str) -> bool:
    """Whether ``name`` can be a service's name: a DNS label, so ``<name>.service.sd``
    resolves (and so a URL's host can name it)."""
    # fullmatch: "$" would also match before a trailing newline.
    return _REGISTRABLE.fullmatch(name) is not None


def validate_service_name(name: str) -> str:
    """A name to register: a DNS label, so ``<name>.service.sd`` resolves."""
    if not isinstance(name, str) or not is_registrable_name(name):
        raise InvalidName(
            f"invalid service name {name!r}: use 1-63 letters, digits and dashes, "
            "not starting or ending with a dash (it must work as a DNS label)"
        )
    return name


@dataclass(frozen=True, slots=True)
class Check:
    """One health check of a node or service instance, as Consul reports it."""

    check_id: str
    name: str
    status: str
    node: str
    service_id: str = ""
    service_name: str = ""
    output: str = ""
    notes: str = ""

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> Check:
        return cls(
            check_id=raw.get("CheckID") or "",
            name=raw.get("Name") or "",
            status=raw.get("Status") or "critical",
            node=raw.get("Node") or "",
            service_id=raw.get("ServiceID") or "",
            service_name=raw.get("ServiceName") or "",
            output=raw.get("Output") or "",
            notes=raw.get("Notes") or "",
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of a service, from one health query entry. Immutable."""

    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    node: str
    node_address: str
    datacenter: str
    status: Status
    checks: tuple[Check, ...] = field(default=(), compare=True)

    def __hash__(self) -> int:
        # meta is a read-only mapping, which does not hash; identity is enough here.
        return hash((self.id, self.node, self.datacenter, self.port))

    @property
    def hostport(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @classmethod
    def from_health_entry(cls, entry: Mapping[str, Any]) -> Instance:
        node = entry.get("Node") or {}
        service = entry.get("Service") or {}
        checks = tuple(Check.from_api(c) for c in entry.get("Checks") or ())
        node_address = node.get("Address") or ""
        return cls(
            id=service.get("ID") or "",
            name=service.get("Service") or "",
            # Consul's rule: the service address when set, else the node's.
            address=service.get("Address") or node_address,
            port=int(service.get("Port") or 0),
            tags=tuple(service.get("Tags") or ()),
            meta=MappingProxyType(dict(service.get("Meta") or {})),
            node=node.get("Node") or "",
            node_address=node_address,
            datacenter=node.get("Datacenter") or "",
            status=aggregate_status(checks),
            checks=checks,
        )


def aggregate_status(checks: Iterable[Check]) -> Status:
    """One status for an instance: maintenance, else the worst of its checks."""
    worst: Status = "passing"
    for check in checks:
        if check.check_id == "_node_maintenance" or check.check_id.startswith(
            "_service_maintenance:"
        ):
            return "maintenance"
        if check.status == "critical":
            worst = "critical"
        elif check.status == "warning" and worst == "passing":
            worst = "warning"
    return worst
