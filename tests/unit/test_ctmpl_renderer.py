"""consul-template syntax in process: the real Go helper, watch values from a dict. What a
render depends on, discovery across passes, the dependency-name mapping, errors with
positions, env policy and timeouts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from dcy._errors import ConsulError
from dcy._kv_specs import KeyPrefixSpec, KeySpec, KeyValue
from dcy._specs import CatalogServicesSpec
from dcy._watch import Snapshot
from dcy.template._env import EnvPolicy
from dcy.template._godeps import (
    GoCatalogNodeSpec,
    GoHealthServiceSpec,
    UnsupportedDependency,
    dependency,
)
from dcy.template._gohelper import GoHelper, HelperError
from dcy.template._gorender import GoTemplateRenderer
from dcy.template._spec import TemplateSpec
from tools.build import require_binary


def entry(node: str, sid: str, port: int, status: str = "passing", address: str = "") -> Any:
    return {
        "Node": {"Node": node, "Address": f"10.0.0.{port % 100}", "ID": f"id-{node}"},
        "Service": {"ID": sid, "Service": "web", "Port": port, "Address": address,
                    "Tags": ["z", "a"]},
        "Checks": [{"Node": node, "CheckID": f"c-{sid}", "Status": status}],
    }  # fmt: skip


class Watches:
    """Watch values by spec, as the runner's snapshot source hands them out."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.asked: list[Any] = []

    def set(self, spec: Any, body: Any) -> None:
        self.values[spec] = Snapshot(spec.decode(body), 1, 0.0)

    def __call__(self, spec: Any) -> Snapshot[Any] | None:
        self.asked.append(spec)
        return self.values.get(spec)


@pytest.fixture
def helper() -> Iterator[GoHelper]:
    h = GoHelper(require_binary("dcy-ctmpl"))
    yield h
    h.close()


def renderer(helper: GoHelper, text: str, **options: Any) -> GoTemplateRenderer:
    spec = TemplateSpec(destination=Path("/tmp/out"), contents=text, syntax="go")
    return GoTemplateRenderer(spec, helper=helper, sandbox=None, local_node="me", **options)


def test_discovery_across_passes_within_one_render(helper: GoHelper) -> None:
    """``services`` then ``service`` of each: when the answers are already watched, one
    render finds, sends and uses them all."""
    watches = Watches()
    watches.set(CatalogServicesSpec(), {"web": ["a"], "db": []})
    watches.set(GoHealthServiceSpec("web"), [entry("n2", "w2", 81), entry("n1", "w1", 80)])
    watches.set(GoHealthServiceSpec("db"), [])
    r = renderer(
        helper, "{{ range services }}{{ range service .Name }}{{ .ID }} {{ end }}{{ end }}"
    )
    outcome = r.render(watches)
    assert outcome.complete and outcome.content == "w1 w2 "
    assert set(outcome.used) == {
        CatalogServicesSpec(),
        GoHealthServiceSpec("web"),
        GoHealthServiceSpec("db"),
    }


def test_service_calls_record_what_consul_templates_own_do(helper: GoHelper) -> None:
    """The helper keeps each ``service`` argument parsed: the same argument twice is one
    dependency, another filter another, an empty name none, and a bad argument fails with
    consul-template's own message, in every render, not only the first."""
    web_ids = '{{ range service "web" }}{{ .ID }}{{ end }}'
    text = web_ids * 2 + '{{ service "web|any" }}{{ service "" }}{{ range services }}{{ end }}'
    render = partial(helper.render, "t1", text=text, err_missing_key=False, callback=no_calls)
    web, every = "health.service(web|passing)", "health.service(web|any)"
    reply = render(data=[])
    assert sorted(reply["used"]) == sorted(reply["missing"]) == ["catalog.services", every, web]
    assert reply["output"] == "[][]"
    # web's answer is in: no longer missing in the next render (each render starts afresh).
    reply = render(data=[(web, json.dumps([entry("n1", "w1", 80)]))])
    assert sorted(reply["used"]) == ["catalog.services", every, web]
    assert sorted(reply["missing"]) == ["catalog.services", every]
    assert reply["output"] == "w1w1[][]"
    for _ in range(2):
        bad = helper.render(
            "t2",
            text='{{ service "web" }}{{ service "a b" }}',
            err_missing_key=False,
            data=[],
            callback=no_calls,
        )
        assert 'health.service: invalid format: "a b"' in bad["error"]


def test_an_unanswered_query_makes_the_render_wait(helper: GoHelper) -> None:
    watches = Watches()
    r = renderer(helper, '{{ range service "web" }}{{ .Address }}{{ end }}')
    outcome = r.render(watches)
    assert not outcome.complete and outcome.waiting == {GoHealthServiceSpec("web")}
    watches.set(GoHealthServiceSpec("web"), [entry("n1", "w1", 80, address="192.0.2.9")])
    outcome = r.render(watches)
    assert outcome.complete and outcome.content == "192.0.2.9"


def test_a_changed_value_is_sent_again_an_unchanged_one_is_not(helper: GoHelper) -> None:
    watches = Watches()
    spec = GoHealthServiceSpec("web")
    watches.set(spec, [entry("n1", "w1", 80)])
    r = renderer(helper, '{{ range service "web|any" }}{{ .ID }}={{ .Status }} {{ end }}')
    assert r.render(watches).content == "w1=passing "
    sent = helper.sent["health.service(web|any)"]
    assert r.render(watches).content == "w1=passing "
    assert helper.sent["health.service(web|any)"] is sent
    watches.set(spec, [entry("n1", "w1", 80, status="critical")])
    assert r.render(watches).content == "w1=critical "


def test_a_render_told_what_changed_reads_only_that(helper: GoHelper) -> None:
    """The runner says which watches have new answers: the others are neither read nor sent
    again, and the outcome still holds every watch the template used with its snapshot."""
    watches = Watches()
    names = ["web", "db", "cache"]
    watches.set(CatalogServicesSpec(), {name: [] for name in names})
    for port, name in enumerate(names, 80):
        watches.set(GoHealthServiceSpec(name), [entry("n1", name, port)])
    r = renderer(
        helper, "{{ range services }}{{ range service .Name }}{{ .Port }} {{ end }}{{ end }}"
    )
    first = r.render(watches)
    assert first.complete and first.content == "82 81 80 "
    watches.asked.clear()
    web = GoHealthServiceSpec("web")
    watches.set(web, [entry("n1", "web", 90)])
    outcome = r.render(watches, changed={web})
    assert outcome.complete and outcome.content == "82 81 90 "
    assert watches.asked == [web]
    assert outcome.used == {**first.used, web: watches.values[web]}
    assert outcome.used is not first.used
    # Nothing changed: the same output, nothing read.
    watches.asked.clear()
    assert r.render(watches, changed=set()).content == "82 81 90 "
    assert watches.asked == []


def test_a_new_helper_gets_all_the_data_again(helper: GoHelper) -> None:
    """The helper died between two renders: the new one holds none of the answers, so the
    render sends them all, whatever the runner says changed."""
    watches = Watches()
    db, web = GoHealthServiceSpec("db"), GoHealthServiceSpec("web")
    watches.set(db, [entry("n1", "d1", 70)])
    watches.set(web, [entry("n1", "w1", 80)])
    r = renderer(helper, '{{ range service "db" }}{{ .Port }}{{ end }} {{ range service "web" }}'
                 "{{ .Port }}{{ end }}")  # fmt: skip
    assert r.render(watches).content == "70 80"
    helper.close(kill=True)
    watches.set(web, [entry("n1", "w1", 81)])
    outcome = r.render(watches, changed={web})
    assert outcome.complete and outcome.content == "70 81"


def test_the_helper_repeats_no_unchanged_lists(helper: GoHelper) -> None:
    """A reply leaves out "used" and "missing" when they did not change: the same lists come
    back, and a changed one replaces them."""
    render = partial(helper.render, "t1", err_missing_key=False, data=[], callback=no_calls)
    first = render(text='{{ key "a" }}{{ keyOrDefault "b" "" }}')
    assert first["used"] == ["kv.block(a)", "kv.get(b)"]
    assert first["missing"] == ["kv.block(a)", "kv.get(b)"]
    second = render(text='{{ key "a" }}{{ keyOrDefault "b" "" }}')
    assert second["used"] is first["used"] and second["missing"] is first["missing"]
    third = render(text='{{ keyOrDefault "b" "" }}', data=[("kv.get(b)", '"x"')])
    assert third == {"output": "x", "used": ["kv.get(b)"], "missing": []}


def test_output_that_is_not_utf8_reads_as_it_did_through_json(helper: GoHelper) -> None:
    """The output travels as raw bytes; each byte that is not UTF-8 still becomes U+FFFD,
    as when the output was a JSON string."""
    text = '{{ "a\\xff\\xfe\\xe2\\x82b ✓" }}'
    reply = helper.render("t1", text=text, err_missing_key=False, data=[], callback=no_calls)
    assert reply["output"] == "a\ufffd\ufffd\ufffd\ufffdb ✓"


def no_calls(call: str, argument: str, default: str | None) -> str:
    raise AssertionError(f"unexpected {call}({argument!r})")


def test_a_missing_key_holds_the_render_back_until_it_exists(helper: GoHelper) -> None:
    watches = Watches()
    watches.set(KeySpec("app/name"), None)
    r = renderer(helper, '[{{ key "app/name" }}] [{{ keyOrDefault "app/name" "dflt" }}]')
    outcome = r.render(watches)
    assert not outcome.complete and outcome.missing_keys == {"kv.block(app/name)"}
    watches.set(KeySpec("app/name"), [{"Key": "app/name", "Value": b"shop"}])
    outcome = r.render(watches)
    assert outcome.complete and outcome.content == "[shop] [shop]"


def test_ls_keys_are_relative_to_the_prefix_as_consul_template_lists_them(
    helper: GoHelper,
) -> None:
    watches = Watches()
    spec = KeyPrefixSpec("app/config")
    watches.values[spec] = Snapshot(
        MappingProxyType(
            {
                "app/config/a": KeyValue("app/config/a", b"1"),
                "app/config/sub/b": KeyValue("app/config/sub/b", b"2"),
                "app/configuration": KeyValue("app/configuration", b"3", flags=7),
            }
        ),
        1,
        0.0,
    )
    r = renderer(
        helper, '{{ range ls "app/config" }}{{ .Key }}={{ .Value }}/{{ .Flags }} {{ end }}'
    )
    assert r.render(watches).content == "a=1/0 uration=3/7 "


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("health.service(prod.v1.web@dc2|passing)", GoHealthServiceSpec("web", "prod.v1", "dc2")),
        ("catalog.services(@dc3)", CatalogServicesSpec("dc3")),
        ("catalog.node", GoCatalogNodeSpec("me")),
        ("catalog.node(n1@dc1)", GoCatalogNodeSpec("n1", "dc1")),
        ("kv.get(a/b@dc1)", KeySpec("a/b", "dc1")),
        ("kv.list(a/)", KeyPrefixSpec("a/")),
    ],
)
def test_dependency_names_map_to_dcy_watches(name: str, spec: Any) -> None:
    assert dependency(name, local_node="me").spec == spec


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("health.service(web~n1|passing)", "~near"),
        ("health.service(web@ns=team|passing)", "ns (namespaces"),
        ("catalog.nodes(@peer=other)", "peer"),
        ("vault.read(secret/x)", "does not watch vault.read"),
    ],
)
def test_what_dcy_does_not_watch_is_refused(name: str, message: str) -> None:
    with pytest.raises(UnsupportedDependency, match=message.replace("(", r"\(")):
        dependency(name, local_node="me")


def test_errors_carry_the_template_name_and_gos_position(helper: GoHelper) -> None:
    r = renderer(helper, "ok\n  {{ index (parseJSON `[1]`) 5 }}")
    outcome = r.render(Watches())
    assert outcome.error is not None
    assert outcome.error.startswith("(inline) → /tmp/out:2:5: at <index (parseJSON `[1]`) 5>")
    assert "index out of range: 5" in outcome.error


def test_env_follows_dcys_policy(helper: GoHelper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_REGION", "eu")
    monkeypatch.setenv("APP_TOKEN", "s3cret")
    policy = EnvPolicy()
    r = renderer(
        helper, '{{ env "APP_REGION" }} {{ envOrDefault "APP_UNSET" "d" }}', env_policy=policy
    )
    assert r.render(Watches()).content == "eu d"
    r = renderer(helper, '{{ env "APP_TOKEN" }}', env_policy=policy)
    outcome = r.render(Watches())
    assert outcome.error is not None and "env('APP_TOKEN') is denied" in outcome.error
    assert "s3cret" not in outcome.error


def test_a_render_that_does_not_end_is_stopped_and_the_helper_restarts() -> None:
    helper = GoHelper(require_binary("dcy-ctmpl"), timeout=0.5)
    try:
        outcome = renderer(helper, "{{ range loop 2000000000 }}{{ end }}").render(Watches())
        assert outcome.error is not None and "took longer than" in outcome.error
        assert renderer(helper, "{{ add 1 2 }}").render(Watches()).content == "3"
    finally:
        helper.close()


def test_a_query_consul_refuses_is_reported_as_refused(helper: GoHelper) -> None:
    """A refused query (ACL, TLS) is not the template's fault: the runner stops on it."""
    refusal = ConsulError("Permission denied", status=403)

    def refusing(spec: Any) -> Snapshot[Any] | None:
        raise refusal

    outcome = renderer(helper, '{{ key "secret/x" }}').render(Watches())
    assert not outcome.complete and outcome.refused is None
    outcome = renderer(helper, '{{ key "secret/x" }}').render(refusing)
    assert outcome.refused is refusal and outcome.error is not None


def test_a_missing_helper_is_a_clear_error(tmp_path: Path) -> None:
    helper = GoHelper(tmp_path / "nope")
    with pytest.raises(HelperError, match="cannot start"):
        helper.render("t", text="x", data=[], err_missing_key=False, callback=lambda *a: "")
