"""Reads that Consul's ACLs filter, on a default-deny agent: a read of one named thing (a
service's instances, a session) that the token may see none of is AclDenied, while a read of
"everything the token may see" (all services, all nodes, every check in a state) that comes
back empty after filtering is an answer: least privilege hides the rest, and a watch on it
must not end for good (a service whose instances are all gone is not a missing rule)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest

from dcy import AclDenied, ConsulConfig
from dcy._consul import HttpConsul
from tests.harness import ConsulAgent

pytestmark = pytest.mark.integration

ROOT = "root-secret"
ACL_HCL = (
    'acl { enabled = true\n default_policy = "deny"\n down_policy = "deny"\n '
    f'tokens {{ initial_management = "{ROOT}"\n agent = "{ROOT}" }} }}'
)
# Read access to one service that has no instance (yet): nothing else, no node:read.
RULES = 'service "absent" { policy = "read" }'


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    consul = ConsulAgent(tmp_path_factory.mktemp("consul-acl"), hcl=[ACL_HCL], token=ROOT)
    consul.start()
    try:
        # Something the token may not see: an instance with a check of its own.
        definition = {"Name": "hidden", "ID": "hidden-1", "Port": 7300, "Check": {"TTL": "1h"}}
        consul.api("/v1/agent/service/register", method="PUT", data=json.dumps(definition).encode())
        yield consul
    finally:
        consul.stop()


@pytest.fixture(scope="module")
def secret(agent: ConsulAgent) -> str:
    return agent.create_token("test-acl-filtering", RULES)


@pytest.fixture
async def api(agent: ConsulAgent, secret: str) -> AsyncIterator[HttpConsul]:
    consul = HttpConsul(ConsulConfig.from_env(agent.http_addr, token=secret, environ={}))
    try:
        yield consul
    finally:
        await consul.aclose()


async def test_reads_of_everything_visible_answer_empty(api: HttpConsul) -> None:
    """Every check, service and node is filtered out: the answers are empty, not AclDenied."""
    assert (await api.health_state("any")).body == []
    assert (await api.health_state("critical")).body == []
    assert (await api.catalog_services()).body == {}
    assert (await api.catalog_nodes()).body == []


async def test_a_named_read_filtered_to_nothing_is_denied(api: HttpConsul) -> None:
    """The instances of a service the token may not read: AclDenied, naming the request."""
    with pytest.raises(AclDenied) as denied:
        await api.health_service("hidden")
    assert denied.value.operation == "GET /v1/health/service/hidden"
    # The service it may read has no instance: an empty answer, nothing was filtered.
    assert (await api.health_service("absent")).body == []
