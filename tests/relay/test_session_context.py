"""A session runs against any SessionContext, not only the relay's.

The context here is built by hand from real parts (the TLS engine, the
token check, audit files, a backend on loopback) without a
:class:`relay.server.Relay`; the client speaks real TLS over TCP on
127.0.0.1, as in production.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from auth import RevocationSet, load_audit_key, load_jwks
from relay import access
from relay.audit import AuditWriter, session_audit_path
from relay.backends import BackendError, open_backend
from relay.metrics import NilMetrics
from relay.preamble import NEED_DATA, ResponseParser, render_request
from relay.session import SessionContext, handle_connection
from relay.tls import ServerTLS, make_client_engine, make_server_engine

from .conftest import start_echo

pytestmark = pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])


class HandBuiltContext:
    """Just what a session uses, from real parts; relay-level records are kept in a list."""

    def __init__(self, config) -> None:
        self.config = config
        self.metrics = NilMetrics()
        self.tls = ServerTLS(
            make_server_engine(engine=config.tls.engine, cert=config.tls.cert, key=config.tls.key)
        )
        self.handshake_slots = trio.CapacityLimiter(4)
        self.sessions: dict[str, Any] = {}
        self.open_backend = open_backend
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.synced: list[Path] = []
        self.ended = trio.Event()
        self._keys = load_jwks(config.auth.jwks)
        self._audit_key = load_audit_key(config.auth.audit_key)

    def wall_clock(self) -> float:
        return time.time()

    def audit_clock(self) -> datetime:
        return datetime.fromtimestamp(self.wall_clock(), UTC)

    def is_serial_revoked(self, serial: int) -> bool:
        return False

    def authorize(self, token, target_name, *, config, client_cert):
        return access.authorize(
            token=token,
            target_name=target_name,
            config=config,
            keys=self._keys,
            revoked=RevocationSet(),
            now=self.wall_clock(),
            client_cert=client_cert,
        )

    def unready_reason(self) -> str | None:
        return None

    def add_session(self, session) -> None:
        self.sessions[session.id] = session

    async def claim_in_cluster(self, session) -> None:
        return None

    def remove_session(self, session) -> None:
        del self.sessions[session.id]
        self.ended.set()

    def flush_bytes(self, session) -> None:
        return None

    def audit_event(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def take_audit_file(self, now, *, config):
        return None

    def create_audit_file(self, session_id: str, started: datetime) -> AuditWriter:
        return AuditWriter.create(
            session_audit_path(self.config.relay.audit_dir, session_id, started),
            kind="session",
            session_id=session_id,
            signing_key=self._audit_key,
            clock=self.audit_clock,
            sign_interval=self.config.relay.checkpoint_interval,
        )

    async def sync_audit(self, writer: AuditWriter) -> None:
        writer.flush()
        writer.sync()
        self.synced.append(writer.path)

    def checkpoint_relay_audit(self) -> None:
        return None

    async def managed_server(self, target):
        raise BackendError(f"no managed servers here ({target.name})", reason="launch_failed")


async def _serve(nursery: trio.Nursery, context: HandBuiltContext) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, partial(handle_connection, context), listeners)
    return listeners[0].socket.getsockname()[1]


async def _request(port: int, config, pki: Path, token: str):
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = make_client_engine(engine=config.tls.engine, ca=pki / "ca.pem").wrap(stream, "127.0.0.1")
    await tls.do_handshake()
    await tls.send_all(render_request(method="CONNECT", target="build42", token=token))
    parser = ResponseParser()
    while (event := parser.next_event()) is NEED_DATA:
        parser.receive_data(await tls.receive_some(4096))
    return tls, event


async def test_a_tunnel_opens_echoes_and_closes_through_a_hand_built_context(
    nursery, make_config, pki, token_for
):
    backend = await start_echo(nursery)
    config = make_config(
        [{"name": "build42", "kind": "tcp", "backend": f"tcp://127.0.0.1:{backend.port}"}]
    )
    context = HandBuiltContext(config)
    assert isinstance(context, SessionContext)
    port = await _serve(nursery, context)

    tls, event = await _request(port, config, pki, token_for())
    assert event.status == 200
    session_id = event.headers["dbgrelay-session"]
    assert list(context.sessions) == [session_id]
    await tls.send_all(b"ping")
    assert await tls.receive_some(4) == b"ping"
    await tls.aclose()
    with trio.fail_after(10):
        await context.ended.wait()

    assert context.sessions == {}
    (accepted,) = context.events
    assert accepted[0] == "token.accepted"
    assert accepted[1]["session_id"] == session_id and accepted[1]["sub"] == "alice"
    (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records if r.get("event", "").startswith("session.")] == [
        "session.opened",
        "session.closed",
    ]
    closed = records[-1]
    assert closed["reason"] == "client_closed"
    assert (closed["bytes_to_backend"], closed["bytes_to_client"]) == (4, 4)
    # The start record was synced before the 200, the end record before the close.
    assert context.synced == [path, path]


async def test_a_refused_token_is_audited_through_the_context(nursery, make_config, pki, token_for):
    config = make_config([{"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:9"}])
    context = HandBuiltContext(config)
    port = await _serve(nursery, context)

    tls, event = await _request(port, config, pki, token_for(targets=["another"]))
    assert event.status == 403
    await tls.aclose()
    # Audited before the answer is sent.
    ((name, fields),) = context.events
    assert name == "token.rejected"
    assert (fields["status"], fields["reason"]) == (403, "not_granted")
    assert fields["claimed_sub"] == "alice" and fields["target"] == "build42"
    assert context.sessions == {}
    assert not config.relay.audit_dir.exists()
