"""The example inventory (datacenters/inventory.yml, 2 datacenters x 3 hosts) run whole as a
local cluster: both datacenters' Consul UIs, reached from the machine's loopback, show every
service passing, and nsqadmin answers. Set DCY_CLUSTER_SCREENSHOT to a path
(docs/cluster-ui.png for the README) to keep a screenshot of dc1's services list."""

from __future__ import annotations

import os
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from tasks._cluster import Cluster, down, up
from tasks._infra_render import INVENTORY
from tasks._inventory import load_inventory
from tests.cluster import leftovers
from tests.integration.test_consul_ui import assert_services_passing, launched_chromium

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster-2x3") / "cluster"
    prefix = f"dcyt{secrets.token_hex(3)}"
    running = up(load_inventory(INVENTORY), root, prefix=prefix, timeout=300, say=print)
    try:
        yield running
    finally:
        down(root, say=print)
        assert leftovers(prefix) == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_chromium() as chromium:
        yield chromium


@pytest.mark.parametrize("dc", ["dc1", "dc2"])
def test_each_datacenters_ui_shows_every_service_passing(
    cluster: Cluster, browser: Browser, dc: str, tmp_path: Path
) -> None:
    """One server of each datacenter serves its UI on the machine's loopback; the services
    list shows each service of the inventory with its number of instances, all passing."""
    datacenter = cluster.plan.inventory.datacenter(dc)
    expected = dict(cluster.plan.expected_services(datacenter))
    url = cluster.state.urls[f"{dc} Consul UI"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(url)
        keep = os.environ.get("DCY_CLUSTER_SCREENSHOT") if dc == "dc1" else None
        assert_services_passing(page, expected, tmp_path / f"cluster-ui-{dc}.png", keep)
    finally:
        context.close()


def test_the_datacenters_know_each_other_and_nsqadmin_answers(cluster: Cluster) -> None:
    """Servers joined over the WAN: each datacenter lists both, and answers for the other
    (dc2's workers asked through dc1); nsqadmin of each datacenter serves its UI."""
    for dc in ("dc1", "dc2"):
        assert cluster.api(dc, "h1", "/v1/catalog/datacenters") in (["dc1", "dc2"], ["dc2", "dc1"])
    workers = cluster.api("dc1", "h1", "/v1/health/service/worker?dc=dc2&passing=1")
    assert sorted(e["Node"]["Address"] for e in workers) == sorted(
        h.address
        for h in cluster.plan.inventory.datacenter("dc2").hosts
        for _ in range(h.count("worker"))
    )
    for dc in ("dc1", "dc2"):
        with urllib.request.urlopen(cluster.state.urls[f"{dc} nsqadmin"], timeout=10) as page:
            assert page.status == 200 and b"nsqadmin" in page.read()
