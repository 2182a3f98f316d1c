"""SyncDcy and the requests adapter against a real agent, real worker processes and a real
WSGI server: what a Flask or Django service calling ``http://worker/...`` gets.

Workers are ``_echo_server.py`` processes (a test can SIGKILL one); they are registered with
TTL checks heartbeaten by the test's own client, so a killed worker stays "passing" in Consul
and only the client's own failover can avoid it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from dcy import (
    AllInstancesFailed,
    Backoff,
    RequestsAdapter,
    SyncDcy,
    TtlCheck,
    WatchOptions,
)
from tests.harness import ConsulAgent, until
from tests.integration._sync_servers import (
    CountingProxy,
    EchoServer,
    WsgiApp,
    echo_servers,
    wsgi_server,
)

pytestmark = pytest.mark.integration

FORK_SCRIPT = Path(__file__).with_name("_fork_client.py")
FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=3.0)
KEEP_PASSING = TtlCheck(ttl=30)


def by_name_session(client: SyncDcy, **options: Any) -> requests.Session:
    session = requests.Session()
    adapter = RequestsAdapter(client, adapter_options={"pool_maxsize": 32}, **options)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def register(client: SyncDcy, name: str, servers: Iterable[EchoServer]) -> None:
    for server in servers:
        client.register(name, server.port, service_id=f"{name}-{server.id}", check=KEEP_PASSING)


def passing(client: SyncDcy, name: str, count: int) -> None:
    until(lambda: len(client.instances(name)) == count, what=f"{count} instances of {name}")


def calling_app(session: requests.Session, name: str) -> WsgiApp:
    """A WSGI app whose ``/call`` asks the service ``name`` for ``/whoami`` by name and
    answers with the id of the instance that answered."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            answer = session.get(f"http://{name}/whoami", timeout=10)
            body = answer.json()["id"].encode()
            status = "200 OK" if answer.status_code == 200 else f"{answer.status_code} Upstream"
        except Exception as exc:
            body, status = repr(exc).encode(), "500 Internal Server Error"
        start_response(status, [("Content-Type", "text/plain")])
        return [body]

    return app


def call(app_url: str) -> str:
    answer = requests.get(f"{app_url}/call", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.text


@pytest.fixture
def client(consul: ConsulAgent) -> Iterator[SyncDcy]:
    with SyncDcy(consul.http_addr, watch_options=FAST) as client:
        yield client


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[EchoServer]]:
    with echo_servers(tmp_path, "a", "b") as servers:
        yield servers


def test_wsgi_app_calls_two_workers_by_name(
    client: SyncDcy, workers: list[EchoServer], unique_name: str
) -> None:
    """A WSGI app served in a thread calls ``http://<name>/whoami``: round robin over both
    workers; a real host (``127.0.0.1:port``) goes out untouched."""
    register(client, unique_name, workers)
    passing(client, unique_name, 2)
    session = by_name_session(client)
    with wsgi_server(calling_app(session, unique_name)) as app_url:
        ids = [call(app_url) for _ in range(6)]
    assert Counter(ids) == {"a": 3, "b": 3}
    direct = session.get(workers[1].url("/whoami"), timeout=10)
    assert direct.json()["id"] == "b"
    assert direct.url == workers[1].url("/whoami")


def test_a_killed_worker_is_avoided_at_once(
    client: SyncDcy, workers: list[EchoServer], unique_name: str
) -> None:
    """With one worker killed (still passing in Consul), every call succeeds on the other,
    and after a few failures the dead one is ejected, not tried on each request."""
    register(client, unique_name, workers)
    passing(client, unique_name, 2)
    session = by_name_session(client)
    with wsgi_server(calling_app(session, unique_name)) as app_url:
        assert {call(app_url) for _ in range(2)} == {"a", "b"}
        workers[0].kill()
        ids = [call(app_url) for _ in range(10)]
    assert ids == ["b"] * 10
    assert len(client.instances(unique_name)) == 2  # Consul does not know yet


def test_every_instance_dead_raises_all_instances_failed(
    client: SyncDcy, workers: list[EchoServer], unique_name: str
) -> None:
    """No instance answers: AllInstancesFailed naming both, with the connection errors."""
    register(client, unique_name, workers)
    passing(client, unique_name, 2)
    for worker in workers:
        worker.kill()
    session = by_name_session(client)
    with pytest.raises(AllInstancesFailed) as caught:
        session.get(f"http://{unique_name}/whoami", timeout=5)
    assert sorted(i.port for i in caught.value.instances) == sorted(w.port for w in workers)
    assert all(isinstance(e, requests.ConnectionError) for _, e in caught.value.attempts)


def test_a_503_is_retried_for_get_and_returned_for_post(
    client: SyncDcy, workers: list[EchoServer], unique_name: str, tmp_path: Path
) -> None:
    """A 503 to an idempotent GET is retried on the other instance; to a POST it is the
    answer (the POST may have done its work there)."""
    with echo_servers(tmp_path / "failing", "failing", extra=["--fail-status", "503"]) as bad:
        register(client, unique_name, [workers[0], *bad])
        passing(client, unique_name, 2)
        session = by_name_session(client)
        posts = [
            session.post(f"http://{unique_name}/whoami", data=b"x", timeout=10) for _ in range(2)
        ]
        gets = [session.get(f"http://{unique_name}/whoami", timeout=10) for _ in range(2)]
    assert sorted(p.status_code for p in posts) == [200, 503]
    assert [(g.status_code, g.json()["id"]) for g in gets] == [(200, "a"), (200, "a")]


def test_calls_keep_working_from_the_cache_while_the_agent_restarts(
    consul_factory: Callable[..., ConsulAgent], workers: list[EchoServer], unique_name: str
) -> None:
    """The agent stops: calls by name go on from the cache. It comes back (empty, as a dev
    agent does): the client re-registers the workers and calls still work."""
    agent = consul_factory()
    with SyncDcy(agent.http_addr, watch_options=FAST) as client:
        register(client, unique_name, workers)
        passing(client, unique_name, 2)
        session = by_name_session(client)
        with wsgi_server(calling_app(session, unique_name)) as app_url:
            assert {call(app_url) for _ in range(2)} == {"a", "b"}
            agent.stop()
            assert Counter(call(app_url) for _ in range(6)) == {"a": 3, "b": 3}
            agent.start()

            def fresh_with_both() -> bool:
                # Not the cache (it still holds both): the restarted agent's own answer,
                # once the client has registered the workers again.
                answer = client.lookup(unique_name)
                return not answer.stale and len(answer.instances) == 2

            until(fresh_with_both, what="both workers registered again")
            assert Counter(call(app_url) for _ in range(6)) == {"a": 3, "b": 3}


def test_32_threads_at_once_share_one_watch(
    consul: ConsulAgent, workers: list[EchoServer], unique_name: str
) -> None:
    """32 requests to the WSGI app at once, each calling a name never resolved before: all
    succeed, and the agent was asked for that service's health by one watch: one first
    query (no index), whatever the number of threads."""
    with SyncDcy(consul.http_addr, watch_options=FAST) as registrar:
        register(registrar, unique_name, workers)
        passing(registrar, unique_name, 2)
        with (
            CountingProxy(consul.http_addr) as proxy,
            SyncDcy(proxy.address, watch_options=FAST) as client,
        ):
            session = by_name_session(client)
            with wsgi_server(calling_app(session, unique_name)) as app_url:
                start = threading.Barrier(32)

                def one_call(_: int) -> str:
                    start.wait(10)
                    return call(app_url)

                with ThreadPoolExecutor(32) as pool:
                    ids = list(pool.map(one_call, range(32)))
            queries = proxy.paths(f"/v1/health/service/{unique_name}")
            watches = [w for w in client.aio.engine.watches if unique_name in str(w.spec)]
    assert Counter(ids) == {"a": 16, "b": 16}
    first_queries = [q for q in queries if "index=" not in q]
    assert len(first_queries) == 1, queries
    assert len(watches) == 1


def test_a_forked_child_has_its_own_engine(
    consul: ConsulAgent, client: SyncDcy, workers: list[EchoServer], unique_name: str
) -> None:
    """A program forks after calling by name (``_fork_client.py``): the child calls through
    an engine thread of its own and exits; the parent's engine, its connections and its
    watch keep working after that (it sees an instance it registers later)."""
    register(client, unique_name, workers[:1])
    passing(client, unique_name, 1)
    done = subprocess.run(
        [sys.executable, str(FORK_SCRIPT), consul.http_addr, unique_name, "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["parent_before"] == report["parent_after"] == "a"
    child = report["child"]
    assert child["answer"] == "a" and child["own_engine"]
    assert child["threads"].count("dcy-engine") == 1
    assert child["threads_after_close"] == []
    assert report["child_exit"] == 0 and report["same_engine"]
    assert report["instances_seen"] == 2
    assert report["threads_at_end"] == []
