"""What changed between two answers of a wide query, decoded from the bytes that differ.

A change detector's answer is a JSON array of objects (every check of a datacenter, every
key under a folder) of which one change touches an entry or two. Decoding and walking the
whole array at every wake-up costs what the answer weighs (2.3 MB, 5,000 checks at 1,000
services × 5 instances); this costs what changed:

* the equal head and tail of the two answers are found by comparing fixed-size slices
  (``bytes`` equality is a ``memcmp``), halving the size at the first difference;
* the differing region is widened to whole entries. Every top-level entry of one answer
  starts with the same bytes up to its first key: whitespace, ``{``, the key (Consul
  encodes each entry from the same struct; pretty-printed answers also indent the same
  way). That "entry marker" is learned from the answer's first entry, and an entry
  boundary is a ``,`` followed by it. It cannot occur inside a JSON string (a raw ``"``
  there is always escaped), and the entries dcy reads here nest no list of objects that
  starts with the same key; a boundary found wrongly would still cut a region that does
  not decode, or entries without that first key (refused here), or without the fields
  the caller checks each entry for;
* only those regions of the old and the new answer are decoded.

``None`` means "decode it all": no array of objects, the markers differ, a region that
does not decode. Correctness never rests on the shortcut.
"""

from __future__ import annotations

from typing import Any

import orjson

# First slice size when comparing: big enough that a 2 MB answer takes a few dozen
# comparisons, halved down to one byte around the first difference.
_CHUNK = 1 << 16


def common_prefix(old: bytes, new: bytes) -> int:
    """How many leading bytes ``old`` and ``new`` share."""
    limit = min(len(old), len(new))
    size, done = _CHUNK, 0
    while size:
        while done + size <= limit and old[done : done + size] == new[done : done + size]:
            done += size
        size //= 2
    return done


def common_suffix(old: bytes, new: bytes, limit: int) -> int:
    """How many trailing bytes ``old`` and ``new`` share, at most ``limit``."""
    end_old, end_new = len(old), len(new)
    size, done = _CHUNK, 0
    while size:
        while done + size <= limit:
            old_end, new_end = end_old - done, end_new - done
            if old[old_end - size : old_end] != new[new_end - size : new_end]:
                break
            done += size
        size //= 2
    return done


def entry_marker(body: bytes) -> bytes | None:
    """The bytes the first entry of a JSON array of objects starts with, up to the end of
    its first key (``{"Node"``, or ``\\n    {\\n        "Node"`` pretty-printed); None for
    an empty array or anything else."""
    if not body.startswith(b"["):
        return None
    quote = body.find(b'"', 1)
    if quote < 0 or body[1:quote].strip() != b"{":
        return None
    end = body.find(b'"', quote + 1)
    if end < 0 or b"\\" in body[quote:end]:
        return None
    return body[1 : end + 1]


def changed_entries(old: bytes, new: bytes) -> tuple[list[Any], list[Any]] | None:
    """The entries of ``old`` and of ``new`` (two answers, JSON arrays of objects) around
    where they differ, decoded: every entry outside them is the same, byte for byte, at the
    same place in both. Entries left unchanged may be among them (the caller compares).
    None when this cannot be told: decode both whole instead."""
    if old == new:
        return [], []
    marker = entry_marker(old)
    if marker is None or entry_marker(new) != marker:
        return None
    boundary = b"," + marker
    head = common_prefix(old, new)
    tail = common_suffix(old, new, min(len(old), len(new)) - head)
    # Back to the start of an entry lying in the common head: the same place in both.
    comma = old.rfind(boundary, 0, head)
    start = comma + 1 if comma >= 0 else 1
    # On to the end of an entry lying in the common tail: the same distance from the end.
    differs_until = len(old) - tail
    comma = old.find(boundary, differs_until)
    if comma >= 0:
        back = len(old) - comma
    else:
        close = old.rfind(b"]")
        if close < differs_until:
            return None
        back = len(old) - close
    try:
        before = orjson.loads(b"[" + old[start : len(old) - back] + b"]")
        after = orjson.loads(b"[" + new[start : len(new) - back] + b"]")
    except orjson.JSONDecodeError:
        return None
    # Every entry an object with the marker's key: else a boundary was not one.
    first_key = marker[marker.index(b'"') + 1 : -1].decode()
    for entries in (before, after):
        if not all(isinstance(e, dict) and first_key in e for e in entries):
            return None
    return before, after
