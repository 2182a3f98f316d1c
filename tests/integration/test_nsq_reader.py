"""svc._nsq_reader.NsqReader against a real nsqd and nsqlookupd: batches finished once,
requeued on failure, redelivered when a connection dies, RDY respected, heartbeats answered."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import struct
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from dcy import Backoff
from svc._nsq import BatchPublisher
from svc._nsq_reader import BatchHandler, NsqReader
from tests.harness import NsqCluster, eventually

pytestmark = pytest.mark.integration
TOPIC, CHANNEL = "readings", "tests"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def publish(http: aiohttp.ClientSession, nsq: NsqCluster, bodies: list[bytes]) -> None:
    async with http.post(
        f"http://{nsq.nsqd_http}/mpub", params={"topic": TOPIC}, data=b"\n".join(bodies)
    ) as response:
        assert response.status == 200, await response.text()


async def channel_stats(
    http: aiohttp.ClientSession, nsq: NsqCluster, name: str = CHANNEL
) -> dict[str, Any]:
    async with http.get(f"http://{nsq.nsqd_http}/stats", params={"format": "json"}) as response:
        stats = await response.json()
    for topic in stats.get("topics", []):
        for channel in topic["channels"] if topic["topic_name"] == TOPIC else []:
            if channel["channel_name"] == name:
                return dict(channel)
    return {}


def reader(nsq: NsqCluster, handler: BatchHandler, **options: Any) -> NsqReader:
    options.setdefault("lookupd_poll_interval", 0.5)
    return NsqReader(TOPIC, CHANNEL, [f"http://{nsq.lookupd_http}"], handler, **options).start()


def bodies(count: int, prefix: str = "m") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(count)]


async def client_ready_counts(
    http: aiohttp.ClientSession, nsq: NsqCluster, expected: list[int], channel: str = CHANNEL
) -> bool:
    """Whether the channel's clients have these RDY counts, as nsqd itself reports them."""
    stats = await channel_stats(http, nsq, channel)
    return sorted(c["ready_count"] for c in stats.get("clients", [])) == expected


async def settled(http: aiohttp.ClientSession, nsq: NsqCluster) -> bool:
    stats = await channel_stats(http, nsq)
    return bool(stats) and stats["depth"] == 0 and stats["in_flight_count"] == 0


async def test_two_consumers_receive_every_message_once(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """3,000 messages on one channel, two readers: each message handled exactly once."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    seen: Counter[bytes] = Counter()
    per_reader: list[int] = [0, 0]

    def counting(index: int) -> BatchHandler:
        def handle(batch: list[bytes]) -> None:
            seen.update(batch)
            per_reader[index] += len(batch)

        return handle

    readers = [reader(nsq, counting(0)), reader(nsq, counting(1))]
    await eventually(lambda: all(r.connected == 1 for r in readers), what="both readers connected")
    await publish(http, nsq, bodies(3000))
    await eventually(lambda: sum(seen.values()) >= 3000, what="3,000 messages handled")
    await eventually(lambda: settled(http, nsq), what="every message finished")
    for r in readers:
        await r.close()
    assert set(seen) == set(bodies(3000))
    assert max(seen.values()) == 1
    assert all(per_reader), per_reader


async def test_failed_batch_is_requeued_then_finished(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """A handler that raises gets its messages again (REQ); once it succeeds they are done."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    failed: set[bytes] = set()
    done: list[bytes] = []

    async def flaky(batch: list[bytes]) -> None:
        if not failed.issuperset(batch):
            failed.update(batch)
            raise RuntimeError("not this time")
        done.extend(batch)

    consumer = reader(nsq, flaky, handler_backoff=Backoff(base=0.01, cap=0.02))
    await publish(http, nsq, bodies(100))
    await eventually(lambda: len(set(done)) == 100, what="every message handled successfully")
    await eventually(lambda: settled(http, nsq), what="every message finished")
    stats = await channel_stats(http, nsq)
    await consumer.close()
    assert failed == set(bodies(100))
    assert stats["requeue_count"] >= 1


async def test_lost_connection_messages_go_to_the_other_consumer(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """A connection dropped mid-batch: the messages it never finished reach another reader."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    release = asyncio.Event()
    stuck: list[bytes] = []
    rescued: list[bytes] = []

    async def hold(batch: list[bytes]) -> None:
        stuck.extend(batch)
        await release.wait()

    def take(batch: list[bytes]) -> None:
        rescued.extend(batch)

    # A short message timeout: nsqd gives a dead client's messages out again after it.
    victim = reader(nsq, hold, max_in_flight=50, msg_timeout_ms=1000)
    await eventually(lambda: victim.connected == 1, what="victim connected")
    await publish(http, nsq, bodies(50))
    await eventually(lambda: len(stuck) == 50, what="the victim holding every message")
    victim.set_max_in_flight(0)  # it reconnects; the rescue must come from the other reader
    victim.abort_connections()
    rescuer = reader(nsq, take)
    await eventually(lambda: len(rescued) >= 50, what="the held messages delivered again")
    release.set()
    await eventually(lambda: settled(http, nsq), what="every message finished")
    await victim.close()
    await rescuer.close()
    assert sorted(rescued) == sorted(bodies(50))


async def test_unfinished_messages_never_exceed_max_in_flight(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """With max_in_flight 10, no more than 10 messages are ever in the handlers at once."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    await publish(http, nsq, bodies(200))
    holding = 0
    most = 0
    handled = 0

    async def slow(batch: list[bytes]) -> None:
        nonlocal holding, most, handled
        holding += len(batch)
        most = max(most, holding)
        await asyncio.sleep(0.02)
        holding -= len(batch)
        handled += len(batch)

    consumer = reader(nsq, slow, max_in_flight=10)
    await eventually(lambda: handled >= 200, what="200 messages handled")
    await consumer.close()
    assert most == 10


async def test_heartbeats_keep_an_idle_connection(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """With 1s heartbeats, three heartbeats later the first connection is up and working."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    got: list[bytes] = []
    consumer = reader(nsq, got.extend, heartbeat_interval_ms=1000)
    await eventually(lambda: consumer.connected == 1, what="connected")
    # nsqd drops a client that stays silent for two heartbeats: three answered span that.
    await eventually(lambda: consumer.heartbeats >= 3, what="three heartbeats answered")
    await publish(http, nsq, [b"still there"])
    await eventually(lambda: got == [b"still there"], what="the message after the silence")
    assert consumer.connects == 1
    await consumer.close()


async def test_max_in_flight_zero_stops_delivery(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """set_max_in_flight(0) stops new messages; raising it again resumes them."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    got: list[bytes] = []
    consumer = reader(nsq, got.extend)
    await publish(http, nsq, bodies(10, "a"))
    await eventually(lambda: len(got) == 10, what="the first messages")
    consumer.set_max_in_flight(0)
    await eventually(lambda: client_ready_counts(http, nsq, [0]), what="nsqd applied RDY 0")
    await publish(http, nsq, bodies(10, "b"))

    async def waiting_in_channel() -> bool:
        stats = await channel_stats(http, nsq)
        return bool(stats["depth"] == 10 and stats["in_flight_count"] == 0)

    # nsqd only hands a message to a client whose RDY allows it; with RDY 0 applied (as nsqd
    # itself reports) every new message stays in the channel, and the stats say so.
    await eventually(waiting_in_channel, what="the new messages waiting in the channel")
    assert got == bodies(10, "a")
    consumer.set_max_in_flight(100)
    await eventually(lambda: len(got) == 20, what="the held-back messages")
    await consumer.close()


async def test_close_finishes_what_it_handled(nsq: NsqCluster, http: aiohttp.ClientSession) -> None:
    """close() during slow handlers waits for them and finishes their messages: nothing
    handled comes back to the next reader, nothing unhandled is lost."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    await publish(http, nsq, bodies(100))
    first: list[bytes] = []

    async def slow(batch: list[bytes]) -> None:
        await asyncio.sleep(0.3)
        first.extend(batch)

    consumer = reader(nsq, slow, max_in_flight=20)
    await eventually(lambda: len(first) > 0, what="handling under way")
    await consumer.close()
    handled = list(first)
    stats = await channel_stats(http, nsq)
    assert stats["in_flight_count"] == 0 and stats["requeue_count"] == 0
    second: list[bytes] = []
    follower = reader(nsq, second.extend)
    await eventually(lambda: len(handled) + len(second) >= 100, what="the rest delivered")
    await eventually(lambda: settled(http, nsq), what="every message finished")
    await follower.close()
    assert sorted(handled + second) == sorted(bodies(100))


async def test_producer_found_after_start_and_after_restart(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """A reader started before the topic exists finds its nsqd later, and reconnects to it
    after nsqd restarts."""
    got: list[bytes] = []
    consumer = reader(nsq, got.extend)
    await eventually(lambda: consumer.lookups >= 1, what="lookupd answered")
    assert consumer.connected == 0  # it named no producer
    await nsq.create_channel(http, TOPIC, CHANNEL)
    await publish(http, nsq, [b"first"])
    await eventually(lambda: got == [b"first"], what="the message from the new producer")
    assert nsq.nsqd is not None
    nsq.nsqd.stop()
    await eventually(lambda: consumer.connected == 0, what="the connection gone")
    nsq.start_nsqd()
    await eventually(lambda: consumer.connected == 1, what="connected again")
    await publish(http, nsq, [b"second"])
    await eventually(lambda: got == [b"first", b"second"], what="the message after the restart")
    assert consumer.connects == 2
    await consumer.close()


async def test_publish_many_resolves_once_every_chunk_is_accepted(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """publish_many over several /mpub chunks resolves after all of them; a later publish
    waits for its own chunk; the reader then gets every message once."""
    await nsq.create_channel(http, TOPIC, CHANNEL)

    async def nsqd_url() -> str:
        return f"http://{nsq.nsqd_http}"

    publisher = BatchPublisher(http, nsqd_url, max_batch=1000)
    many = publisher.publish_many(TOPIC, bodies(2500))
    one = publisher.publish_nowait(TOPIC, b"last")
    await asyncio.gather(many, one)
    assert publisher.published == 2501
    got: Counter[bytes] = Counter()
    consumer = reader(nsq, got.update)
    await eventually(lambda: sum(got.values()) >= 2501, what="every published message")
    await consumer.close()
    await publisher.aclose()
    assert set(got) == {*bodies(2500), b"last"} and max(got.values()) == 1


async def test_a_batch_in_hand_is_touched_past_the_message_timeout(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """A handler still working long after the message timeout (1s): the reader touches its
    messages every half timeout, so nsqd neither times them out nor delivers them again.

    nsqd looks for timed-out messages only on channels its scan loop has picked up (it
    refreshes that list every 5s), so a control client on a second channel of the topic,
    which never finishes nor touches its message, shows when timeouts are being enforced."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    release = asyncio.Event()
    calls: list[list[bytes]] = []

    async def slow(batch: list[bytes]) -> None:
        calls.append(batch)
        await release.wait()

    consumer = reader(nsq, slow, msg_timeout_ms=1000)
    control = await hold_without_touching(nsq, "control")
    try:
        # Subscribed with RDY 1 before the publish: the control channel gets its copy.
        await eventually(
            lambda: client_ready_counts(http, nsq, [1], "control"), what="the control client ready"
        )
        await publish(http, nsq, [b"long job"])
        await eventually(lambda: calls == [[b"long job"]], what="the message in hand")

        async def control_timed_out_twice() -> bool:
            stats = await channel_stats(http, nsq, "control")
            return bool(stats) and stats["timeout_count"] >= 2

        # Two timeouts of the control message: nsqd enforced timeouts for over a second while
        # the reader's message was in hand.
        await eventually(control_timed_out_twice, what="timeouts enforced on the topic's channels")
        release.set()
        await eventually(lambda: settled(http, nsq), what="the message finished")
        stats = await channel_stats(http, nsq)
    finally:
        control.close()
        await consumer.close()
    assert calls == [[b"long job"]]
    assert stats["timeout_count"] == 0 and stats["requeue_count"] == 0
    assert consumer.touches >= 2


async def hold_without_touching(nsq: NsqCluster, channel: str) -> asyncio.StreamWriter:
    """A raw client on ``channel`` with a 1s message timeout that takes one message at a time
    and never answers for it."""
    host, port = nsq.nsqd_tcp.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"msg_timeout": 1000}).encode()
    writer.write(b"  V2IDENTIFY\n" + struct.pack(">l", len(body)) + body)
    writer.write(f"SUB {TOPIC} {channel}\nRDY 1\n".encode())
    await writer.drain()
    return writer


async def test_failures_back_off_with_rdy_zero_then_restore_it(
    nsq: NsqCluster, http: aiohttp.ClientSession
) -> None:
    """A handler that fails three times in a row: each failure stops delivery (nsqd reports
    RDY 0) for a delay that grows under the policy, and the failed message comes back only
    after it; the first success restores the full RDY."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    policy = Backoff(base=0.5, cap=5.0)
    loop = asyncio.get_running_loop()
    calls: list[float] = []

    def failing_thrice(batch: list[bytes]) -> None:
        calls.append(loop.time())
        if len(calls) <= 3:
            raise RuntimeError(f"failure {len(calls)}")

    consumer = reader(nsq, failing_thrice, max_in_flight=4, handler_backoff=policy)
    await eventually(lambda: client_ready_counts(http, nsq, [4]), what="RDY 4 at the start")
    await publish(http, nsq, [b"flaky"])
    # The third pause lasts at least a second: nsqd must show RDY 0 during it.
    await eventually(lambda: len(calls) == 3, what="three failures")
    await eventually(lambda: client_ready_counts(http, nsq, [0]), what="RDY 0 while backing off")
    await eventually(lambda: len(calls) == 4, what="the fourth delivery", timeout=30)
    await eventually(lambda: client_ready_counts(http, nsq, [4]), what="RDY 4 again")
    await eventually(lambda: settled(http, nsq), what="the message finished")
    stats = await channel_stats(http, nsq)
    await consumer.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    # Failure n pauses for a delay drawn from [ceiling/2, ceiling], ceiling = 0.5 * 2**(n-1):
    # at least 0.25s, 0.5s, 1s (a fixed 100ms requeue would show gaps of about 0.1s).
    assert all(gap >= least for gap, least in zip(gaps, (0.25, 0.5, 1.0), strict=True)), gaps
    assert stats["requeue_count"] == 3 and stats["timeout_count"] == 0
    assert not consumer.backing_off and consumer.backoffs == 3


@pytest.mark.parametrize(("how", "kept"), [("SIGTERM", 10), ("SIGKILL", 0)])
async def test_what_nsqd_keeps_across_a_restart(
    nsq: NsqCluster, http: aiohttp.ClientSession, how: str, kept: int
) -> None:
    """Ten messages wait in a channel nobody consumes: nsqd stopped cleanly writes them to
    disk and has them again after its restart; killed, it loses them all (it keeps queues
    in memory up to --mem-queue-size, 10,000 by default). What a crash may lose is what nsqd
    held: accepted and not yet finished by a consumer."""
    await nsq.create_channel(http, TOPIC, CHANNEL)
    await publish(http, nsq, bodies(10))
    await eventually(lambda: channel_depth(http, nsq, 10), what="ten messages waiting")
    assert nsq.nsqd is not None
    nsq.nsqd.stop(getattr(signal, how))
    nsq.start_nsqd()
    assert (await channel_stats(http, nsq)).get("depth", 0) == kept


async def channel_depth(http: aiohttp.ClientSession, nsq: NsqCluster, depth: int) -> bool:
    return (await channel_stats(http, nsq)).get("depth") == depth
