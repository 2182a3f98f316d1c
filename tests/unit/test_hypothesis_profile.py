"""The property tests run under the CI profile unless someone asks for another."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def test_ci_profile_is_active_by_default() -> None:
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci":
        return  # someone chose another profile on purpose; nothing to check
    current = settings.default
    assert current is not None
    assert current.deadline is None
    assert current.derandomize is True
    assert current.database is None
    assert HealthCheck.too_slow in current.suppress_health_check
