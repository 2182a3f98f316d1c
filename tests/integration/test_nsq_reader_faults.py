"""svc._nsq_reader.NsqReader against a fake nsqd that misbehaves (tests/fake_nsqd.py):
malformed frames close the connection and it comes back, a silent connection is dropped
by heartbeat timeout alone, and a hanging nsqlookupd delays no other."""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from svc._nsq_frames import FRAME_MESSAGE, FRAME_RESPONSE, encode_frame, max_frame_size
from svc._nsq_reader import NsqReader
from tests.fake_nsqd import FakeClient, FakeNsqd, Script, SilentServer
from tests.harness import eventually

pytestmark = pytest.mark.integration
MAX_MSG_SIZE = 4096
GOOD_ID = b"0123456789abcdef"


def consumer(lookupds: list[str], got: list[bytes], **options: Any) -> NsqReader:
    options.setdefault("lookupd_poll_interval", 0.2)
    options.setdefault("backoff_cap", 0.2)
    return NsqReader("t", "c", lookupds, got.extend, **options).start()


@pytest.fixture
async def fake_nsqd() -> AsyncIterator[Callable[[Script], Any]]:
    started: list[FakeNsqd] = []

    async def start(script: Script) -> FakeNsqd:
        fake = await FakeNsqd(script, max_msg_size=MAX_MSG_SIZE).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()


MALFORMED = {
    # A size of -4 or less used to send data_received round the same header forever.
    "negative size": struct.pack(">ll", -8, FRAME_RESPONSE),
    "size below its type": struct.pack(">ll", 2, FRAME_RESPONSE) + b"xx",
    "size past the maximum": struct.pack(">ll", max_frame_size(MAX_MSG_SIZE) + 1, FRAME_MESSAGE),
    "unknown type": encode_frame(7, b"what is this"),
    "message shorter than its header": encode_frame(FRAME_MESSAGE, b"short"),
}
REASONS = {
    "negative size": "frame size -8 is below the 4 bytes of its type",
    "size below its type": "frame size 2 is below",
    "size past the maximum": "exceeds the negotiated maximum",
    "unknown type": "unknown frame type 7",
    "message shorter than its header": "shorter than its 26-byte header",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_a_malformed_frame_closes_the_connection_which_comes_back(
    kind: str, fake_nsqd: Callable[[Script], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The first connection gets a good message and a bad frame in one write: the reader
    logs why, drops the connection without handling that message (nsqd would deliver it
    again), reconnects, and takes a message on the new connection normally."""

    async def script(client: FakeClient) -> None:
        if client.number == 0:
            client.send(
                encode_frame(FRAME_MESSAGE, bytes(10) + GOOD_ID + b"lost") + MALFORMED[kind]
            )
        else:
            client.send_message(GOOD_ID, b"fine")

    caplog.set_level(logging.WARNING, logger="svc.nsq.reader")
    fake = await fake_nsqd(script)
    got: list[bytes] = []
    reader = consumer([fake.lookupd_url], got)
    try:
        await eventually(lambda: got == [b"fine"], what="the message on the new connection")
        await eventually(lambda: fake.clients[1].finished() == [GOOD_ID], what="its FIN")
        assert fake.clients[0].closed.is_set()
        assert reader.malformed_frames == 1
        assert "malformed frame" in caplog.text and REASONS[kind] in caplog.text
    finally:
        await reader.close()


async def test_a_silent_connection_is_dropped_by_heartbeat_timeout(
    fake_nsqd: Callable[[Script], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """nsqd stops sending anything (no heartbeats) yet keeps the socket open: after two
    heartbeat intervals the reader drops it and reconnects, although lookupd is polled only
    once an hour and still names that nsqd."""

    async def script(client: FakeClient) -> None:
        if client.number == 0:
            client.heartbeats_on = False
        else:
            client.send_message(GOOD_ID, b"after the silence")

    caplog.set_level(logging.WARNING, logger="svc.nsq.reader")
    fake = await fake_nsqd(script)
    got: list[bytes] = []
    reader = consumer(
        [fake.lookupd_url], got, heartbeat_interval_ms=1000, lookupd_poll_interval=3600
    )
    try:
        await eventually(lambda: len(fake.subscribed()) == 1, what="subscribed")
        # 2 intervals of silence, plus scheduling slack on a loaded machine.
        await eventually(lambda: len(fake.subscribed()) == 2, timeout=10, what="a new connection")
        await eventually(lambda: got == [b"after the silence"], what="a message on it")
        assert fake.clients[0].closed.is_set()
        assert reader.heartbeat_timeouts == 1 and reader.lookups == 1
        assert "nothing received for" in caplog.text
    finally:
        await reader.close()


async def test_answered_heartbeats_keep_the_connection(
    fake_nsqd: Callable[[Script], Any],
) -> None:
    """The timeout counts silence, not time: a connection that hears heartbeats stays."""

    async def script(client: FakeClient) -> None:
        return None

    fake = await fake_nsqd(script)
    reader = consumer([fake.lookupd_url], [], heartbeat_interval_ms=1000)
    try:
        # Four heartbeats span twice the timeout; each was answered with NOP.
        await eventually(lambda: reader.heartbeats >= 4, timeout=15, what="four heartbeats")
        assert fake.clients[0].commands.count(b"NOP") >= 4
        assert reader.connects == 1 and reader.heartbeat_timeouts == 0
    finally:
        await reader.close()


async def test_lookupds_are_polled_at_once(fake_nsqd: Callable[[Script], Any]) -> None:
    """One nsqlookupd hangs on every request (for up to the 30s lookupd timeout): the other's
    producer is connected while that request is still open, not after it timed out."""

    async def script(client: FakeClient) -> None:
        return None

    fake = await fake_nsqd(script)
    silent = await SilentServer().start()
    reader = consumer([silent.url, fake.lookupd_url], [], lookupd_timeout=30.0)
    try:
        await eventually(lambda: reader.connected == 1, timeout=10, what="connected")
        assert silent.accepted == 1 and silent.open == 1  # the first request still hangs
    finally:
        await reader.close()
        await silent.stop()


async def test_set_lookupds_polls_the_new_list_at_once(
    fake_nsqd: Callable[[Script], Any],
) -> None:
    """A reader started with a lookupd that knows no producer finds the producer of a
    lookupd added later without waiting for its (hour-long) poll interval."""

    async def script(client: FakeClient) -> None:
        return None

    fake = await fake_nsqd(script)
    silent = await SilentServer().start()
    reader = consumer([silent.url], [], lookupd_poll_interval=3600, lookupd_timeout=0.5)
    try:
        await eventually(lambda: silent.accepted == 1, what="the first lookupd asked")
        reader.set_lookupds([fake.lookupd_url])
        await eventually(lambda: reader.connected == 1, timeout=10, what="connected")
        assert reader.lookupds == [fake.lookupd_url]
    finally:
        await reader.close()
        await silent.stop()
