"""What a lookup of ``x.service.sd`` costs a program that only knows its libc resolver.

Everything runs inside a private network and mount namespace (tests/sandbox.py: needs root),
with the dev agent's own config (consul/dev.hcl, service_ttl 5s) and ``inv dns``'s dnsmasq on
port 53 of that namespace, so the machine's resolver is never touched. Same run, same agent:

* ``libc_cached_*``: ``socket.getaddrinfo("x.service.sd", AF_INET)`` in-process (glibc reads
  /etc/resolv.conf, asks dnsmasq, which answers from its cache and refreshes the entry from
  Consul every service_ttl: those refreshes are the tail);
* ``libc_uncached_*``: the same with dnsmasq's cache off (``cache-size=0``): every lookup goes
  glibc → dnsmasq → Consul;
* ``direct_*``: an A query with dnspython over UDP straight to the agent's DNS port (what a
  Python program using Consul's DNS directly pays; no resolver in between);
* ``direct_raw_*``: the same query as prepared bytes on one connected UDP socket, nothing
  parsed: Consul's own answer time plus loopback, the floor under every DNS path;
* ``getent_cached_p50_ms``: ``getent hosts x.service.sd`` as a process, start-up included, for
  a feel of what shell scripts pay.

p50/p99 in µs; ``*_over_*`` are ratios of p50s. Named system_dns (file and JSON line alike),
not dns: a ``bench/dns.py`` would shadow dnspython's ``dns`` package for every
``python bench/<name>.py`` (the script's folder comes first on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

from bench._common import emit, gc_paused, note, percentile, rounded
from tests.sandbox import CONSUL_DNS_PORT, Sandbox

SERVICE = "x"
ADDRESS = "127.0.0.5"
NAME = f"{SERVICE}.service.sd"

_PUT = (
    "import sys, urllib.request\n"
    "r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='PUT')\n"
    "urllib.request.urlopen(r, timeout=5).read()\n"
)


def _time_us(call: Callable[[], object], samples: int) -> list[float]:
    for _ in range(min(50, samples)):  # warm: first lookups fill caches on every layer
        call()
    timings = []
    with gc_paused():
        for _ in range(samples):
            start = time.perf_counter()
            call()
            timings.append((time.perf_counter() - start) * 1e6)
    return timings


def _summary(prefix: str, timings: list[float]) -> dict[str, float]:
    return {
        f"{prefix}_p50_us": rounded(percentile(timings, 50)),
        f"{prefix}_p99_us": rounded(percentile(timings, 99)),
    }


def inner(what: str, samples: int, dns_port: int) -> None:
    """Runs inside the sandbox; prints one JSON object of figures."""
    figures: dict[str, float] = {}

    def libc() -> object:
        found = socket.getaddrinfo(NAME, None, socket.AF_INET, socket.SOCK_STREAM)
        if found[0][4][0] != ADDRESS:
            raise RuntimeError(f"{NAME} resolved to {found}")
        return found

    if what in ("cached", "uncached"):
        figures |= _summary(f"libc_{what}", _time_us(libc, samples))
    if what == "cached":
        runs = max(20, samples // 20)
        timings = _time_us(
            lambda: subprocess.run(["getent", "hosts", NAME], check=True, capture_output=True),
            runs,
        )
        figures["getent_cached_p50_ms"] = round(sorted(timings)[len(timings) // 2] / 1000, 3)
    if what == "direct":
        import dns.message
        import dns.query
        import dns.rdatatype

        query = dns.message.make_query(NAME, dns.rdatatype.A)

        def direct() -> object:
            answer = dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=2)
            if not answer.answer:
                raise RuntimeError(f"no answer for {NAME}")
            return answer

        figures |= _summary("direct", _time_us(direct, samples))

        # The floor under both: the same query as prepared bytes on one connected socket,
        # nothing parsed but the answer count; Consul's own time plus loopback.
        wire = query.to_wire()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.connect(("127.0.0.1", dns_port))
        raw.settimeout(2)

        def direct_raw() -> object:
            raw.send(wire)
            reply = raw.recv(4096)
            if int.from_bytes(reply[6:8], "big") == 0:
                raise RuntimeError(f"no answer for {NAME}")
            return reply

        figures |= _summary("direct_raw", _time_us(direct_raw, samples))
        raw.close()
    print(json.dumps(figures))


def outer(quick: bool) -> None:
    samples = 200 if quick else 3000
    figures: dict[str, float | int] = {"samples": samples}
    with tempfile.TemporaryDirectory(prefix="dcy-bench-dns-") as tmp:
        workdir = Path(tmp)
        box = Sandbox(workdir).start("nameserver 192.0.2.53\n")
        try:
            note("sandbox: starting Consul with consul/dev.hcl")
            box.start_consul()
            body = json.dumps({"Name": SERVICE, "ID": SERVICE, "Address": ADDRESS, "Port": 1})
            register = f"{box.consul_url}/v1/agent/service/register"
            _inside(box, [sys.executable, "-c", _PUT, register, body])
            for what, cache_size in (("cached", 1000), ("uncached", 0), ("direct", None)):
                if cache_size is not None:
                    _inside(box, [sys.executable, "-m", "tasks._dns_setup",
                                  "--resolv-conf", "/etc/resolv.conf",
                                  "--state-dir", str(workdir / "state"),
                                  "--consul-dns", f"127.0.0.1#{CONSUL_DNS_PORT}",
                                  "--cache-size", str(cache_size)])  # fmt: skip
                note(f"measuring {what} ({samples} lookups)")
                output = _inside(box, [sys.executable, __file__, "--inner", what,
                                       "--samples", str(samples),
                                       "--dns-port", str(CONSUL_DNS_PORT)])  # fmt: skip
                figures |= json.loads(output.strip().splitlines()[-1])
            _inside(box, [sys.executable, "-m", "tasks._dns_setup", "--undo",
                          "--resolv-conf", "/etc/resolv.conf",
                          "--state-dir", str(workdir / "state")])  # fmt: skip
        finally:
            box.stop()
    figures["cached_over_direct"] = rounded(
        float(figures["direct_p50_us"]) / float(figures["libc_cached_p50_us"])
    )
    figures["uncached_over_direct"] = rounded(
        float(figures["direct_p50_us"]) / float(figures["libc_uncached_p50_us"])
    )
    figures["cached_over_uncached"] = rounded(
        float(figures["libc_uncached_p50_us"]) / float(figures["libc_cached_p50_us"])
    )
    emit({"bench": "system_dns", **figures})


def _inside(box: Sandbox, argv: list[str]) -> str:
    result = box.run(argv, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed in the sandbox: {result.stderr.strip()[-500:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="a short run with fewer samples")
    parser.add_argument("--inner", choices=("cached", "uncached", "direct"), help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dns-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.inner, args.samples, args.dns_port)
    else:
        outer(args.quick)


if __name__ == "__main__":
    main()
