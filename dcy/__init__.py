"""dcy: service discovery for Python services, on HashiCorp Consul: asyncio first
(``Dcy``), and blocking code through ``SyncDcy`` (the same engine on a thread of its own).

Long-lived blocking-query watches shared per query, resolution by name (HTTP API and Consul
DNS), self-registration that survives agent restarts, leader election. Everything public is
listed in ``__all__``; modules starting with an underscore are private. ``import dcy`` loads
only what the client needs: dnspython when the DNS resolver is first used, and the programs
(dcy-template, dcy-register, dcy-alert) only when run.
"""

import importlib
from typing import TYPE_CHECKING, Any

from dcy._backoff import Backoff, Retry, is_transient, retrying
from dcy._config import ConsulConfig
from dcy._consul import AgentInfo
from dcy._dcy import Dcy
from dcy._errors import (
    AclDenied,
    AllInstancesFailed,
    CheckCritical,
    ConsulError,
    ConsulUnavailable,
    DcyError,
    InvalidName,
    LookupFailed,
    NoHealthyInstances,
    ServiceNotFound,
    SessionInvalid,
    TlsError,
    UnknownCheck,
    UnknownService,
)
from dcy._query import Check, Instance, ServiceQuery
from dcy._resolve import Datacenters, Lookup, Strategy
from dcy._watch import Callback, Snapshot, Subscription, WatchOptions

if TYPE_CHECKING:
    from dcy._dns import DnsResolver, DnsTarget
    from dcy._health_events import HealthWatch, Transition, TransitionCallback
    from dcy._http import HttpClient
    from dcy._http_balancing import Strategy as HttpStrategy
    from dcy._http_retry import RetriedStatus
    from dcy._httpx import AsyncHttpxTransport, HttpxTransport
    from dcy._kv import KeyValueStore
    from dcy._kv_specs import KeyValue
    from dcy._leader import Leadership, OnLost
    from dcy._register import HttpCheck, Registration, TcpCheck, TtlCheck
    from dcy._requests import RequestsAdapter
    from dcy._sync import SyncDcy, SyncHandle, SyncKeyValueStore, SyncLeadership

# Loaded on first use: a service that never elects a leader or calls by name does not pay
# for importing how (dnspython alone costs as much as the rest of dcy).
_LAZY = {
    "DnsResolver": ("dcy._dns", "DnsResolver"),
    "DnsTarget": ("dcy._dns", "DnsTarget"),
    "HealthWatch": ("dcy._health_events", "HealthWatch"),
    "Transition": ("dcy._health_events", "Transition"),
    "TransitionCallback": ("dcy._health_events", "TransitionCallback"),
    "HttpClient": ("dcy._http", "HttpClient"),
    "HttpStrategy": ("dcy._http_balancing", "Strategy"),
    "RetriedStatus": ("dcy._http_retry", "RetriedStatus"),
    "HttpxTransport": ("dcy._httpx", "HttpxTransport"),
    "AsyncHttpxTransport": ("dcy._httpx", "AsyncHttpxTransport"),
    "RequestsAdapter": ("dcy._requests", "RequestsAdapter"),
    "SyncDcy": ("dcy._sync", "SyncDcy"),
    "SyncHandle": ("dcy._sync", "SyncHandle"),
    "SyncKeyValueStore": ("dcy._sync", "SyncKeyValueStore"),
    "SyncLeadership": ("dcy._sync", "SyncLeadership"),
    "KeyValueStore": ("dcy._kv", "KeyValueStore"),
    "Leadership": ("dcy._leader", "Leadership"),
    "OnLost": ("dcy._leader", "OnLost"),
    "HttpCheck": ("dcy._register", "HttpCheck"),
    "Registration": ("dcy._register", "Registration"),
    "TcpCheck": ("dcy._register", "TcpCheck"),
    "TtlCheck": ("dcy._register", "TtlCheck"),
    "KeyValue": ("dcy._kv_specs", "KeyValue"),
}

__version__ = "0.2.0"

__all__ = [
    "AclDenied",
    "AgentInfo",
    "AllInstancesFailed",
    "AsyncHttpxTransport",
    "Backoff",
    "Callback",
    "Check",
    "CheckCritical",
    "ConsulConfig",
    "ConsulError",
    "ConsulUnavailable",
    "Datacenters",
    "Dcy",
    "DcyError",
    "DnsResolver",
    "DnsTarget",
    "HealthWatch",
    "HttpCheck",
    "HttpClient",
    "HttpStrategy",
    "HttpxTransport",
    "Instance",
    "InvalidName",
    "KeyValue",
    "KeyValueStore",
    "Leadership",
    "Lookup",
    "LookupFailed",
    "NoHealthyInstances",
    "OnLost",
    "Registration",
    "RequestsAdapter",
    "RetriedStatus",
    "Retry",
    "ServiceNotFound",
    "ServiceQuery",
    "SessionInvalid",
    "Snapshot",
    "Strategy",
    "Subscription",
    "SyncDcy",
    "SyncHandle",
    "SyncKeyValueStore",
    "SyncLeadership",
    "TcpCheck",
    "TlsError",
    "Transition",
    "TransitionCallback",
    "TtlCheck",
    "UnknownCheck",
    "UnknownService",
    "WatchOptions",
    "__version__",
    "is_transient",
    "retrying",
]


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'dcy' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value
