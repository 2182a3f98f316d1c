"""Consul's answers, classified where they arrive: the one place that reads Consul's words.

Consul tells some refusals apart only by the text of its answer: a 500 says "invalid
session" as well as "No cluster leader", and only the second is an outage worth waiting out.
Each refusal dcy acts on is one :class:`Refusal` in :data:`REFUSALS`, with its status,
Consul 1.14's wording and the error it becomes. The HTTP seam turns every error answer into an
exception through :func:`classify`; ``dcy.testing.FakeConsul`` words its refusals with
:meth:`Refusal.answer` and raises what :func:`classify` makes of them, so both sides of the
seam raise the same errors; ``tests/integration/test_contract.py`` provokes every refusal of
the table on a real agent. Nothing else in dcy looks at the text of an answer.

Everything not in the table is classified by its status alone:

* 401, 403: :class:`AclDenied` (Consul's "Permission denied", "ACL not found");
* 429 (too many connections from one address), 500, 502, 503, 504: :class:`ConsulUnavailable`,
  transient: "No cluster leader" during an election, "rpc error ... connection refused"
  while a server restarts, "No path to datacenter" while a WAN link is down;
* any other status: :class:`ConsulError`.

Reads of lists are not refused but filtered: Consul leaves out what the token may not read
and says so in a header (:data:`FILTERED_BY_ACLS`). A filtered answer with nothing left in it
(no instance of a service the token may not read, no session) is :func:`hidden_by_acls`, an
:class:`AclDenied`; a partly filtered one is an answer, as least privilege intends, and so is
an empty one of a read of everything the token may see (all services, all nodes, every check
in a state): what is left out says nothing about what it asked for. A
recursive KV read of a prefix the token may not read cannot be told from an empty prefix:
Consul answers 404 without the header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dcy._errors import (
    AclDenied,
    CheckCritical,
    ConsulError,
    ConsulUnavailable,
    DcyError,
    SessionInvalid,
    UnknownCheck,
    UnknownService,
)

_FIELD = re.compile(r"\\\{(\w+)\\\}")


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refusal as Consul words it. ``wording`` holds ``{field}`` placeholders for the
    parts that vary; ``core`` is the part of it that identifies the refusal wherever the
    message travelled (a server's RPC error reaches us with a prefix added by the agent)."""

    status: int
    wording: str
    core: str
    error: type[ConsulError]

    def __post_init__(self) -> None:
        if self.core not in self.wording:
            raise ValueError(f"{self.core!r} is not part of {self.wording!r}")

    @property
    def pattern(self) -> re.Pattern[str]:
        """``core`` as a regular expression, each placeholder a group matching anything up
        to the last place the text after it follows (so an ID may hold quotes itself);
        compiled on first use, then cached by ``re``."""
        return re.compile(_FIELD.sub(lambda m: f"(?P<{m.group(1)}>.*)", re.escape(self.core)))

    def answer(self, **fields: str) -> str:
        """The text Consul answers with, placeholders filled: what the fake says."""
        return self.wording.format(**fields)


SESSION_NOT_FOUND = Refusal(
    404, "Session id '{session_id}' not found", "Session id '{session_id}' not found",
    SessionInvalid,
)  # fmt: skip
INVALID_SESSION = Refusal(
    500, 'raft apply failed: invalid session "{session_id}"', 'invalid session "{session_id}"',
    SessionInvalid,
)  # fmt: skip
MISSING_CHECK = Refusal(
    500, "apply failed: Missing check '{check_id}' registration",
    "Missing check '{check_id}' registration", UnknownCheck,
)  # fmt: skip
CHECK_CRITICAL = Refusal(
    500, "apply failed: Check '{check_id}' is in critical state",
    "Check '{check_id}' is in critical state", CheckCritical,
)  # fmt: skip
UNKNOWN_CHECK_ID = Refusal(
    404, 'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.',
    'Unknown check ID "{check_id}"', UnknownCheck,
)  # fmt: skip
UNKNOWN_SERVICE_ID = Refusal(
    404,
    'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service '
    "name.",
    'Unknown service ID "{service_id}"', UnknownService,
)  # fmt: skip
# A 500, but a bad argument, not an outage: retrying cannot make the TTL valid.
INVALID_SESSION_TTL = Refusal(
    500, "Invalid Session TTL '{nanoseconds}', must be between [10s=24h0m0s]",
    "Invalid Session TTL", ConsulError,
)  # fmt: skip

REFUSALS: tuple[Refusal, ...] = (
    SESSION_NOT_FOUND,
    INVALID_SESSION,
    MISSING_CHECK,
    CHECK_CRITICAL,
    UNKNOWN_CHECK_ID,
    UNKNOWN_SERVICE_ID,
    INVALID_SESSION_TTL,
)

# Statuses Consul uses for "not now": overload, elections, servers restarting.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


FILTERED_BY_ACLS = "X-Consul-Results-Filtered-By-ACLs"


def hidden_by_acls(operation: str) -> AclDenied:
    """The error of a read whose every result Consul's ACLs filtered out."""
    return AclDenied(
        f"Consul denied {operation}: the token may read none of the results (filtered by "
        "ACLs: it lacks service:read, node:read or session:read on them)",
        status=200,
        operation=operation,
    )


def classify(status: int, text: str, *, operation: str, address: str) -> DcyError:
    """The error an answer with this status and body means; ``operation`` names the request
    (``"PUT /v1/session/renew/<id>"``) and ``address`` the agent, for the message."""
    detail = text.strip()[:300]
    for refusal in REFUSALS:
        if refusal.status != status:
            continue
        match = refusal.pattern.search(detail)
        if match is not None:
            return refusal.error(
                f"Consul refused {operation}: {detail}",
                status=status,
                operation=operation,
                **match.groupdict(),
            )
    if status in (401, 403):
        return AclDenied(
            f"Consul denied {operation}: {detail or 'permission denied'}",
            status=status,
            operation=operation,
        )
    if status in TRANSIENT_STATUSES:
        return ConsulUnavailable(
            f"Consul at {address} could not serve {operation}: {status} {detail}",
            address=address,
            status=status,
        )
    return ConsulError(
        f"Consul refused {operation}: {status} {detail}", status=status, operation=operation
    )
