"""Small inventories run as local clusters (``tasks._cluster``), for the chaos tests and
bench/cluster.py: each run under its own folder and namespace prefix, removed at the end even
when the test fails, and checked to leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tasks import _netns
from tasks._cluster import Cluster, down, up
from tasks._inventory import load_inventory

# 1 datacenter: three servers (nsqlookupd on s1), two client hosts with a worker and an app
# each, and one with the sensor: killing or cutting a server leaves every service's own agent
# alive, and cutting an app's host leaves the sensor publishing.
ONE_DC: dict[str, Any] = {
    "dc1": {
        "s1": {"address": "10.1.0.11", "consul": "server", "run": {"nsqlookupd": 1}},
        "s2": {"address": "10.1.0.12", "consul": "server", "run": {}},
        "s3": {"address": "10.1.0.13", "consul": "server", "run": {}},
        "c1": {"address": "10.1.0.21", "consul": "client", "run": {"worker": 1, "app": 1}},
        "c2": {"address": "10.1.0.22", "consul": "client", "run": {"worker": 1, "app": 1}},
        "c3": {"address": "10.1.0.23", "consul": "client", "run": {"sensor": 1}},
    }
}


def inventory_text(datacenters: dict[str, Any], mode: str) -> str:
    hosts = {
        dc: {name: {"ssh": f"{name}.{dc}.test", **entry} for name, entry in entries.items()}
        for dc, entries in datacenters.items()
    }
    return yaml.safe_dump({"registry": "local", "mode": mode, "datacenters": hosts})


def leftovers(prefix: str) -> list[str]:
    """Namespaces, their mounts and processes of a run that are still there."""
    found = [f"namespace {ns}" for ns in _netns.namespaces() if ns.startswith(f"{prefix}-")]
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f"/{prefix}-" in line
    ]
    return found


@contextlib.contextmanager
def local_cluster(workdir: Path, datacenters: dict[str, Any], mode: str) -> Iterator[Cluster]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "inventory.yml"
    path.write_text(inventory_text(datacenters, mode))
    root = workdir / "cluster"
    prefix = f"dcyt{secrets.token_hex(3)}"
    cluster = up(load_inventory(path), root, prefix=prefix, say=lambda line: None)
    try:
        yield cluster
    finally:
        down(root, say=lambda line: None)
        assert leftovers(prefix) == []


def app_results(cluster: Cluster) -> list[dict[str, Any]]:
    """The result lines every app of the cluster logged."""
    lines = []
    for proc in cluster.plan.processes:
        if proc.name.startswith("app"):
            for line in cluster.log(proc.dc, proc.host, proc.name).splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        lines.append(json.loads(line))
    return lines


def sequence_numbers(results: list[dict[str, Any]]) -> list[int]:
    return sorted(int(line["id"].rsplit("-", 1)[1]) for line in results)


def leading_apps(cluster: Cluster) -> list[tuple[str, str, str]]:
    """(dc, host, name) of every app whose log says it leads now."""
    leading = []
    for proc in cluster.plan.processes:
        if proc.name.startswith("app"):
            log = cluster.log(proc.dc, proc.host, proc.name)
            if log.rfind("leading: ") > log.rfind("not leading any more"):
                leading.append((proc.dc, proc.host, proc.name))
    return leading


def sensor_published(cluster: Cluster, dc: str, host: str, port: int = 9001) -> int:
    """The readings nsqd has accepted from the sensor on ``host``, as its /metrics counts."""
    url = f"http://127.0.0.1:{cluster.forward(dc, host, port)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = re.search(r'^sensor_readings_total\{via="nsq"\} (\S+)$', text, re.MULTILINE)
    assert found is not None, text
    return int(float(found.group(1)))


def stop_sensor(cluster: Cluster, dc: str, host: str) -> int:
    """SIGTERM: the sensor publishes what it holds and says how many readings nsqd accepted."""
    cluster.stop_process(dc, host, "sensor")
    found = re.search(r"published (\d+) readings to nsqd", cluster.log(dc, host, "sensor"))
    assert found is not None, cluster.log(dc, host, "sensor")[-2000:]
    return int(found.group(1))


def failed_cycles(cluster: Cluster) -> int:
    return sum(
        cluster.log(p.dc, p.host, p.name).count("cycle failed:")
        for p in cluster.plan.processes
        if p.name.startswith("app")
    )


# 2 datacenters of three servers; a worker on one server of each.
TWO_DC: dict[str, Any] = {
    "dc1": {
        "s1": {"address": "10.1.0.11", "consul": "server", "run": {"worker": 1}},
        "s2": {"address": "10.1.0.12", "consul": "server", "run": {}},
        "s3": {"address": "10.1.0.13", "consul": "server", "run": {}},
    },
    "dc2": {
        "s1": {"address": "10.2.0.11", "consul": "server", "run": {"worker": 1}},
        "s2": {"address": "10.2.0.12", "consul": "server", "run": {}},
        "s3": {"address": "10.2.0.13", "consul": "server", "run": {}},
    },
}
