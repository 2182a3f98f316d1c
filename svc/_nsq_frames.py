"""nsqd's frames, parsed: ``size`` (4 bytes, big-endian, counting what follows it), ``type``
(4 bytes), then ``size - 4`` bytes of data (https://nsq.io/clients/tcp_protocol_spec.html).

:func:`parse_frames` takes every complete frame at the front of a buffer in one pass and
checks each header as soon as its 8 bytes are in, before waiting for the data: a size that
cannot be (below 4, the type's own bytes), a size past what was negotiated, an unknown type,
or a message too short for its own header is a :class:`MalformedFrame`. Past such a header
nothing in the stream can be trusted, so the caller closes the connection. The parser never
waits for more bytes than ``max_size`` allows, so a garbage size cannot make the buffer grow
without bound, and every step consumes at least one whole frame, so it always ends.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FRAME_RESPONSE, FRAME_ERROR, FRAME_MESSAGE = 0, 1, 2
FRAME_TYPES = (FRAME_RESPONSE, FRAME_ERROR, FRAME_MESSAGE)
HEADER = struct.Struct(">ll")
HEADER_SIZE = HEADER.size
_ATTEMPTS = struct.Struct(">H")
# A message frame's data: timestamp (8 bytes), attempts (2), id (16), then the body.
ID_START, BODY_START = 10, 26
# nsqd's default --max-msg-size: the frame bound when nsqd cannot be asked for its own.
DEFAULT_MAX_MSG_SIZE = 1024 * 1024


def max_frame_size(max_msg_size: int) -> int:
    """The largest ``size`` field a frame may carry when messages hold at most
    ``max_msg_size`` bytes: the type, the message header and the body. Responses and errors
    (a JSON IDENTIFY answer, an error name) are far smaller than any allowed message."""
    return 4 + BODY_START + max(max_msg_size, 4096)


class NsqProtocolError(Exception):
    """nsqd answered the handshake with an error, or with something unexpected."""


class MalformedFrame(NsqProtocolError):
    """A frame header no correct nsqd sends: the connection's stream is beyond repair."""


@dataclass(slots=True)
class Frames:
    """What one pass over a buffer found. Messages are kept apart from the other frames so
    that a batch reaches the handler in one call; ``replies`` (responses and errors, as
    ``(type, data)``) keep their order."""

    consumed: int = 0
    ids: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    most_attempts: int = 0
    replies: list[tuple[int, bytes]] = field(default_factory=list)


def parse_frames(buffer: bytes | bytearray, max_size: int) -> Frames:
    """Every complete frame at the front of ``buffer``; ``consumed`` bytes of it were used.
    Raises :class:`MalformedFrame` at the first header that cannot be right."""
    frames = Frames()
    end = len(buffer)
    pos = 0
    view = memoryview(buffer)
    try:
        while end - pos >= HEADER_SIZE:
            size, kind = HEADER.unpack_from(buffer, pos)
            _check_header(size, kind, max_size)
            stop = pos + 4 + size
            if stop > end:
                break
            start = pos + HEADER_SIZE
            if kind == FRAME_MESSAGE:
                attempts = _ATTEMPTS.unpack_from(buffer, start + 8)[0]
                if attempts > frames.most_attempts:
                    frames.most_attempts = attempts
                frames.ids.append(bytes(view[start + ID_START : start + BODY_START]))
                frames.bodies.append(bytes(view[start + BODY_START : stop]))
            else:
                frames.replies.append((kind, bytes(view[start:stop])))
            pos = stop
    finally:
        view.release()
    frames.consumed = pos
    return frames


def _check_header(size: int, kind: int, max_size: int) -> None:
    if size < 4:
        raise MalformedFrame(f"frame size {size} is below the 4 bytes of its type")
    if size > max_size:
        raise MalformedFrame(f"frame size {size} exceeds the negotiated maximum of {max_size}")
    if kind not in FRAME_TYPES:
        raise MalformedFrame(f"unknown frame type {kind} (size {size})")
    if kind == FRAME_MESSAGE and size - 4 < BODY_START:
        raise MalformedFrame(
            f"message frame of {size - 4} bytes is shorter than its {BODY_START}-byte header"
        )


def encode_frame(kind: int, data: bytes) -> bytes:
    """One frame as nsqd writes it (for tests and fakes of nsqd)."""
    return HEADER.pack(len(data) + 4, kind) + data


def encode_message(
    message_id: bytes, body: bytes, *, attempts: int = 1, timestamp: int = 0
) -> bytes:
    """A message frame as nsqd writes it; ``message_id`` is 16 bytes."""
    if len(message_id) != 16:
        raise ValueError(f"an NSQ message id has 16 bytes, not {len(message_id)}")
    data = struct.pack(">qH", timestamp, attempts) + message_id + body
    return encode_frame(FRAME_MESSAGE, data)
