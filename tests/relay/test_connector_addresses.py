"""The connector reads --relay and --listen with the config's address parser."""

from __future__ import annotations

import pytest

from relay.connector import make_settings


def _settings(relay: str, listen: str = "127.0.0.1:0"):
    return make_settings(relay=relay, ca=None, target="t", token="x", listen=listen)


@pytest.mark.parametrize(
    ("relay", "host", "port"),
    [
        ("relay.example.com:7443", "relay.example.com", 7443),
        ("[::1]:7443", "::1", 7443),
        ("10.0.0.5:1", "10.0.0.5", 1),
    ],
)
def test_relay_address_forms(relay: str, host: str, port: int) -> None:
    settings = _settings(relay)
    assert (settings.relay_host, settings.relay_port) == (host, port)
    assert settings.server_name == host


def test_listen_ipv6_loopback_and_any_port() -> None:
    assert _settings("relay:7443", listen="[::1]:0").listen == ("::1", 0)


@pytest.mark.parametrize(
    ("flag", "relay", "listen", "expected"),
    [
        ("--relay", "relay.example.com", "127.0.0.1:0", 'missing ":PORT"'),
        ("--relay", "relay:0", "127.0.0.1:0", "the port must be a number from 1 to 65535"),
        ("--relay", "relay:65536", "127.0.0.1:0", "the port must be a number from 1 to 65535"),
        ("--relay", "::1:7443", "127.0.0.1:0", "put IPv6 addresses in brackets"),
        ("--listen", "relay:7443", "127.0.0.1:65536", "from 0 to 65535"),
        ("--listen", "relay:7443", "[::1:5000", 'missing "]"'),
    ],
)
def test_bad_addresses_name_the_flag(flag: str, relay: str, listen: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        _settings(relay, listen)
    message = str(info.value)
    assert message.startswith(f"{flag}: invalid address ")
    assert expected in message
