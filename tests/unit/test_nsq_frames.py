"""svc._nsq_frames.parse_frames: valid streams come out whole and in order however they are
cut; random, truncated and hostile streams end in frames, a wait for more bytes, or a
MalformedFrame — never a loop, never an unbounded wait."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svc._nsq_frames import (
    BODY_START,
    FRAME_ERROR,
    FRAME_MESSAGE,
    FRAME_RESPONSE,
    HEADER_SIZE,
    MalformedFrame,
    encode_frame,
    encode_message,
    max_frame_size,
    parse_frames,
)

MAX_SIZE = max_frame_size(4096)
# What the parser reported: ("reply", type, data) or ("message", id, body).
Seen = tuple[Any, ...]

# (kind, data) for replies; (FRAME_MESSAGE, id + body) for messages.
replies = st.tuples(st.sampled_from((FRAME_RESPONSE, FRAME_ERROR)), st.binary(max_size=200))
messages = st.tuples(
    st.just(FRAME_MESSAGE), st.binary(min_size=16, max_size=16), st.binary(max_size=300)
)
frames = st.lists(st.one_of(replies, messages), max_size=20)


def encode(frame: tuple[int, bytes] | tuple[int, bytes, bytes]) -> bytes:
    if frame[0] == FRAME_MESSAGE:
        _, message_id, body = frame  # type: ignore[misc]
        return encode_message(message_id, body)
    kind, data = frame  # type: ignore[misc]
    return encode_frame(kind, data)


def feed(chunks: list[bytes], max_size: int = MAX_SIZE) -> tuple[list[Seen], bytearray]:
    """Feed chunks as a connection would: parse after each, keep what was not consumed."""
    buffer = bytearray()
    seen: list[Seen] = []
    for chunk in chunks:
        buffer += chunk
        parsed = parse_frames(buffer, max_size)
        assert 0 <= parsed.consumed <= len(buffer)
        del buffer[: parsed.consumed]
        seen += [("reply", kind, data) for kind, data in parsed.replies]
        seen += [("message", i, b) for i, b in zip(parsed.ids, parsed.bodies, strict=True)]
    return seen, buffer


def expected(stream: list[tuple[int, bytes] | tuple[int, bytes, bytes]]) -> list[Seen]:
    out: list[Seen] = []
    for frame in stream:
        if frame[0] == FRAME_MESSAGE:
            out.append(("message", frame[1], frame[2]))  # type: ignore[misc]
        else:
            out.append(("reply", frame[0], frame[1]))
    return out


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    edges = [0, *marks, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(frames, st.lists(st.integers(min_value=0), max_size=30))
def test_a_valid_stream_comes_out_whole_however_it_is_cut(
    stream: list[tuple[int, bytes] | tuple[int, bytes, bytes]], points: list[int]
) -> None:
    """Every frame of a valid stream is found once, in order, with nothing left over."""
    data = b"".join(encode(f) for f in stream)
    seen, rest = feed(cut(data, points))
    # Replies and messages found in one pass are reported apart; compare each kind's order.
    assert [s for s in seen if s[0] == "reply"] == [e for e in expected(stream) if e[0] == "reply"]
    assert [s for s in seen if s[0] == "message"] == [
        e for e in expected(stream) if e[0] == "message"
    ]
    assert rest == b""


@given(frames, st.integers(min_value=0))
def test_a_truncated_stream_yields_a_prefix_and_waits(
    stream: list[tuple[int, bytes] | tuple[int, bytes, bytes]], where: int
) -> None:
    """A stream cut anywhere gives the frames before the cut and keeps the partial one."""
    encoded = [encode(f) for f in stream]
    data = b"".join(encoded)
    end = where % (len(data) + 1)
    parsed = parse_frames(data[:end], MAX_SIZE)
    complete = 0
    total = 0
    for frame in encoded:
        if total + len(frame) > end:
            break
        total += len(frame)
        complete += 1
    assert parsed.consumed == total
    assert len(parsed.ids) + len(parsed.replies) == complete


@given(st.lists(st.binary(max_size=64), max_size=30))
def test_random_bytes_end_in_frames_or_a_malformed_frame(chunks: list[bytes]) -> None:
    """Garbage never loops or grows the buffer past one allowed frame: each step consumes
    whole frames, waits for a frame within the bound, or raises MalformedFrame."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        try:
            parsed = parse_frames(buffer, MAX_SIZE)
        except MalformedFrame:
            return
        del buffer[: parsed.consumed]
        if len(buffer) >= HEADER_SIZE:
            size, kind = struct.unpack_from(">ll", buffer)
            assert 4 <= size <= MAX_SIZE and kind in (0, 1, 2)
            assert len(buffer) < 4 + size  # waiting only for the rest of a legal frame


@given(st.integers(min_value=-(2**31), max_value=3), st.binary(max_size=40))
def test_a_size_below_four_is_malformed(size: int, tail: bytes) -> None:
    """Sizes 3 and below, negative ones included (a size <= -4 used to loop forever)."""
    with pytest.raises(MalformedFrame, match=f"frame size {size} is below"):
        parse_frames(struct.pack(">ll", size, FRAME_RESPONSE) + tail, MAX_SIZE)


def test_a_size_past_the_negotiated_maximum_is_malformed_before_its_data_arrives() -> None:
    """A too-large size is refused from the header alone: nothing waits for 2 GB."""
    header = struct.pack(">ll", MAX_SIZE + 1, FRAME_MESSAGE)
    with pytest.raises(MalformedFrame, match="exceeds the negotiated maximum"):
        parse_frames(header, MAX_SIZE)
    assert parse_frames(struct.pack(">ll", MAX_SIZE, FRAME_MESSAGE), MAX_SIZE).consumed == 0


@given(
    st.integers(min_value=3, max_value=2**31 - 1) | st.integers(min_value=-(2**31), max_value=-1)
)
def test_an_unknown_frame_type_is_malformed(kind: int) -> None:
    """Only responses, errors and messages exist."""
    with pytest.raises(MalformedFrame, match=f"unknown frame type {kind}"):
        parse_frames(struct.pack(">ll", 8, kind) + b"data", MAX_SIZE)


@given(st.integers(min_value=0, max_value=BODY_START - 1))
def test_a_message_shorter_than_its_header_is_malformed(length: int) -> None:
    """A message frame needs its timestamp, attempts and id before any body."""
    with pytest.raises(MalformedFrame, match="shorter than its 26-byte header"):
        parse_frames(encode_frame(FRAME_MESSAGE, b"x" * length), MAX_SIZE)


def test_frames_before_a_malformed_one_are_not_delivered() -> None:
    """The whole read is refused: its messages were never finished, nsqd delivers them
    again to a healthy connection."""
    good = encode_message(b"0123456789abcdef", b"body")
    with pytest.raises(MalformedFrame):
        parse_frames(good + struct.pack(">ll", -8, 0), MAX_SIZE)


def test_attempts_are_reported() -> None:
    """The highest delivery count in a read is returned for the warning about retries."""
    data = encode_message(b"a" * 16, b"x", attempts=3) + encode_message(b"b" * 16, b"y", attempts=7)
    parsed = parse_frames(data, MAX_SIZE)
    assert parsed.most_attempts == 7 and parsed.bodies == [b"x", b"y"]
