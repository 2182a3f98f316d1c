"""dcy._array_delta: the entries of two answers around the bytes that differ, compact and
pretty-printed, compared with what decoding both answers whole says changed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from dcy._array_delta import changed_entries, common_prefix, common_suffix, entry_marker

Check = dict[str, Any]


def check(node: str, number: int, *, status: str = "passing", output: str = "") -> Check:
    return {
        "Node": node,
        "CheckID": f"check-{number}",
        "Status": status,
        "Output": output,
        "ServiceID": f"svc{number}",
        "ServiceName": f"svc{number}",
        "ServiceTags": ["a", "b"],
        "Definition": {},
        "CreateIndex": 10 + number,
        "ModifyIndex": 10 + number,
    }


def compact(entries: list[Check]) -> bytes:
    return orjson.dumps(entries)


def pretty(entries: list[Check]) -> bytes:
    # As a dev agent writes it (Go's MarshalIndent, four spaces, then a newline).
    return (json.dumps(entries, indent=4) + "\n").encode()


ENCODINGS = [pytest.param(compact, id="compact"), pytest.param(pretty, id="pretty")]
Encoding = Callable[[list[Check]], bytes]


def key(entry: Check) -> tuple[str, str]:
    return (entry["Node"], entry["CheckID"])


def changes(before: list[Check], after: list[Check]) -> set[tuple[str, str]]:
    """Keys whose entry was added, removed or changed."""
    old = {key(e): e for e in before}
    new = {key(e): e for e in after}
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def many(count: int = 200) -> list[Check]:
    return [check(f"node{n % 7}", n) for n in range(count)]


def edited(entries: list[Check], where: int, how: str) -> list[Check]:
    result = [dict(e) for e in entries]
    if how == "add":
        result.insert(where, check("node-new", 9999))
    elif how == "remove":
        del result[where]
    else:
        result[where] = {**result[where], "Status": "critical", "ModifyIndex": 5000}
    return result


@pytest.mark.parametrize("encode", ENCODINGS)
@pytest.mark.parametrize("how", ["add", "remove", "change"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_the_delta_names_exactly_what_changed(encode: Encoding, how: str, where: str) -> None:
    before = many()
    at = {"start": 0, "middle": len(before) // 2, "end": len(before) - 1}[where]
    if how == "add" and where == "end":
        at = len(before)
    after = edited(before, at, how)
    delta = changed_entries(encode(before), encode(after))
    assert delta is not None
    old, new = delta
    assert changes(old, new) == changes(before, after) != set()
    # Decoded: the entries around the change, not the answer.
    assert len(old) <= 3 and len(new) <= 3


@pytest.mark.parametrize("encode", ENCODINGS)
def test_changes_far_apart_are_all_found(encode: Encoding) -> None:
    before = many()
    after = edited(edited(before, 3, "change"), 190, "remove")
    delta = changed_entries(encode(before), encode(after))
    assert delta is not None
    assert changes(*delta) == changes(before, after)
    assert len(changes(before, after)) == 2


@pytest.mark.parametrize("encode", ENCODINGS)
def test_strings_holding_braces_quotes_and_the_marker_itself(encode: Encoding) -> None:
    tricky = ',{"Node":"x","CheckID":"y"}, }{ \\" "\n    {\n        "Node": '
    before = [check("n1", n, output=tricky if n % 2 else "") for n in range(30)]
    after = [dict(e) for e in before]
    after[15] = {**after[15], "Output": tricky + "!", "ModifyIndex": 99}
    after[16] = {**after[16], "Output": "{", "ModifyIndex": 99}
    delta = changed_entries(encode(before), encode(after))
    assert delta is not None
    assert changes(*delta) == {("n1", "check-15"), ("n1", "check-16")}


@pytest.mark.parametrize("encode", ENCODINGS)
def test_an_equal_answer_has_no_delta_and_an_empty_one_is_decoded_whole(encode: Encoding) -> None:
    before = many(5)
    assert changed_entries(encode(before), encode(before)) == ([], [])
    assert changed_entries(encode([]), encode(before)) is None
    assert changed_entries(encode(before), encode([])) is None
    assert entry_marker(encode([])) is None


def test_the_entry_marker_is_learned_from_the_answer() -> None:
    assert entry_marker(compact(many(2))) == b'{"Node"'
    assert entry_marker(pretty(many(2))) == b'\n    {\n        "Node"'
    assert entry_marker(b'{"Node": 1}') is None  # not an array
    assert entry_marker(b"[1, 2]") is None  # not of objects


def test_answers_of_another_shape_are_decoded_whole() -> None:
    before, after = many(5), edited(many(5), 2, "change")
    # A compact answer after a pretty one: the entries start differently.
    assert changed_entries(pretty(before), compact(after)) is None
    # Entries whose first key differs from the first entry's.
    other = compact(before).replace(b'{"Node":"node3"', b'{"Zone":"node3"', 1)
    assert changed_entries(compact(before), other) is None
    # A cut answer does not decode.
    assert changed_entries(compact(before), compact(after)[:-2]) is None


def test_common_head_and_tail_at_every_size() -> None:
    base = bytes(range(256)) * 1000  # 256 kB: several of the first slices
    for at in (0, 1, 65535, 65536, 100_000, len(base) - 1):
        other = bytearray(base)
        other[at] ^= 0xFF
        assert common_prefix(base, bytes(other)) == at
        assert common_suffix(base, bytes(other), len(base)) == len(base) - at - 1
    assert common_prefix(b"abc", b"abcdef") == 3
    assert common_suffix(b"xyz", b"xyz", 1) == 1
