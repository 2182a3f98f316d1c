"""env() in templates: credentials and secret-looking names are refused unless allowlisted,
a denylist wins over everything, and a refusal is an error naming the variable and the rule."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcy.template._config import ConfigError, load_config_paths
from dcy.template._env import EnvDenied, EnvPolicy, name_words
from dcy.template._functions import DataFunctions, TemplateError
from dcy.template.cli import build_parser, config_from_args

ENVIRON = {
    "CONSUL_HTTP_TOKEN": "c0ffee-token",
    "HOME": "/home/app",
    "MONKEY": "banana",
}


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("CONSUL_HTTP_TOKEN", "CONSUL_*TOKEN*"),
        ("CONSUL_HTTP_TOKEN_FILE", "CONSUL_*TOKEN*"),
        ("consul_token", "CONSUL_*TOKEN*"),
        ("CONSUL_HTTP_AUTH", "CONSUL_HTTP_AUTH"),
        ("VAULT_TOKEN", "VAULT_TOKEN"),
        ("GITHUB_TOKEN", "the word TOKEN"),
        ("DB_PASSWORD", "the word PASSWORD"),
        ("MYSQL_PASSWD", "the word PASSWD"),
        ("dbPassword", "the word PASSWORD"),
        ("AWS_SECRET_ACCESS_KEY", "the word SECRET"),
        ("STRIPE_API_KEY", "the word KEY"),
        ("apiKey", "the word KEY"),
        ("SSH_KEYS", "the word KEYS"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "the word CREDENTIALS"),
        ("redis-pass", "the word PASS"),
    ],
)
def test_default_rules_refuse_credentials_and_secret_names(name: str, rule: str) -> None:
    """Consul/Vault credentials and names with a secret word are refused, set or not, and the
    error names the variable and the rule."""
    policy = EnvPolicy()
    for environ in (ENVIRON, {}):
        with pytest.raises(EnvDenied) as caught:
            policy.read(name, "fallback", environ)
        assert f"env({name!r})" in str(caught.value) and rule in str(caught.value)


@pytest.mark.parametrize(
    "name", ["HOME", "MONKEY", "KEYBOARD_LAYOUT", "PASSENGER_COUNT", "TOKENIZER", "APP_NAME"]
)
def test_words_match_whole(name: str) -> None:
    """A secret word inside a longer word does not count: MONKEY is not a KEY."""
    assert EnvPolicy().read(name, "unset", ENVIRON) == ENVIRON.get(name, "unset")


def test_allowlist_opens_a_default_denied_name_and_denylist_wins() -> None:
    """Allowlist beats the default rules; the denylist beats the allowlist."""
    allowed = EnvPolicy(allowlist=("CONSUL_HTTP_TOKEN",))
    assert allowed.read("CONSUL_HTTP_TOKEN", "", ENVIRON) == "c0ffee-token"
    both = EnvPolicy(allowlist=("CONSUL_*",), denylist=("CONSUL_HTTP_TOKEN",))
    with pytest.raises(EnvDenied, match="denylist pattern 'CONSUL_HTTP_TOKEN'"):
        both.read("CONSUL_HTTP_TOKEN", "", ENVIRON)
    with pytest.raises(EnvDenied, match="denylist pattern 'HO\\*'"):
        EnvPolicy(denylist=("HO*",)).read("HOME", "", ENVIRON)


def test_patterns_are_case_sensitive_like_names() -> None:
    """Patterns are shell globs matched case-sensitively, as variable names are."""
    policy = EnvPolicy(allowlist=("db_*",))
    with pytest.raises(EnvDenied):
        policy.read("DB_PASSWORD", "", {"DB_PASSWORD": "x"})
    assert policy.read("db_password", "", {"db_password": "x"}) == "x"


def test_a_variable_holding_the_renderers_token_is_refused() -> None:
    """Whatever its name, a variable whose value is the renderer's own Consul token is
    refused, unless the operator allowlisted it."""
    environ = {"MY_CONSUL_ACL": " c0ffee-token\n", "OTHER": "c0ffee"}
    policy = EnvPolicy().protecting("c0ffee-token")
    with pytest.raises(EnvDenied, match="Consul token"):
        policy.read("MY_CONSUL_ACL", "", environ)
    assert policy.read("OTHER", "", environ) == "c0ffee"
    assert policy.merged(("MY_*",), ()).read("MY_CONSUL_ACL", "", environ).strip()


@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True))
def test_a_name_is_denied_by_default_exactly_when_a_word_is_secret(name: str) -> None:
    """The default verdict follows the documented rule for any name."""
    words = set(name_words(name))
    secret_word = bool(words & {"TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD",
                                "PASSWORDS", "PASSWD", "PASS", "KEY", "KEYS", "APIKEY",
                                "APIKEYS", "CREDENTIAL", "CREDENTIALS"})  # fmt: skip
    upper = name.upper()
    credential = (upper.startswith("CONSUL_") and "TOKEN" in upper[7:]) or upper in (
        "CONSUL_HTTP_AUTH",
        "VAULT_TOKEN",
    )
    assert (EnvPolicy().denial(name, None) is not None) == (secret_word or credential)


def test_env_function_turns_a_denial_into_a_template_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The template function raises the template error type (a render error, not a crash)."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "c0ffee-token")
    functions = DataFunctions(deps=None, domain="consul", sandbox=None)  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match="CONSUL_HTTP_TOKEN"):
        functions.env("CONSUL_HTTP_TOKEN")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_config_block_and_flags_add_up(tmp_path: Path) -> None:
    """``env { allowlist denylist }`` in config files and -env-allowlist / -env-denylist
    flags add to the same lists, files in order, flags last."""
    (tmp_path / "in.j2").write_text("x")
    first, second = tmp_path / "a.hcl", tmp_path / "b.hcl"
    first.write_text('env {\n  allowlist = ["APP_*"]\n  denylist = ["APP_DEBUG"]\n}\n')
    second.write_text('env {\n  allowlist = ["CONSUL_HTTP_TOKEN"]\n}\n')
    args = parse(
        "-config", str(first), "-config", str(second),
        "-template", f"{tmp_path / 'in.j2'}:{tmp_path / 'out'}",
        "-env-allowlist", "NGINX_*", "-env-denylist", "NGINX_SECRET*",
    )  # fmt: skip
    env = config_from_args(args).env
    assert env.allowlist == ("APP_*", "CONSUL_HTTP_TOKEN", "NGINX_*")
    assert env.denylist == ("APP_DEBUG", "NGINX_SECRET*")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("env {\n  pristine = true\n}\n", "unknown env setting(s) pristine"),
        ('env {\n  allowlist = [""]\n}\n', "env.allowlist must be a list"),
        ("env {\n  denylist = [1]\n}\n", "env.denylist must be a list"),
    ],
)
def test_bad_env_config_is_refused(tmp_path: Path, text: str, message: str) -> None:
    """A misspelt or malformed env block is a configuration error naming the file."""
    path = tmp_path / "c.hcl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config_paths([str(path)])
