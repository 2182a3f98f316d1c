"""A prefork server's life in one program, for the fork test of SyncDcy:

    python tests/integration/_fork_client.py AGENT SERVICE LATER_PORT

The parent opens a SyncDcy and calls SERVICE by name, then forks. The child calls by name
through the same objects, closes the client and exits normally (exit hooks, finalizers and
garbage collection all run, as in a worker that is recycled). The parent then calls again,
registers one more instance (LATER_PORT) and waits for its own watch to show it: both need
the sockets the parent had before the fork. The last line printed is the JSON report.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import requests

from dcy import Backoff, RequestsAdapter, SyncDcy, TtlCheck, WatchOptions

FAST = WatchOptions(wait=2.0, backoff=Backoff(0.05, 0.5), first_answer_timeout=3.0)


def dcy_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("dcy-"))


def main() -> None:
    agent, service, later_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    report: dict[str, Any] = {}
    with SyncDcy(agent, watch_options=FAST) as client:
        session = requests.Session()
        session.mount("http://", RequestsAdapter(client))
        url = f"http://{service}/whoami"
        report["parent_before"] = session.get(url, timeout=10).json()["id"]
        parent_engine = client.aio
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            child: dict[str, Any] = {"answer": session.get(url, timeout=10).json()["id"]}
            child["own_engine"] = client.aio is not parent_engine
            child["threads"] = dcy_threads()
            client.close()
            child["threads_after_close"] = dcy_threads()
            os.write(write, json.dumps(child).encode())
            os.close(write)
            sys.exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            report["child"] = json.loads(pipe.read() or "null")
        report["child_exit"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        report["same_engine"] = client.aio is parent_engine
        report["parent_after"] = session.get(url, timeout=10).json()["id"]
        client.register(service, later_port, service_id=f"{service}-later", check=TtlCheck(ttl=30))
        deadline = time.monotonic() + 20
        while len(client.instances(service)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        report["instances_seen"] = len(client.instances(service))
    report["threads_at_end"] = dcy_threads()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
