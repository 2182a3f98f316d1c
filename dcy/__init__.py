"""dcy: service discovery for asyncio Python services, on HashiCorp Consul.

Long-lived blocking-query watches shared per query, resolution by name (HTTP API and Consul
DNS), self-registration that survives agent restarts. Everything public is listed in
``__all__``; modules starting with an underscore are private.
"""

from dcy._config import ConsulConfig
from dcy._consul import AgentInfo, ConsulAPI, HttpConsul, QueryResult
from dcy._dcy import Dcy
from dcy._dns import DnsResolver, DnsTarget
from dcy._errors import (
    AclDenied,
    AllInstancesFailed,
    ConsulError,
    ConsulUnavailable,
    DcyError,
    InvalidName,
    LookupFailed,
    NoHealthyInstances,
    ServiceNotFound,
    TlsError,
)
from dcy._health_events import HealthWatch, Transition
from dcy._http import HttpClient
from dcy._kv import KeyValueStore
from dcy._leader import Leadership
from dcy._query import Check, Instance, ServiceQuery
from dcy._register import HttpCheck, Registration, TcpCheck, TtlCheck
from dcy._resolve import Lookup
from dcy._specs import KeyValue
from dcy._watch import Snapshot, Subscription, WatchOptions

__all__ = [
    "AclDenied",
    "AgentInfo",
    "AllInstancesFailed",
    "Check",
    "ConsulAPI",
    "ConsulConfig",
    "ConsulError",
    "ConsulUnavailable",
    "Dcy",
    "DcyError",
    "DnsResolver",
    "DnsTarget",
    "HealthWatch",
    "HttpCheck",
    "HttpClient",
    "HttpConsul",
    "Instance",
    "InvalidName",
    "KeyValue",
    "KeyValueStore",
    "Leadership",
    "Lookup",
    "LookupFailed",
    "NoHealthyInstances",
    "QueryResult",
    "Registration",
    "ServiceNotFound",
    "ServiceQuery",
    "Snapshot",
    "Subscription",
    "TcpCheck",
    "TlsError",
    "Transition",
    "TtlCheck",
    "WatchOptions",
]
