"""The least a Python renderer can do for bench/template.py's case 1: one long poll of
``/v1/health/service/<name>`` on aiohttp, the passing instances formatted by hand (no template
engine, no watch engine, no checks), and the same atomic write with fsync both tools do.

Run side by side with the two tools, it shows how much of the time after a change is
Consul's and Python's, and how much is left to win: ``case1_floor_*`` figures.

    python bench/_floor.py CONSUL_ADDR SERVICE DESTINATION HEADER
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from typing import Any

import aiohttp
import orjson


def passing_lines(entries: list[dict[str, Any]]) -> str:
    lines = [
        f"{e['Service']['ID']} {e['Service']['Address']}:{e['Service']['Port']}\n"
        for e in entries
        if all(check["Status"] == "passing" for check in e["Checks"])
    ]
    return "".join(sorted(lines))


def write(destination: str, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(destination))
    os.write(fd, data)
    os.fsync(fd)
    os.fchmod(fd, 0o644)
    os.close(fd)
    os.replace(temp, destination)


async def main(address: str, service: str, destination: str, header: str) -> None:
    url = f"http://{address}/v1/health/service/{service}"
    async with aiohttp.ClientSession(headers={"Accept-Encoding": "identity"}) as session:
        index = "0"
        while True:
            params = {"index": index, "wait": "60s"}
            async with session.get(url, params=params) as response:
                body = await response.read()
                index = response.headers["X-Consul-Index"]
            write(destination, (header + passing_lines(orjson.loads(body))).encode())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(*sys.argv[1:5]))
