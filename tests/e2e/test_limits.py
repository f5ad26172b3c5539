"""``dbgrelay serve`` out of file descriptors: one log line per episode, no traceback, recovery."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest

from auth import issue_token, load_signing_key
from relay.preamble import render_request

from .support import DBGRELAY, ProcGroup, config_text

PRLIMIT = shutil.which("prlimit")
NOFILE = 64  # the relay's descriptor limit here: a few dozen spare above its baseline
FLOOD = 200  # idle connections: far past NOFILE

pytestmark = pytest.mark.skipif(PRLIMIT is None, reason="needs prlimit (util-linux) installed")


def _token(home: Path) -> str:
    return issue_token(
        load_signing_key(home / "keys" / "signing.key"),
        user="alice",
        targets=["build42"],
        ttl=3600,
        issuer="dbgrelay",
        audience="dbgrelay",
        now=time.time(),
    )


def _tunnel_status(home: Path, address: str, token: str) -> bytes:
    """Open a TLS connection, send CONNECT, return the status line."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(home / "pki" / "ca.pem"))
    with socket.create_connection((host, int(port)), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(render_request(method="CONNECT", target="build42", token=token))
            head = b""
            while b"\r\n" not in head:
                data = tls.recv(4096)
                assert data, f"relay closed after {head!r}"
                head += data
            return head.split(b"\r\n", 1)[0]


def test_relay_out_of_descriptors_logs_one_episode_without_traceback_and_recovers(
    procs: ProcGroup, home: Path
) -> None:
    # A backend that accepts (its kernel backlog does), so a tunnel can open.
    backend = socket.create_server(("127.0.0.1", 0))
    text = config_text(
        [
            {
                "name": "build42",
                "kind": "tcp",
                "backend": f"tcp://127.0.0.1:{backend.getsockname()[1]}",
                "probe_interval": "0",
            }
        ]
    )
    # Limits high enough that descriptors, not the caps, run out first.
    text += (
        "[limits]\nmax_unauthenticated = 10000\nmax_unauthenticated_per_source = 10000\n"
        "handshake_burst = 10000\nmax_sources = 20000\n"
    )
    (home / "dbgrelay.toml").write_text(text)
    relay = procs.start(
        [
            PRLIMIT,
            f"--nofile={NOFILE}:{NOFILE}",
            "--",
            *DBGRELAY,
            "serve",
            "--config",
            "dbgrelay.toml",
        ],
        cwd=home,
        name="relay",
    )
    address = relay.wait_event("relay.listening")["address"]
    host, port = address.rsplit(":", 1)

    flood = []
    try:
        for _ in range(FLOOD):
            flood.append(socket.create_connection((host, int(port)), timeout=20))
        exhausted = relay.wait_event("accept.exhausted")
        assert exhausted["errno"] == "EMFILE"
        # The idle ones go away; the relay accepts again on its own.
        for s in flood:
            s.close()
        flood.clear()
        recovered = relay.wait_event("accept.recovered")
        assert recovered["errors"] >= 1
        assert _tunnel_status(home, address, _token(home)).startswith(b"HTTP/1.1 200")
    finally:
        for s in flood:
            s.close()
        backend.close()
    relay.stop()
    assert len(relay.events("accept.exhausted")) == 1, relay.output()
    assert len(relay.events("accept.recovered")) == 1, relay.output()
    assert "Traceback" not in relay.output()
