"""The table of Consul's refusals (dcy._answers): each entry consistent with itself. The
real agent's words are checked against it in tests/integration/test_contract.py."""

from __future__ import annotations

import re

import pytest

from dcy import SessionInvalid
from dcy._answers import REFUSALS, Refusal, classify


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r.core.split("{")[0].strip())
def test_each_refusal_classifies_its_own_wording(refusal: Refusal) -> None:
    """Consul's wording, fields filled with awkward values, comes back as the entry's error
    with the fields it carries; also with a prefix, as a forwarding agent adds one."""
    fields = {name: f"x'\"{name} y" for name in re.findall(r"\{(\w+)\}", refusal.wording)}
    for text in (refusal.answer(**fields), "rpc error making call: " + refusal.answer(**fields)):
        error = classify(refusal.status, text, operation="PUT /v1/x", address="a")
        assert type(error) is refusal.error and not error.transient
        for name, value in fields.items():
            if hasattr(error, name):
                assert getattr(error, name) == value


def test_a_refusal_under_another_status_is_not_taken_for_it() -> None:
    """The status is part of the match: a 500 'Session id ... not found' is an outage."""
    error = classify(500, "Session id 'abc' not found", operation="PUT /v1/x", address="a")
    assert error.transient


def test_the_core_must_be_part_of_the_wording() -> None:
    """A table entry whose core is not in its wording is refused at import."""
    with pytest.raises(ValueError, match="not part of"):
        Refusal(500, "one thing", "another", REFUSALS[0].error)


def test_a_refusal_carries_only_its_own_field() -> None:
    """Each typed refusal takes the one field it declares; another is a mistake."""
    assert SessionInvalid("gone", session_id="s1", status=404).session_id == "s1"
    with pytest.raises(TypeError, match="no field 'check_id'"):
        SessionInvalid("gone", check_id="c1")
