"""[limits] and the PROXY protocol keys: defaults, values, and one line per mistake."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from config import LimitsSection, load_config

from .support import MINIMAL, problems_of, write_config

F = "dbgrelay.toml"


def test_defaults(config_dir: Path) -> None:
    config = load_config(write_config(config_dir, MINIMAL))
    assert config.limits == LimitsSection(
        max_unauthenticated=256,
        max_unauthenticated_per_source=32,
        handshake_rate=20.0,
        handshake_burst=100,
        auth_failure_rate=0.5,
        auth_failure_burst=20,
        max_sources=65536,
        max_sessions_per_user=16,
        max_handshakes=64,
    )
    assert config.relay.proxy_protocol is False
    assert config.relay.proxy_trusted == ()


def test_every_key_is_read(config_dir: Path) -> None:
    text = MINIMAL + (
        "[limits]\nmax_unauthenticated = 100\nmax_unauthenticated_per_source = 10\n"
        "handshake_rate = 5\nhandshake_burst = 50\nauth_failure_rate = 0.25\n"
        "auth_failure_burst = 40\nmax_sources = 1000\nmax_sessions_per_user = 4\n"
        "max_handshakes = 8\n"
        '[relay]\nproxy_protocol = true\nproxy_trusted = ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]\n'
    )
    config = load_config(write_config(config_dir, text))
    assert config.limits == LimitsSection(
        max_unauthenticated=100,
        max_unauthenticated_per_source=10,
        handshake_rate=5.0,
        handshake_burst=50,
        auth_failure_rate=0.25,
        auth_failure_burst=40,
        max_sources=1000,
        max_sessions_per_user=4,
        max_handshakes=8,
    )
    assert config.relay.proxy_protocol is True
    assert config.relay.proxy_trusted == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.0.2.1/32"),
    )


def test_bad_values_each_get_one_line(config_dir: Path) -> None:
    text = MINIMAL + (
        '[limits]\nmax_unauthenticated = 0\nhandshake_rate = "fast"\n'
        "auth_failure_rate = -1\nmax_sessions_per_user = 1.5\nmax_unknown = 3\n"
        "max_handshakes = 0\n"
    )
    assert problems_of(config_dir, text) == [
        f"{F}: limits.max_unknown: unknown key; known keys: max_unauthenticated, "
        "max_unauthenticated_per_source, handshake_rate, handshake_burst, auth_failure_rate, "
        "auth_failure_burst, max_sources, max_sessions_per_user, max_handshakes",
        f"{F}: limits.max_unauthenticated: expected a positive integer, got 0",
        f"{F}: limits.max_sessions_per_user: expected a positive integer, got 1.5",
        f"{F}: limits.max_handshakes: expected a positive integer, got 0",
        f'{F}: limits.handshake_rate: expected a positive number per second, got "fast"',
        f"{F}: limits.auth_failure_rate: expected a positive number per second, got -1",
    ]


def test_source_table_must_hold_every_unauthenticated_source(config_dir: Path) -> None:
    text = MINIMAL + "[limits]\nmax_unauthenticated = 500\nmax_sources = 500\n"
    assert problems_of(config_dir, text) == [
        f"{F}: limits.max_sources: must be larger than limits.max_unauthenticated (500), got 500; "
        "every source holding a connection needs a place in the table"
    ]


def test_proxy_protocol_needs_trusted_networks(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + "[relay]\nproxy_protocol = true\n")
    assert line.startswith(f"{F}: relay.proxy_trusted: relay.proxy_protocol = true needs")


def test_proxy_trusted_must_be_networks(config_dir: Path) -> None:
    assert problems_of(config_dir, MINIMAL + '[relay]\nproxy_trusted = "10.0.0.0/8"\n') == [
        f"{F}: relay.proxy_trusted: expected a list of networks like "
        '["10.0.0.0/8", "fd00::/8"], got "10.0.0.0/8"'
    ]
    (line,) = problems_of(config_dir, MINIMAL + '[relay]\nproxy_trusted = ["10.0.0.1/8"]\n')
    assert line.startswith(
        f'{F}: relay.proxy_trusted[0]: expected a network like "10.0.0.0/8" or "fd00::/8", '
        'got "10.0.0.1/8"'
    )
