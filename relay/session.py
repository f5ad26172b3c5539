"""One tunnel: handshake, preamble, authorisation, backend, pump, teardown.

Each accepted connection runs :func:`handle_connection` as its own task, with
its own nursery for the pumps.  Nothing reaches a backend before the TLS
handshake, the preamble and the token check have all passed, and all three
must finish within ``handshake_timeout`` so unauthenticated peers cannot hold
connections open (ghostunnel forces its handshake for the same reason).

Every authorised tunnel writes exactly one ``session.opened`` and one
``session.closed`` record; the end record names the first reason that ended
the tunnel, and it is on disk (fsync) before the client's connection is
closed.
"""

from __future__ import annotations

import base64
import logging
import math
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from config import TargetConfig

from .access import Grant, authorize
from .audit import AuditWriter, ByteRecorder, session_audit_path
from .backends import BackendError, ManagedServer
from .errors import RelayError, RemoteProtocolError
from .preamble import (
    NEED_DATA,
    PreambleParser,
    TunnelRequested,
    render_established,
    render_preflight,
    render_refusal,
)
from .pump import Traffic, run_pump
from .tls import TLSInfo, is_pq_group

if TYPE_CHECKING:
    from .server import Relay

__all__ = ["Session", "handle_connection", "new_session_id"]

log = logging.getLogger("dbgrelay.session")

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


def new_session_id() -> str:
    """A short, unique, URL-safe id: 60 random bits in base32 (12 characters)."""
    return base64.b32encode(secrets.token_bytes(8)).decode()[:12].lower()


def _peer(stream: trio.abc.Stream) -> str:
    try:
        addr = stream.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "unknown"
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr) or "unix"


@dataclass(eq=False)
class Session:
    """A live, authorised tunnel (what the admin API lists).

    Attributes:
        id: Short unique id, in every log and audit line and sent to the client.
        peer: The client's address.
        grant: The verified token claims and the target.
        tls: What the handshake negotiated.
        started: Unix time the tunnel was authorised.
        traffic: Bytes each way so far.
    """

    id: str
    peer: str
    grant: Grant
    tls: TLSInfo
    started: float
    traffic: Traffic = field(default_factory=Traffic)
    end_reason: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    audit: AuditWriter | None = None
    # Bytes already pushed into metrics (the pump's counters run ahead).
    reported: Traffic = field(default_factory=Traffic)

    @property
    def user(self) -> str:
        return self.grant.claims.sub

    @property
    def target(self) -> str:
        return self.grant.target.name

    def end(self, reason: str) -> None:
        """End the tunnel from outside (revoked, ended by an admin, shutdown).

        The first reason given wins; the tunnel's end record carries it.
        """
        if self.end_reason is None:
            self.end_reason = reason
        self.scope.cancel()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "jti": self.grant.claims.jti,
            "target": self.target,
            "client": self.peer,
            "tls_version": self.tls.version,
            "tls_group": self.tls.group,
            "client_cert": self.tls.peer_subject,
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(),
            "bytes_to_backend": self.traffic.to_backend,
            "bytes_to_client": self.traffic.to_client,
        }


async def _read_preamble(stream: trio.abc.Stream, parser: PreambleParser) -> TunnelRequested:
    while True:
        event = parser.next_event()
        if event is not NEED_DATA:
            return event
        parser.receive_data(await stream.receive_some(16384))


async def _send_and_close(stream: trio.abc.Stream, data: bytes) -> None:
    """Best-effort: write a final answer, then close (TLS close_notify), bounded."""
    with trio.move_on_after(2):
        try:
            await stream.send_all(data)
        except _BROKEN:
            pass
    await _close(stream)


async def _close(stream: trio.abc.Stream) -> None:
    """Close a stream, bounded and shielded, so cleanup cannot hang or be skipped."""
    with trio.CancelScope(shield=True), trio.move_on_after(2) as scope:
        try:
            await stream.aclose()
        except _BROKEN:
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


async def handle_connection(relay: Relay, stream: trio.SocketStream) -> None:
    """Serve one accepted connection until its tunnel ends.

    Expected failures (a broken peer, a refused token, an unreachable
    backend) become log events with a reason; anything else is logged as
    ``session.crashed`` with a traceback, and the relay keeps running.

    Resource handling:
        Closes ``stream`` (and everything opened for it) before returning.
    """
    sid = new_session_id()
    peer = _peer(stream)
    ctx: dict[str, Any] = {"session_id": sid, "peer": peer}
    try:
        await _serve(relay, stream, sid, peer, ctx)
    except* RelayError as group:
        for exc in group.exceptions:
            log.warning("session.crashed", extra=ctx | {"error": str(exc)}, exc_info=exc)
    except* Exception as group:
        for exc in group.exceptions:
            log.error("session.crashed", extra=ctx | {"error": repr(exc)}, exc_info=exc)
    finally:
        await _close(stream)


async def _serve(relay: Relay, raw: trio.SocketStream, sid: str, peer: str, ctx: dict) -> None:
    config = relay.config
    metrics = relay.metrics
    tls = relay.tls.wrap(raw)
    started = trio.current_time()
    deadline = started + config.relay.handshake_timeout

    # 1. TLS handshake, within the handshake deadline.
    with trio.move_on_at(deadline) as scope:
        try:
            await tls.do_handshake()
        except _BROKEN as exc:
            metrics.handshake("tls_error")
            # The pyOpenSSL engine says why in the error itself; trio's SSLStream in its cause.
            error = str(exc) or str(exc.__cause__ or type(exc).__name__)
            log.info("handshake.failed", extra=ctx | {"reason": "tls_error", "error": error})
            relay.audit_event("handshake.failed", client=peer, reason="tls_error", error=error)
            return
    if scope.cancelled_caught:
        metrics.handshake("timeout")
        log.info("handshake.failed", extra=ctx | {"reason": "timeout"})
        relay.audit_event("handshake.failed", client=peer, reason="timeout")
        return
    info = tls.tls_info()
    if info.peer_serial is not None and relay.is_serial_revoked(info.peer_serial):
        # The pyOpenSSL engine refuses these during the handshake; the stdlib
        # engine has no hook there, so the check runs before a byte is read.
        metrics.handshake("cert_revoked")
        log.info("handshake.failed", extra=ctx | {"reason": "cert_revoked"})
        relay.audit_event(
            "handshake.failed", client=peer, reason="cert_revoked", serial=str(info.peer_serial)
        )
        return
    metrics.handshake("ok", seconds=trio.current_time() - started)
    metrics.tls_session(info.version, info.group)
    ctx |= {"tls_version": info.version, "tls_group": info.group}

    # 2-4. The request, the token, admission: each refusal is answered in one place.
    fields: dict[str, Any] = {"client": peer}
    try:
        request = await _receive_request(tls, deadline)
        fields |= {"target": request.target} | relay.peek_token(request.token)
        # Nothing touches a backend before this passes.
        grant = authorize(
            token=request.token,
            target_name=request.target,
            config=config,
            keys=relay.keys,
            revoked=relay.revoked,
            now=relay.wall_clock(),
        )
        claims, target = grant.claims, grant.target
        fields = {"client": peer, "target": target.name, "sub": claims.sub, "jti": claims.jti}
        ctx |= {"subject": claims.sub, "jti": claims.jti, "target": target.name}
        _check_admission(relay, request, grant, info)
        if request.method == "OPTIONS":
            relay.audit_event("token.accepted", preflight=True, **fields)
            log.info("preflight.answered", extra=ctx)
            await _send_and_close(tls, render_preflight(headers=_preflight_headers(target)))
            return
        session = Session(id=sid, peer=peer, grant=grant, tls=info, started=relay.wall_clock())
        await _open_audit(relay, session, ctx)
    except RemoteProtocolError as exc:
        await _refuse(relay, tls, exc, ctx, **fields)
        return
    except _BROKEN as exc:
        log.info("preamble.failed", extra=ctx | {"reason": "client_error", "error": str(exc)})
        return

    relay.add_session(session)
    metrics.session_opened(target.name)
    relay.audit_event("token.accepted", session_id=sid, **fields)
    log.info("session.opened", extra=ctx)
    try:
        await _run_tunnel(relay, session, tls, request, ctx)
    finally:
        relay.remove_session(session)


async def _receive_request(tls: trio.abc.Stream, deadline: float) -> TunnelRequested:
    """Read the CONNECT/OPTIONS head, by the handshake deadline.

    Raises:
        RemoteProtocolError: malformed (400/405) or too slow (408).
    """
    parser = PreambleParser()
    with trio.move_on_at(deadline):
        return await _read_preamble(tls, parser)
    raise RemoteProtocolError(
        "the CONNECT request did not arrive in time", reason="timeout", status=408
    )


def _check_admission(relay: Relay, request: TunnelRequested, grant: Grant, info: TLSInfo) -> None:
    """Policy after the token: key exchange, draining, capacity.

    Raises:
        RemoteProtocolError: 403 ``pq_required`` or 503.
    """
    target = grant.target
    if relay.config.requires_pq(target) and not is_pq_group(info.group):
        raise RemoteProtocolError(
            f"target {target.name!r} requires post-quantum key exchange, negotiated {info.group}",
            reason="pq_required",
            status=403,
        )
    if request.method == "OPTIONS":
        return
    if relay.draining:
        raise RemoteProtocolError("the relay is shutting down", reason="shutting_down", status=503)
    if relay.shared is not None and not relay.shared.admitting():
        # Fail closed: without the shared state this relay cannot learn revocations.
        raise RemoteProtocolError(
            "the relay cannot reach its shared state", reason="state_unavailable", status=503
        )
    limit = relay.config.relay.max_sessions
    if len(relay.sessions) >= limit:
        raise RemoteProtocolError(
            f"the relay is full ({limit} tunnels)", reason="relay_full", status=503
        )


def _preflight_headers(target: TargetConfig) -> dict[str, str]:
    headers = {"Dbgrelay-Target-Kind": target.kind}
    if target.kd_transport:
        headers["Dbgrelay-Kd-Transport"] = target.kd_transport
    return headers


async def _open_audit(relay: Relay, session: Session, ctx: dict) -> None:
    """Create the session's audit file with its start record, on disk.

    Raises:
        RemoteProtocolError: 503 ``audit_unavailable`` (fail closed).
    """
    claims, target, info = session.grant.claims, session.grant.target, session.tls
    started = datetime.fromtimestamp(session.started, UTC)
    try:
        session.audit = AuditWriter.create(
            session_audit_path(relay.config.relay.audit_dir, session.id, started),
            kind="session",
            session_id=session.id,
            signing_key=relay.audit_key,
            clock=relay.audit_clock,
        )
        session.audit.append(
            "session.opened",
            session_id=session.id,
            user=claims.sub,
            jti=claims.jti,
            client=session.peer,
            tls_version=info.version,
            tls_cipher=info.cipher,
            tls_group=info.group,
            client_cert=info.peer_subject,
            client_cert_serial=str(info.peer_serial) if info.peer_serial is not None else None,
            target=target.name,
            kind=target.kind,
            backend=target.backend_url,
            token_exp=claims.exp,
            start=started.isoformat(),
        )
        await relay.sync_audit(session.audit)
    except (OSError, RelayError) as exc:
        relay.metrics.audit_write_error()
        log.error("audit.unwritable", extra=ctx | {"error": str(exc)})
        if session.audit is not None:
            session.audit.close()
        raise RemoteProtocolError(
            "the relay cannot write its audit log", reason="audit_unavailable", status=503
        ) from exc


async def _refuse(
    relay: Relay,
    tls: trio.abc.Stream,
    exc: RemoteProtocolError,
    ctx: dict,
    **fields: Any,
) -> None:
    """Answer with a status and one-line reason, log and count it, close."""
    if exc.status in (401, 403, 404):
        relay.metrics.auth_failure(exc.reason)
        event = "token.rejected"
    else:
        relay.metrics.preamble_rejected(exc.status)
        event = "tunnel.refused"
    relay.audit_event(event, status=exc.status, reason=exc.reason, **fields)
    log.info(event, extra=ctx | {"status": exc.status, "reason": exc.reason, "error": str(exc)})
    message = _PEER_MESSAGES.get(
        exc.reason, str(exc) if exc.status in (400, 405, 408) else exc.reason
    )
    await _send_and_close(tls, render_refusal(exc.status, exc.reason, message))


# What a refused peer is told: short, and never the token, paths or internals.
_PEER_MESSAGES = {
    "missing": "send the token as Proxy-Authorization: Bearer <token>",
    "malformed": "the token is not a JWT",
    "expired": "the token has expired; ask an admin for a new one",
    "not_yet_valid": "the token is not valid yet; check this machine's clock",
    "bad_signature": "the token's signature does not verify",
    "bad_issuer": "the token was issued for another relay",
    "bad_audience": "the token was issued for another relay",
    "unknown_kid": "the token was signed with a key this relay does not know",
    "bad_algorithm": "the token must be signed with EdDSA",
    "missing_claim": "the token lacks a required claim",
    "revoked": "the token has been revoked",
    "not_granted": "the token does not grant this target",
    "not_allowed": "this user may not use this target",
    "unknown_target": "no such target",
    "pq_required": "this target requires post-quantum key exchange (X25519MLKEM768)",
    "relay_full": "too many tunnels; try again later",
    "shutting_down": "the relay is shutting down; try again later",
    "audit_unavailable": "the relay cannot record sessions right now",
    "backend_unreachable": "the debug server is not reachable",
    "backend_timeout": "the debug server did not answer in time",
    "backend_unsupported": "this relay cannot reach that kind of debug server",
    "launch_failed": "the debug server could not be started",
    "server_elsewhere": "the target's debug server runs on another relay; try that one or later",
}


async def _run_tunnel(
    relay: Relay, session: Session, tls: trio.abc.Stream, request: TunnelRequested, ctx: dict
) -> None:
    target = session.grant.target
    audit = session.audit
    assert audit is not None
    reason: str | None = None
    detail: str | None = None
    backend: trio.abc.Stream | None = None
    managed: ManagedServer | None = None
    recorder: ByteRecorder | None = None
    t0 = trio.current_time()
    try:
        with session.scope:
            # Lifetime: max_session, and the token's exp unless the target says otherwise.
            life_reason = None
            life_deadline = math.inf
            if target.max_session:
                life_deadline, life_reason = t0 + target.max_session, "max_session"
            if target.end_on_token_expiry:
                exp_at = t0 + (session.grant.claims.exp - relay.wall_clock())
                if exp_at < life_deadline:
                    life_deadline, life_reason = exp_at, "token_expired"
            session.scope.deadline = life_deadline

            # Backend: launch (or reuse) a managed server, then connect.
            try:
                if target.managed:
                    managed, launched = await relay.managed_server(target)
                    managed.tunnel_opened()
                    audit.append(
                        "backend.launched" if launched else "backend.reused",
                        pid=managed.pid,
                        port=managed.port,
                    )
                    backend_addr = managed.backend
                else:
                    backend_addr = target.backend
                backend = await relay.open_backend(
                    backend_addr, connect_timeout=target.connect_timeout
                )
            except BackendError as exc:
                relay.metrics.backend_connect_error(target.name)
                reason, detail = exc.reason, str(exc)
                audit.append("backend.failed", reason=exc.reason, error=str(exc))
                log.warning("backend.failed", extra=ctx | {"reason": exc.reason, "error": str(exc)})
                try:
                    with trio.move_on_after(2):
                        await tls.send_all(
                            render_refusal(
                                502, exc.reason, _PEER_MESSAGES.get(exc.reason, exc.reason)
                            )
                        )
                except _BROKEN:
                    pass
                return
            audit.append("backend.connected", backend=str(backend_addr))

            if target.record:
                recorder = ByteRecorder.create(
                    audit.path.with_name(f"{session.id}.bytes.jsonl"),
                    session_id=session.id,
                    max_bytes=target.record_max_bytes,
                    clock=relay.audit_clock,
                )

            try:
                await tls.send_all(render_established(session_id=session.id))
                if request.trailing:
                    # Bytes sent right behind the request head belong to the debugger.
                    await backend.send_all(request.trailing)
                    session.traffic.to_backend += len(request.trailing)
                    if recorder is not None:
                        recorder.add("c2b", 0.0, request.trailing)
            except _BROKEN as exc:
                reason, detail = "client_error", str(exc)
                return

            tap = None
            if recorder is not None:

                def tap(direction: str, data: bytes) -> None:
                    recorder.add(direction, trio.current_time() - t0, data)

            with trio.CancelScope() as idle:
                try:
                    result = await run_pump(
                        tls,
                        backend,
                        session.traffic,
                        activity=idle,
                        idle_timeout=target.idle_timeout,
                        close_timeout=relay.config.relay.close_timeout,
                        tap=tap,
                    )
                    reason, detail = result.reason, result.detail
                except* (OSError, RelayError) as group:
                    # Only the recording tap raises these out of the pump: a
                    # tunnel whose bytes cannot be recorded does not go on.
                    relay.metrics.audit_write_error()
                    reason = "error"
                    detail = f"byte recording failed: {group.exceptions[0]}"
            if idle.cancelled_caught:
                reason, detail = "idle", None
        if session.scope.cancelled_caught:
            reason, detail = session.end_reason or life_reason or "error", None
    finally:
        with trio.CancelScope(shield=True):
            if reason is None:
                # Cancelled from outside the session's own scope.
                reason = session.end_reason or ("shutdown" if relay.draining else "error")
            if backend is not None:
                await _close(backend)
            if managed is not None:
                managed.tunnel_closed()
            duration = trio.current_time() - t0
            fields: dict[str, Any] = {
                "reason": reason,
                "bytes_to_backend": session.traffic.to_backend,
                "bytes_to_client": session.traffic.to_client,
                "duration": round(duration, 6),
            }
            if detail:
                fields["error"] = detail[:500]
            if recorder is not None:
                bytes_hash, bytes_records = recorder.close()
                fields |= {"bytes_hash": bytes_hash, "bytes_records": bytes_records}
            try:
                audit.close_session(**fields)
                await relay.sync_audit(audit)
            except (OSError, RelayError) as exc:
                relay.metrics.audit_write_error()
                log.error("audit.unwritable", extra=ctx | {"error": str(exc)})
            finally:
                audit.close()
            relay.flush_bytes(session)
            relay.metrics.session_closed(target.name, outcome=reason, duration=duration)
            log.info("session.closed", extra=ctx | fields)
            await _close(tls)
