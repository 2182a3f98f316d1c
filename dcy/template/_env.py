"""Which environment variables ``env()`` hands to a template.

A template author, or anyone who can write into the templates folder, must not be able to
read the renderer's credentials: ``{{ env("CONSUL_HTTP_TOKEN") }}`` rendered into a
world-readable file is a leaked ACL token. So ``env()`` refuses, by default, the Consul and
Vault credential variables and every name that looks like a secret; the operator opens or
closes names with an allowlist and a denylist (``env { allowlist / denylist }`` in the config,
``-env-allowlist`` / ``-env-denylist`` flags; consul-template's ``exec.env`` uses the same
words for the child's environment).

Precedence, first match wins:

1. a denylist pattern: denied, whatever else matches;
2. an allowlist pattern: allowed, the default rules are not consulted;
3. the default rules: credential names (``CONSUL_*TOKEN*``, ``CONSUL_HTTP_AUTH``,
   ``VAULT_TOKEN``), secret-looking names (a word of the name is a secret word, see
   :data:`SECRET_WORDS`), and any variable whose value is the renderer's own Consul token;
4. everything else is allowed.

A denied name is an error naming the variable and the rule, not an empty string: a template
that silently rendered ``token = ""`` would look fine and fail much later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

# Variables that are credentials by name, whatever words they are made of.
CREDENTIAL_PATTERNS: tuple[str, ...] = ("CONSUL_*TOKEN*", "CONSUL_HTTP_AUTH", "VAULT_TOKEN")

# A word of a name that marks it as a secret: matched whole, case-insensitively, so
# ``DB_PASSWORD``, ``apiKey`` and ``GITHUB_TOKEN`` are secrets and ``MONKEY``, ``KEYBOARD``
# and ``PASSENGER_COUNT`` are not. Plural forms count too.
SECRET_WORDS: frozenset[str] = frozenset(
    {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "KEY", "APIKEY", "CREDENTIAL"}
    | {"TOKENS", "SECRETS", "PASSWORDS", "KEYS", "APIKEYS", "CREDENTIALS"}
)

# Words are separated by anything that is not a letter or digit, and a camelCase name splits
# where a lower-case letter or digit meets an upper-case one (``dbPassword`` → db, Password).
_WORD_BREAK = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def name_words(name: str) -> list[str]:
    """The words of a variable name, upper-cased."""
    return [w.upper() for w in _WORD_BREAK.split(name) if w]


class EnvDenied(Exception):
    """``env(name)`` is refused; the message names the variable and the rule."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(f"env({name!r}) is denied by {rule}")
        self.name = name
        self.rule = rule


@dataclass(frozen=True, slots=True)
class EnvPolicy:
    """The allow and deny lists (shell-style patterns, case-sensitive like variable names)
    and the values no variable may carry into a template (the renderer's Consul token)."""

    allowlist: tuple[str, ...] = ()
    denylist: tuple[str, ...] = ()
    protected_values: frozenset[str] = frozenset()

    def denial(self, name: str, value: str | None) -> str | None:
        """The rule that denies ``name`` (holding ``value``), or None when it is allowed."""
        for pattern in self.denylist:
            if fnmatchcase(name, pattern):
                return f"the env denylist pattern {pattern!r}"
        for pattern in self.allowlist:
            if fnmatchcase(name, pattern):
                return None
        for pattern in CREDENTIAL_PATTERNS:
            if fnmatchcase(name.upper(), pattern):
                return (
                    f"the default rule for Consul/Vault credentials ({pattern}); "
                    "allow it with -env-allowlist"
                )
        secret = next((w for w in name_words(name) if w in SECRET_WORDS), None)
        if secret is not None:
            return (
                f"the default rule for secret-looking names (the word {secret}); "
                "allow it with -env-allowlist"
            )
        if value is not None and value.strip() and value.strip() in self.protected_values:
            return (
                "the default rule that keeps the renderer's Consul token out of templates "
                "(the variable holds it); allow it with -env-allowlist"
            )
        return None

    def read(self, name: str, default: str, environ: Mapping[str, str]) -> str:
        """``env(name, default)``: the variable's value, ``default`` when it is unset.
        Raises EnvDenied; a denied name is refused even when it is unset, so a template
        fails the same way on every machine."""
        value = environ.get(name)
        rule = self.denial(name, value)
        if rule is not None:
            raise EnvDenied(name, rule)
        return default if value is None else value

    def merged(self, allowlist: tuple[str, ...], denylist: tuple[str, ...]) -> EnvPolicy:
        """This policy with more patterns (later config files and flags add to the lists)."""
        return EnvPolicy(
            self.allowlist + allowlist, self.denylist + denylist, self.protected_values
        )

    def protecting(self, *values: str | None) -> EnvPolicy:
        """This policy, also refusing variables whose value is one of ``values``."""
        kept = {v.strip() for v in values if v and v.strip()}
        return EnvPolicy(self.allowlist, self.denylist, self.protected_values | kept)
