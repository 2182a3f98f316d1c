"""A fixed Consul state for consul-template equivalence runs (tests/ctmpl_corpus, bench/ctmpl.py).

Extra nodes are written straight into the catalog (their checks and services stay as written:
no agent runs on them), so every health state, node meta, tagged addresses, service meta,
weights and KV shapes are there on a single dev agent.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any

from tests.harness import ConsulAgent, until

NODES: list[dict[str, Any]] = [
    {
        "Node": "node-a",
        "Address": "10.0.1.1",
        "NodeMeta": {"rack": "r1", "env": "prod"},
        "TaggedAddresses": {"lan": "10.0.1.1", "wan": "198.51.100.1"},
    },
    {"Node": "node-b", "Address": "10.0.1.2", "NodeMeta": {"rack": "r2", "env": "prod"}},
    {"Node": "node-c", "Address": "10.0.1.3", "NodeMeta": {"rack": "r1", "env": "staging"}},
]

# (node, id, name, tags, port, address, meta, check statuses)
SERVICES: list[tuple[str, str, str, list[str], int, str, dict[str, str], list[str]]] = [
    (
        "node-a",
        "web-1",
        "web",
        ["prod", "v2", "http"],
        8080,
        "",
        {"version": "2.1", "zone": "a"},
        ["passing"],
    ),
    (
        "node-b",
        "web-2",
        "web",
        ["prod", "v1", "http"],
        8080,
        "10.0.2.2",
        {"version": "1.9", "zone": "b"},
        ["passing", "passing"],
    ),
    ("node-c", "web-3", "web", ["canary", "v2"], 8081, "", {"version": "2.2-rc1"}, ["warning"]),
    (
        "node-a",
        "web-4",
        "web",
        ["prod", "v2"],
        8082,
        "",
        {"version": "2.1", "zone": "a"},
        ["critical"],
    ),
    (
        "node-b",
        "api-1",
        "api",
        ["prod", "grpc"],
        9090,
        "",
        {"version": "3.0", "weight": "10"},
        ["passing"],
    ),
    (
        "node-c",
        "api-2",
        "api",
        ["prod", "grpc", "rest"],
        9091,
        "10.0.3.9",
        {"version": "3.1", "weight": "5"},
        ["passing", "warning"],
    ),
    ("node-a", "db-1", "db", ["primary"], 5432, "", {"role": "primary"}, ["passing"]),
    ("node-b", "db-2", "db", ["replica"], 5432, "", {"role": "replica"}, ["maintenance"]),
    ("node-c", "cache-1", "cache", [], 6379, "", {}, ["passing"]),
    ("node-a", "cache-2", "cache", ["lru"], 6380, "", {"maxmem": "1gb"}, ["critical", "passing"]),
    (
        "node-b",
        "metrics-1",
        "metrics",
        ["internal", "prometheus"],
        9100,
        "",
        {"path": "/metrics"},
        ["passing"],
    ),
    ("node-c", "queue-1", "queue", ["nsq"], 4150, "", {"tcp": "4150", "http": "4151"}, ["warning"]),
]

KV: dict[str, str] = {
    "app/config/name": "shop",
    "app/config/replicas": "3",
    "app/config/debug": "false",
    "app/config/db/host": "db.internal",
    "app/config/db/port": "5432",
    "app/config/feature/login": "on",
    "app/config/feature/search": "off",
    "app/configuration": "not under app/config/",
    "app/motd": 'Hello, <world> & "friends"\n',
    "app/json": '{"b": 2, "a": [1, 2, {"c": "x"}], "s": "t\\u00e9st"}',
    "app/yaml": "name: shop\nitems:\n  - one\n  - two\nnested:\n  k: v\n",
    "app/list": "a,b,,c",
    "app/spaces": "  padded value \t",
    "app/empty": "",
    "upstreams/web/weight": "5",
    "upstreams/web/maxconn": "100",
    "upstreams/api/weight": "1",
    "upstreams/api/maxconn": "20",
    "empty-folder/": "",
}


def _put(agent: ConsulAgent, path: str, body: bytes) -> None:
    request = urllib.request.Request(f"{agent.url}{path}", data=body, method="PUT")
    urllib.request.urlopen(request, timeout=10).close()


def load(agent: ConsulAgent) -> None:
    """Write the fixed state into ``agent`` (a fresh dev agent). Returns once the agent's own
    node is synced too (its tagged addresses arrive with a later anti-entropy run: two renders
    on either side of it would differ)."""
    until(lambda: _agent_node_synced(agent), timeout=30, what="the agent's node in the catalog")
    for node in NODES:
        _put(agent, "/v1/catalog/register", json.dumps(node).encode())
    for node_name, sid, name, tags, port, address, meta, states in SERVICES:
        base = next(n for n in NODES if n["Node"] == node_name)
        checks = []
        for i, state in enumerate(states):
            if state == "maintenance":
                checks.append(
                    {
                        "CheckID": f"_service_maintenance:{sid}",
                        "Name": "Service Maintenance Mode",
                        "Status": "critical",
                        "Notes": "upgrade",
                        "ServiceID": sid,
                    }
                )
                continue
            checks.append(
                {
                    "CheckID": f"{sid}-check-{i}",
                    "Name": f"{name} check {i}",
                    "Status": state,
                    "Output": f"{state} output",
                    "ServiceID": sid,
                }
            )
        body = {
            **base,
            "Service": {
                "ID": sid,
                "Service": name,
                "Tags": tags,
                "Port": port,
                "Address": address,
                "Meta": meta,
                "Weights": {"Passing": 10, "Warning": 1},
            },
            "Checks": checks,
        }
        _put(agent, "/v1/catalog/register", json.dumps(body).encode())
    for key, value in KV.items():
        _put(agent, f"/v1/kv/{key}", value.encode())


def _agent_node_synced(agent: ConsulAgent) -> bool:
    with urllib.request.urlopen(f"{agent.url}/v1/catalog/node/{agent.node_name}", timeout=5) as a:
        body = json.loads(a.read()) or {}
    return "wan" in ((body.get("Node") or {}).get("TaggedAddresses") or {})


def kv_value(agent: ConsulAgent, key: str) -> str:
    with urllib.request.urlopen(f"{agent.url}/v1/kv/{key}", timeout=5) as answer:
        return base64.b64decode(json.loads(answer.read())[0]["Value"]).decode()
