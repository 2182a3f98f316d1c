"""Consul's UI is the health dashboard: a real browser sees the running system as passing.

The whole system (Consul, nsqd, nsqlookupd, nsqadmin, sensor, two workers, app in HTTP mode)
runs on free ports; playwright drives Debian's /usr/bin/chromium (never a downloaded browser)
through the UI the dev agent serves, reading what a person would see. Set DCY_UI_SCREENSHOT to
a path (docs/consul-ui.png for the README) to keep a screenshot of the services list.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.system import System

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPECTED = {"sensor": 1, "worker": 2, "app": 1, "nsqd": 1, "nsqlookupd": 1, "nsqadmin": 1}
# The UI follows Consul with blocking queries; this bounds how long it may take to show a state.
UI_WAIT_MS = 20_000

# What the services list shows, row by row: name, health (the class of the row's health
# badge: passing, warning, critical) and the "N instances" text.
READ_SERVICES = """() => Array.from(document.querySelectorAll('.consul-service-list li.linkable'))
  .map(li => ({
    name: li.querySelector('.header a')?.textContent.trim(),
    health: li.querySelector('.header dl')?.className.trim(),
    instances: li.querySelector('.detail span')?.textContent.trim(),
  }))"""
READ_INSTANCES = """() => Array.from(
    document.querySelectorAll('.consul-service-instance-list li .header a'))
  .map(a => ({
    id: a.textContent.trim(),
    href: a.getAttribute('href'),
    checks: Array.from(a.closest('li').querySelectorAll('dl.consul-instance-checks'))
      .map(dl => dl.className.replace('consul-instance-checks', '').trim()),
  }))"""
READ_CHECKS = """() => Array.from(document.querySelectorAll('li.health-check-output'))
  .map(li => {
    const field = name => Array.from(li.querySelectorAll('dl'))
      .find(dl => dl.querySelector('dt')?.textContent.trim() === name)
      ?.querySelector('dd')?.textContent.trim();
    return {
      name: li.querySelector('header h2')?.textContent.trim(),
      status: li.className.replace('health-check-output', '').trim(),
      service: field('ServiceName'),
      notes: field('Notes'),
    };
  })"""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = System(tmp_path_factory.mktemp("consul-ui")).start_infrastructure()
    try:
        running.start_nsqadmin()
        running.start("sensor", "--mode", "http")
        running.start("worker", "--mode", "http")
        running.start("worker", "--mode", "http")
        running.start("app", "--mode", "http")
        for name, count in EXPECTED.items():
            running.wait_passing(name, count)
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def launched_chromium() -> Iterator[Browser]:
    """Debian's chromium driven by playwright (which never downloads a browser)."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


def ui(system: System, path: str) -> str:
    """The address of a UI page (``path`` under the datacenter, or an absolute /ui/ path)."""
    assert system.consul is not None
    return f"{system.consul.url}{path if path.startswith('/') else '/ui/dc1/' + path}"


def read_when(page: Page, script: str, ready: str) -> Any:
    """What ``script`` reads once the JS predicate ``ready(rows)`` holds (bounded wait), or
    what it reads at the deadline: the caller's assertion then shows the difference."""
    with contextlib.suppress(PlaywrightError):
        page.wait_for_function(f"(({ready}))(({script})())", timeout=UI_WAIT_MS)
    return page.evaluate(script)


def assert_services_passing(
    page: Page, expected: Mapping[str, int], screenshot: Path, keep: str | None
) -> None:
    """The open services list shows each expected service passing with its instance count
    (waiting for the UI to get there); the page is saved to ``screenshot``, and copied to
    ``keep`` when given (how the README's images are made)."""
    ready = "rows => " + " && ".join(
        f"rows.some(r => r.name === '{name}' && r.health === 'passing'"
        f" && r.instances.startsWith('{count} instance'))"
        for name, count in expected.items()
    )
    rows = read_when(page, READ_SERVICES, ready)
    shown = {row["name"]: (row["health"], row["instances"]) for row in rows}
    for name, count in expected.items():
        plural = "instance" if count == 1 else "instances"
        assert shown.get(name) == ("passing", f"{count} {plural}"), shown
    page.screenshot(path=str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, keep)


def test_services_list_shows_every_service_passing(system: System, page: Page) -> None:
    """The services list shows sensor, worker (2 instances), app and NSQ's daemons passing."""
    page.goto(ui(system, "services"))
    assert_services_passing(
        page, EXPECTED, system.workdir / "consul-ui.png", os.environ.get("DCY_UI_SCREENSHOT")
    )


def test_worker_page_lists_both_instances_with_all_checks_passing(
    system: System, page: Page
) -> None:
    """The worker's page lists its two instances, service and node checks passing on each."""
    page.goto(ui(system, "services/worker/instances"))
    instances = read_when(
        page,
        READ_INSTANCES,
        "rows => rows.length === 2"
        " && rows.every(r => r.checks.length === 2 && r.checks.every(c => c === 'passing'))",
    )
    assert len(instances) == 2, instances
    assert system.consul is not None
    registered = system.consul.api("/v1/health/service/worker")
    assert {i["id"] for i in instances} == {e["Service"]["ID"] for e in registered}
    assert all(i["checks"] == ["passing", "passing"] for i in instances), instances


@pytest.mark.parametrize(
    ("service", "check_name", "notes_start", "liveness"),
    [
        ("sensor", "sensor HTTP /health", "GET http://127.0.0.1:", True),
        ("worker", "worker HTTP /health", "GET http://127.0.0.1:", True),
        ("app", "app HTTP /health", "GET http://127.0.0.1:", True),
        ("nsqadmin", "nsqadmin HTTP http://127.0.0.1:", "GET http://127.0.0.1:", False),
    ],
)
def test_health_check_tab_names_the_check_and_says_what_it_checks(
    system: System, page: Page, service: str, check_name: str, notes_start: str, liveness: bool
) -> None:
    """An instance's health-checks tab shows its passing check by name, with notes saying
    what it requests and what counts as healthy; our services' liveness check beside it."""
    page.goto(ui(system, f"services/{service}/instances"))
    instances = read_when(page, READ_INSTANCES, "rows => rows.length > 0")
    assert instances, f"no {service} instance shown"
    page.goto(ui(system, f"{instances[0]['href']}/health-checks"))
    checks = read_when(
        page, READ_CHECKS, f"rows => rows.some(r => r.service === '{service}' && r.notes)"
    )
    own = [c for c in checks if c["service"] == service]
    alive = [c for c in own if "(liveness)" in c["name"]]
    assert len(own) == 1 + liveness and len(alive) == liveness, checks
    for check in alive:
        assert check["status"] == "passing", check
        assert check["notes"].startswith("TCP connect to 127.0.0.1:"), check
        assert check["notes"].endswith("fails only when the process is gone"), check
    (check,) = [c for c in own if c not in alive]
    assert check["status"] == "passing", check
    assert check["name"].startswith(check_name), check
    assert check["notes"].startswith(notes_start), check
    assert "every" in check["notes"] and "means" in check["notes"], check
