"""ServiceQuery.parse, service-name validation, and the records queries resolve to."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dcy import Check, Instance, InvalidName, ServiceQuery
from dcy._dns import DnsResolver
from dcy._query import STATES, aggregate_status, validate_service_name
from dcy._specs import HealthServiceSpec

# -- parse: the forms that must work ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("worker", ServiceQuery("worker")),
        ("  worker  ", ServiceQuery("worker")),
        ("v2.worker", ServiceQuery("worker", tag="v2")),
        ("worker@dc2", ServiceQuery("worker", datacenter="dc2")),
        ("v2.worker@dc2", ServiceQuery("worker", tag="v2", datacenter="dc2")),
        ("worker|warning", ServiceQuery("worker", states=frozenset({"warning"}))),
        (
            "v2.worker@dc2|passing,warning",
            ServiceQuery("worker", "v2", "dc2", frozenset({"passing", "warning"})),
        ),
        (
            "worker|passing, warning",
            ServiceQuery("worker", states=frozenset({"passing", "warning"})),
        ),
        ("worker|any", ServiceQuery("worker", states=STATES)),
        ("statsd-exporter_1", ServiceQuery("statsd-exporter_1")),
        ("a.b.worker", ServiceQuery("worker", tag="a.b")),
    ],
)
def test_parse_template_forms(text: str, expected: ServiceQuery) -> None:
    """consul-template's [tag.]name[@dc][|states] parses into name, tag, dc and states."""
    assert ServiceQuery.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("worker.service.sd", ServiceQuery("worker")),
        ("worker.service.sd.", ServiceQuery("worker")),
        ("WORKER.service.SD", ServiceQuery("WORKER")),
        ("v2.worker.service.sd", ServiceQuery("worker", tag="v2")),
        ("worker.service.dc2.sd", ServiceQuery("worker", datacenter="dc2")),
        ("v2.worker.service.dc2.sd.", ServiceQuery("worker", tag="v2", datacenter="dc2")),
        ("_worker._v2.service.sd", ServiceQuery("worker", tag="v2")),
        ("_worker._tcp.service.sd", ServiceQuery("worker")),
        ("_worker._udp.service.dc2.sd", ServiceQuery("worker", datacenter="dc2")),
    ],
)
def test_parse_dns_forms(text: str, expected: ServiceQuery) -> None:
    """Consul DNS names (plain, tagged, with datacenter, RFC 2782, trailing dot) parse."""
    assert ServiceQuery.parse(text) == expected


def test_parse_dns_form_uses_the_given_domain() -> None:
    """The DNS form is recognised for the agent's domain, not a hard-coded one."""
    assert ServiceQuery.parse("worker.service.consul", domain="consul") == ServiceQuery("worker")
    assert ServiceQuery.parse("worker.service.dc3.consul.", domain="consul.") == ServiceQuery(
        "worker", datacenter="dc3"
    )


def test_states_any_and_passing_share_one_watch() -> None:
    """Health states are filtered locally, so they are not part of the watch spec."""
    assert HealthServiceSpec.of(ServiceQuery.parse("worker|any")) == HealthServiceSpec.of(
        ServiceQuery.parse("worker")
    )
    assert HealthServiceSpec.of(ServiceQuery.parse("v2.worker@dc2")) == HealthServiceSpec(
        "worker", "v2", "dc2"
    )
    # The client's datacenter fills in only where the query names none.
    assert HealthServiceSpec.of(ServiceQuery.parse("worker"), datacenter="dc1").datacenter == "dc1"
    assert HealthServiceSpec.of(ServiceQuery.parse("worker@dc2"), datacenter="dc1").datacenter == (
        "dc2"
    )


def test_one_health_filter_and_states_replaced_not_reparsed() -> None:
    """admits() is the health filter; with_states() swaps states on a parsed query."""
    query = ServiceQuery.parse("v2.worker@dc2")
    assert query.admits("passing") and not query.admits("warning")
    wider = query.with_states("passing,warning")
    assert (wider.name, wider.tag, wider.datacenter) == ("worker", "v2", "dc2")
    assert wider.admits("warning") and not wider.admits("critical")
    assert query.with_states("any").admits("maintenance")
    with pytest.raises(InvalidName, match="unknown health state 'bogus'"):
        query.with_states("bogus")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("worker.service.sd", ServiceQuery("worker")),
        ("v2.worker.service.dc2.sd.", ServiceQuery("worker", "v2", "dc2")),
        ("worker", None),
        ("example.com", None),
        ("service.example.com", None),
    ],
)
def test_parse_dns_tells_the_dns_form_apart(text: str, expected: ServiceQuery | None) -> None:
    """parse_dns answers None for anything not in Consul's DNS form (one detector)."""
    assert ServiceQuery.parse_dns(text, domain="sd") == expected


@pytest.mark.parametrize(
    ("query", "text"),
    [
        (ServiceQuery("worker"), "worker"),
        (ServiceQuery("worker", "v2", "dc2"), "v2.worker@dc2"),
        (ServiceQuery("worker", states=STATES), "worker|any"),
        (
            ServiceQuery("worker", states=frozenset({"warning", "passing"})),
            "worker|passing,warning",
        ),
    ],
)
def test_str_is_the_canonical_template_form(query: ServiceQuery, text: str) -> None:
    """str(query) writes the template form with sorted states, 'any' for all of them."""
    assert str(query) == text


# -- parse: clear errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "wor ker",
        "worker!",
        "worker@",
        "@dc1",
        "worker@dc1@dc2",
        ".worker",
        "-worker",
        "worker|healthy",
        "worker|PASSING",
        "worker|",
        "worker|,",
        "worker|any,passing",
        "worker|passing|warning",
        "a.b.worker.service.sd",
        "worker.service.dc1.extra.sd",
        "service.sd",
        "worker.service..sd",
        "worker.service.d$c.sd",
        "wo$rker.service.sd",
        "a\n.service.sd",
    ],
)
def test_malformed_queries_raise_invalid_name_quoting_the_input(text: str) -> None:
    """A malformed query raises InvalidName (a ValueError) whose message quotes the input."""
    with pytest.raises(InvalidName) as caught:
        ServiceQuery.parse(text)
    assert isinstance(caught.value, ValueError)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_query_raises_invalid_name(text: str) -> None:
    """An empty or blank query is refused with a message that says it is empty."""
    with pytest.raises(InvalidName, match="empty"):
        ServiceQuery.parse(text)


@pytest.mark.parametrize("value", [None, 42, ["worker"], b"worker"])
def test_non_string_query_raises_invalid_name(value: Any) -> None:
    """A query that is not a str (even an unhashable one) raises InvalidName, not TypeError."""
    with pytest.raises(InvalidName, match="must be a string"):
        ServiceQuery.parse(value)


def test_any_combined_with_a_state_names_the_problem() -> None:
    """'any,passing' is refused because 'any' cannot be combined."""
    with pytest.raises(InvalidName, match="'any' cannot be combined"):
        ServiceQuery.parse("worker|any,passing")


# -- parse: properties -------------------------------------------------------------------------

_name = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_\-]{0,20}\Z")
_tag = st.from_regex(r"\A[A-Za-z0-9_=:\-./]{1,20}\Z")
_dc = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.\-]{0,15}\Z")
_states = st.one_of(
    st.just(STATES), st.frozensets(st.sampled_from(sorted(STATES)), min_size=1, max_size=4)
)
_queries = st.builds(
    ServiceQuery, name=_name, tag=st.none() | _tag, datacenter=st.none() | _dc, states=_states
)


def _looks_like_dns_form(text: str, domain: str = "sd") -> bool:
    body = text.rstrip(".")
    return body.lower().endswith("." + domain) and "service" in body.split("|")[0].split(".")


@given(_queries)
def test_str_round_trips_through_parse(query: ServiceQuery) -> None:
    """For any valid query, parse(str(query)) gives the same query back."""
    text = str(query)
    # "service.sd" as a tag.name pair is genuinely ambiguous with the DNS form.
    assume(not _looks_like_dns_form(text))
    assert ServiceQuery.parse(text) == query


_label = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_\-]{0,15}\Z")


@given(name=_label, tag=st.none() | _label, dc=st.none() | _label, dot=st.booleans())
def test_dns_form_parses_for_any_labels(
    name: str, tag: str | None, dc: str | None, dot: bool
) -> None:
    """Any [tag.]name.service[.dc].sd[.] made of DNS labels parses into its parts."""
    assume(name.lower() != "service" and (tag or "").lower() != "service")
    text = ".".join(p for p in (tag, name, "service", dc, "sd") if p) + ("." if dot else "")
    assert ServiceQuery.parse(text) == ServiceQuery(name, tag, dc)


@given(st.text(max_size=40))
def test_parse_raises_only_invalid_name_on_arbitrary_text(text: str) -> None:
    """Whatever the text, parse returns a query or raises InvalidName; nothing else."""
    try:
        query = ServiceQuery.parse(text)
    except InvalidName:
        return
    assert query.name
    assert query.states and query.states <= STATES


@given(st.text(alphabet=string.printable + "é€\x00", max_size=70))
def test_validate_service_name_accepts_exactly_dns_labels(text: str) -> None:
    """A registrable name is 1-63 ASCII letters, digits and dashes, no dash at either end."""
    allowed = set(string.ascii_letters + string.digits + "-")
    is_label = (
        0 < len(text) <= 63
        and set(text) <= allowed
        and not text.startswith("-")
        and not text.endswith("-")
    )
    if is_label:
        assert validate_service_name(text) == text
    else:
        with pytest.raises(InvalidName):
            validate_service_name(text)


@pytest.mark.parametrize("name", ["a", "worker", "w0rker-2", "x" * 63])
def test_validate_service_name_accepts_labels(name: str) -> None:
    """Plain DNS labels up to 63 characters are accepted unchanged."""
    assert validate_service_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "a_b", "a.b", "x" * 64, "worker\n", "wörker"])
def test_validate_service_name_refuses_non_labels(name: str) -> None:
    """Names that cannot be a DNS label are refused, quoting the name."""
    with pytest.raises(InvalidName) as caught:
        validate_service_name(name)
    assert repr(name) in str(caught.value)


# -- aggregate_status and Instance -------------------------------------------------------------


def _check(status: str, check_id: str = "service:web") -> Check:
    return Check(check_id=check_id, name="c", status=status, node="n1")


_MAINTENANCE = _check("critical", "_service_maintenance:web")


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ([], "passing"),
        ([_check("passing")], "passing"),
        ([_check("passing"), _check("warning")], "warning"),
        ([_check("warning"), _check("critical"), _check("passing")], "critical"),
        ([_check("critical"), _MAINTENANCE], "maintenance"),
        ([_check("passing"), _check("critical", "_node_maintenance")], "maintenance"),
    ],
)
def test_aggregate_status_precedence(checks: list[Check], expected: str) -> None:
    """maintenance beats critical beats warning beats passing."""
    assert aggregate_status(checks) == expected


@given(st.lists(st.sampled_from(["passing", "warning", "critical", "maintenance"]), max_size=6))
def test_aggregate_status_is_the_worst_in_any_order(statuses: list[str]) -> None:
    """The aggregate is the highest-ranked status present, whatever the order of checks."""
    checks = [_MAINTENANCE if status == "maintenance" else _check(status) for status in statuses]
    rank = ["passing", "warning", "critical", "maintenance"]
    expected = max(statuses, key=rank.index, default="passing")
    assert aggregate_status(checks) == expected
    assert aggregate_status(reversed(checks)) == expected


def _entry(service_address: str, node_address: str = "10.0.0.1") -> dict[str, Any]:
    return {
        "Node": {"Node": "n1", "Address": node_address, "Datacenter": "dc1"},
        "Service": {
            "ID": "web-1",
            "Service": "web",
            "Address": service_address,
            "Port": 8080,
            "Tags": ["v2"],
            "Meta": {"zone": "a"},
        },
        "Checks": [
            {"CheckID": "serfHealth", "Name": "Serf", "Status": "passing", "Node": "n1"},
            {"CheckID": "service:web-1", "Status": "warning", "Node": "n1", "ServiceID": "web-1"},
        ],
    }


def test_instance_uses_the_service_address_when_set() -> None:
    """An instance's address is the service's own address when it registered one."""
    instance = Instance.from_health_entry(_entry("10.0.0.9"))
    assert instance.address == "10.0.0.9"
    assert instance.node_address == "10.0.0.1"
    assert instance.hostport == "10.0.0.9:8080"


def test_instance_falls_back_to_the_node_address() -> None:
    """Without a service address, the instance is reached at its node's address."""
    instance = Instance.from_health_entry(_entry(""))
    assert instance.address == "10.0.0.1"


def test_instance_fields_from_a_health_entry() -> None:
    """id, name, port, tags, meta, node, datacenter, checks and status come from the entry."""
    instance = Instance.from_health_entry(_entry("", node_address="::1"))
    assert (instance.id, instance.name, instance.port) == ("web-1", "web", 8080)
    assert instance.tags == ("v2",)
    assert dict(instance.meta) == {"zone": "a"}
    assert (instance.node, instance.datacenter) == ("n1", "dc1")
    assert [c.check_id for c in instance.checks] == ["serfHealth", "service:web-1"]
    assert instance.status == "warning"
    assert instance.hostport == "[::1]:8080"
    with pytest.raises(TypeError):
        instance.meta["zone"] = "b"  # type: ignore[index]


def test_instance_from_a_sparse_entry() -> None:
    """Missing fields become empty values, and an instance without checks is passing."""
    instance = Instance.from_health_entry({})
    assert (instance.id, instance.address, instance.port, instance.tags) == ("", "", 0, ())
    assert instance.status == "passing"


def test_dns_names_refuse_health_states() -> None:
    """Consul DNS cannot select states: a query naming them is refused, not answered for
    other states than it asks for."""
    resolver = DnsResolver("127.0.0.1", 8600, domain="sd")
    assert resolver.name_for("v2.worker@dc2") == "v2.worker.service.dc2.sd."
    assert resolver.name_for(ServiceQuery("worker")) == "worker.service.sd."
    for text in ("worker|any", "worker|passing,warning"):
        with pytest.raises(ValueError, match="cannot select health states"):
            resolver.name_for(text)
