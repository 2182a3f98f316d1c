"""Which TLS errors mean the agent refused us (for good) and which a broken connection."""

from __future__ import annotations

import ssl

import aiohttp
import pytest

from dcy._consul import _tls_refusal


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] alert")
    error.reason = reason
    return error


def _wrapped(inner: BaseException) -> aiohttp.ClientOSError:
    outer = aiohttp.ClientOSError(0, "read failed")
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    "reason",
    ["TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"],
)
def test_a_refusing_alert_behind_a_read_error_is_a_refusal(reason: str) -> None:
    """TLS 1.3 agents refuse a client certificate after the handshake: the alert arrives
    wrapped in a read error, and is found."""
    found = _tls_refusal(_wrapped(_ssl_error(reason)))
    assert found is not None and found.reason == reason


@pytest.mark.parametrize(
    "error",
    [
        _ssl_error("DECRYPTION_FAILED_OR_BAD_RECORD_MAC"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"),
        ConnectionResetError(104, "reset"),
    ],
)
def test_other_tls_errors_are_broken_connections(error: BaseException) -> None:
    """A damaged record, an EOF or a clean close inside TLS: retried like any broken
    connection, not taken for a refusal that ends every watch."""
    assert _tls_refusal(_wrapped(error)) is None
