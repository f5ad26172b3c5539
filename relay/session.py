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
import contextlib
import logging
import math
import secrets
import socket as stdlib_socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote

import trio

from auth import peek_unverified
from config import TargetConfig

from .access import ClientCertNames, Grant
from .audit import AuditWriter, ByteRecorder
from .backends import BackendError, ManagedServer
from .context import RelayContext
from .datapath.pump import BACKEND_ERROR
from .errors import RelayError, RemoteProtocolError
from .preamble import (
    NEED_DATA,
    PreambleParser,
    TunnelRequested,
    render_established,
    render_preflight,
    render_refusal,
)
from .pump import Traffic, driver_for
from .tls import TLSInfo, is_pq_group

if TYPE_CHECKING:
    from collections.abc import Mapping

    from config import Config, NpipeBackend, TcpBackend, UnixBackend

    from .gate import Admission
    from .limits import Refused
    from .tls import ServerTLS

__all__ = ["Session", "SessionContext", "handle_connection", "new_session_id"]

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

    A session is registered with the relay as soon as its token passes, so
    that revocation, an admin's end and shutdown reach it from then on; while
    its audit file is being made durable it is listed with state
    ``"opening"``, then ``"open"``.  An opening session that is ended gets a
    refusal instead of its 200.

    Attributes:
        id: Short unique id, in every log and audit line and sent to the client.
        peer: The client's address.
        grant: The verified token claims and the target.
        tls: What the handshake negotiated.
        started: Unix time the tunnel was authorised.
        traffic: Bytes each way so far.
        opening: True until the start record is on disk.
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
    opening: bool = True

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
            "state": "opening" if self.opening else "open",
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


@runtime_checkable
class SessionContext(RelayContext, Protocol):
    """What a session uses of the relay that runs it; :class:`relay.server.Relay` provides it.

    A session reads settings, admits and registers itself, writes audit
    records and reaches backends only through these members, so this module
    does not depend on the relay's internals (nor import :mod:`relay.server`).
    Every member is looked up at the moment it is used, so a reload's new
    config, keys and certificates apply to the next step of a live session.
    """

    # -- clocks (settings, metrics and the audit trail: RelayContext) ---------

    def wall_clock(self) -> float:
        """Unix time, for token checks and the session's start."""
        ...

    def audit_clock(self) -> datetime:
        """Timestamps for audit records (the wall clock, as a datetime)."""
        ...

    # -- handshake and admission --------------------------------------------

    #: The current TLS server context; ``tls.wrap(raw)`` starts a handshake.
    tls: ServerTLS
    #: Server handshakes in progress at once (``limits.max_handshakes``).
    handshake_slots: trio.CapacityLimiter

    def is_serial_revoked(self, serial: int) -> bool:
        """Whether a client certificate with this serial number has been revoked."""
        ...

    def authorize(
        self,
        token: str | None,
        target_name: str,
        *,
        config: Config,
        client_cert: ClientCertNames | None,
    ) -> Grant:
        """Check a token for a target, by ``config``, with the current keys and revocations.

        Raises:
            RemoteProtocolError: 401, 403 or 404 with the reason code.
        """
        ...

    def unready_reason(self) -> str | None:
        """``shutting_down``, ``state_unavailable``, or ``None`` while tunnels are admitted."""
        ...

    # -- the live sessions ---------------------------------------------------

    #: The relay's live sessions by id (opening ones included); read only.
    sessions: Mapping[str, Session]

    def add_session(self, session: Session) -> None:
        """Register an authorised session: revocation, admin and shutdown reach it."""
        ...

    async def claim_in_cluster(self, session: Session) -> None:
        """Take the session's place in a shared sessions table, if there is one.

        Raises:
            RemoteProtocolError: a cluster-wide (or host-wide) cap is reached.
        """
        ...

    def remove_session(self, session: Session) -> None:
        """Unregister a session that has ended (or was refused after registering)."""
        ...

    def flush_bytes(self, session: Session) -> None:
        """Push a session's byte counts into the metrics."""
        ...

    # -- audit ---------------------------------------------------------------

    def take_audit_file(self, now: datetime, *, config: Config) -> tuple[str, AuditWriter] | None:
        """A session file made ahead of time that fits ``config``, and its session id."""
        ...

    def create_audit_file(self, session_id: str, started: datetime) -> AuditWriter:
        """Create the audit file of a session (when none was made ahead of time).

        Raises:
            OSError or RelayError: the file cannot be created.
        """
        ...

    async def sync_audit(self, writer: AuditWriter) -> None:
        """Flush and fsync an audit file."""
        ...

    def checkpoint_relay_audit(self) -> None:
        """Sign what the relay's audit file holds so far."""
        ...

    # -- backends ------------------------------------------------------------

    async def open_backend(
        self,
        backend: TcpBackend | UnixBackend | NpipeBackend | ManagedServer,
        *,
        connect_timeout: float,
    ) -> trio.abc.Stream:
        """Connect to a backend (a managed server through its launcher).

        Raises:
            BackendError: it cannot be reached.
        """
        ...

    async def managed_server(self, target: TargetConfig) -> tuple[ManagedServer, bool]:
        """The target's running server, launched now if need be, and whether it was.

        Raises:
            BackendError: it could not be launched.
        """
        ...


async def _read_preamble(stream: trio.abc.Stream, parser: PreambleParser) -> TunnelRequested:
    while True:
        event = parser.next_event()
        if event is not NEED_DATA:
            return event
        parser.receive_data(await stream.receive_some(16384))


async def _send_and_close(stream: trio.abc.Stream, data: bytes, *, limit: float) -> None:
    """Best-effort: write a final answer, then close (TLS close_notify).

    Each step gets ``limit`` seconds (``relay.final_write_timeout``).
    """
    with trio.move_on_after(limit):
        try:
            await stream.send_all(data)
        except _BROKEN:
            pass
    await _close(stream, limit=limit)


async def _close(stream: trio.abc.Stream, *, limit: float) -> None:
    """Close a stream, shielded and bounded by ``limit`` seconds.

    Shielded so that cleanup is not skipped when the session is cancelled;
    bounded so that a peer that never reads cannot hold it: after
    ``limit`` the stream is closed without a goodbye.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + limit) as scope:
        try:
            await stream.aclose()
        except _BROKEN:
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)


async def handle_connection(
    relay: SessionContext, stream: trio.SocketStream, *, admission: Admission | None = None
) -> None:
    """Serve one accepted connection until its tunnel ends.

    Expected failures (a broken peer, a refused token, an unreachable
    backend) become log events with a reason; anything else is logged as
    ``session.crashed`` with a traceback, and the relay keeps running.

    Args:
        relay: The relay that runs the session, as the session sees it.
        stream: The accepted connection.
        admission: What :class:`relay.gate.Gate` admitted it as: the
            client's address (from a PROXY header, maybe) and its source's
            failed-authentication budget.  ``None`` applies no limits.

    Resource handling:
        Closes ``stream`` (and everything opened for it) before returning.
    """
    sid = new_session_id()
    peer = admission.peer if admission is not None else _peer(stream)
    ctx: dict[str, Any] = {"session_id": sid, "peer": peer}
    try:
        await _serve(relay, stream, sid, peer, ctx, admission)
    except* RelayError as group:
        for exc in group.exceptions:
            log.warning("session.crashed", extra=ctx | {"error": str(exc)}, exc_info=exc)
    except* Exception as group:
        for exc in group.exceptions:
            log.error("session.crashed", extra=ctx | {"error": repr(exc)}, exc_info=exc)
    finally:
        await _close(stream, limit=relay.config.relay.final_write_timeout)


def _quiet(admission: Admission | None, reason: str) -> bool:
    """Whether a failure is over its source's rate: then it is reported rate-limited only."""
    if admission is None or admission.failed() is None:
        return False
    admission.throttled("auth_rate", failure=reason)
    return True


async def _serve(
    relay: SessionContext,
    raw: trio.SocketStream,
    sid: str,
    peer: str,
    ctx: dict,
    admission: Admission | None = None,
) -> None:
    config = relay.config
    metrics = relay.metrics
    tls = relay.tls.wrap(raw)
    started = trio.current_time()
    deadline = started + config.relay.handshake_timeout

    # 1. TLS handshake, within the handshake deadline (waiting for a slot included).
    with trio.move_on_at(deadline) as scope:
        try:
            async with relay.handshake_slots:
                await tls.do_handshake()
        except _BROKEN as exc:
            metrics.handshake("tls_error")
            # The pyOpenSSL engine says why in the error itself; trio's SSLStream in its cause.
            error = str(exc) or str(exc.__cause__ or type(exc).__name__)
            if not _quiet(admission, "tls_error"):
                log.info("handshake.failed", extra=ctx | {"reason": "tls_error", "error": error})
                relay.audit_event("handshake.failed", client=peer, reason="tls_error", error=error)
            return
    if scope.cancelled_caught:
        metrics.handshake("timeout")
        if not _quiet(admission, "timeout"):
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
        fields |= {"target": request.target} | _claimed(request.token)
        # Nothing touches a backend before this passes.
        grant = relay.authorize(
            request.token,
            request.target,
            config=config,
            client_cert=ClientCertNames(cn=info.peer_cn, sans=info.peer_sans)
            if info.peer_subject is not None
            else None,
        )
        if admission is not None:
            admission.passed()
        claims, target = grant.claims, grant.target
        fields = {"client": peer, "target": target.name, "sub": claims.sub, "jti": claims.jti}
        fields |= _grant_fields(grant)
        ctx |= {"subject": claims.sub, "jti": claims.jti, "target": target.name}
        if info.peer_serial is not None and relay.is_serial_revoked(info.peer_serial):
            # Revoked while the request was read: the check after the
            # handshake is stale, so check again with the token.
            raise RemoteProtocolError(
                "the client certificate has been revoked", reason="cert_revoked", status=403
            )
        _check_admission(relay, request, grant, info)
        if request.method == "OPTIONS":
            relay.audit_event("token.accepted", preflight=True, **fields)
            log.info("preflight.answered", extra=ctx)
            await _send_and_close(
                tls,
                render_preflight(headers=_preflight_headers(target, claims)),
                limit=config.relay.final_write_timeout,
            )
            return
        opened_at = relay.wall_clock()
        # A file made ahead of time (its creation and folder already on
        # disk) names the session: the id it was made under replaces ours,
        # before any record or log line carries it.
        ready = relay.take_audit_file(datetime.fromtimestamp(opened_at, UTC), config=config)
        if ready is not None:
            sid = ctx["session_id"] = ready[0]
        session = Session(
            id=sid,
            peer=peer,
            grant=grant,
            tls=info,
            started=opened_at,
            audit=ready[1] if ready is not None else None,
        )
        # Registered in the same step as the revocation check in authorize():
        # no await between them, so a revocation applied from here on finds
        # the session and ends it, and one applied before was seen by the
        # check.  Until then an await (the audit fsync below) was a window in
        # which a revocation ended nothing (issue 11).
        relay.add_session(session)
    except RemoteProtocolError as exc:
        if (
            admission is not None
            and not admission.authenticated
            and 400 <= exc.status < 500
            and (refused := admission.failed()) is not None
        ):
            await _throttle(relay, tls, admission, refused, failure=exc.reason)
            return
        await _refuse(relay, tls, exc, ctx, **fields)
        return
    except _BROKEN as exc:
        log.info("preamble.failed", extra=ctx | {"reason": "client_error", "error": str(exc)})
        return

    try:
        try:
            # With PostgreSQL the per-user cap counts the whole cluster's sessions;
            # with SQLite workers, the host's (and so does max_sessions).
            await relay.claim_in_cluster(session)
        except BaseException:
            if session.audit is not None:
                # A file made ahead of time holds nothing of this session yet.
                _discard_unused_audit(session.audit, ctx)
            raise
        _open_audit(relay, session, ctx)
    except BaseException as exc:
        relay.remove_session(session)
        if isinstance(exc, RemoteProtocolError):
            await _refuse(relay, tls, exc, ctx, **fields)
            return
        raise
    metrics.session_opened(target.name)
    relay.audit_event("token.accepted", session_id=sid, **fields)
    log.info("session.opened", extra=ctx)
    trailing = request.trailing
    # A tunnel lives long; what only the request needed (the token, its
    # headers) is not kept that long.
    del request, fields
    try:
        await _run_tunnel(relay, session, tls, trailing, ctx)
    finally:
        relay.remove_session(session)


def _discard_unused_audit(writer: AuditWriter, ctx: dict) -> None:
    """Close and remove a session file that received no record of its session."""
    try:
        writer.close()
        writer.path.unlink(missing_ok=True)
    except (OSError, RelayError) as exc:
        log.warning("audit.pool_failed", extra=ctx | {"error": str(exc)})


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


def _check_admission(
    relay: SessionContext, request: TunnelRequested, grant: Grant, info: TLSInfo
) -> None:
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
    # Fail closed without the shared state: this relay could not learn revocations.
    unready = relay.unready_reason()
    if unready is not None:
        raise RemoteProtocolError(_UNREADY.get(unready, unready), reason=unready, status=503)
    limit = relay.config.relay.max_sessions
    if len(relay.sessions) >= limit:
        raise RemoteProtocolError(
            f"the relay is full ({limit} tunnels)", reason="relay_full", status=503
        )
    # 429, not 503: this user is over their own quota; the relay is fine
    # (a 503 would page whoever watches the relay's health).
    per_user = relay.config.limits.max_sessions_per_user
    user = grant.claims.sub
    # Sessions still writing their start record are registered too, so
    # concurrent opens with one token cannot slip past the cap.
    live = [s for s in relay.sessions.values() if s.user == user]
    if len(live) >= per_user:
        raise RemoteProtocolError(
            f"user {user!r} already has {per_user} tunnels open", reason="user_sessions", status=429
        )


# Why a relay that is not admitting tunnels refuses one (log text; peers get the reason code).
_UNREADY = {
    "shutting_down": "the relay is shutting down",
    "state_unavailable": "the relay cannot reach its shared state",
}


def _claimed(token: str | None) -> dict[str, str]:
    """``sub``/``jti`` of a refused token, marked unverified, for the audit trail."""
    if not token:
        return {}
    claimed = peek_unverified(token)
    return {f"claimed_{k}": v for k, v in claimed.items()}


def _grant_fields(grant: Grant) -> dict[str, Any]:
    """Audit fields naming the issuer and the rules that let the user in."""
    fields: dict[str, Any] = {
        "issuer": grant.claims.iss,
        "granted_by": grant.granted_by,
        "admitted_by": grant.admitted_by,
    }
    if grant.cert_rule is not None:
        fields["cert_rule"] = grant.cert_rule
    return fields


def _preflight_headers(target: TargetConfig, claims: Any = None) -> dict[str, str]:
    headers = {"Dbgrelay-Target-Kind": target.kind}
    if target.kd_transport:
        headers["Dbgrelay-Kd-Transport"] = target.kd_transport
    if claims is not None:
        # The connector prints whom the relay sees (percent-encoded: header values are ASCII).
        headers["Dbgrelay-User"] = quote(claims.sub, safe="@.+-_:/")
        groups = ",".join(quote(g, safe="@.+-_:/ ") for g in claims.groups[:64])
        if groups:
            headers["Dbgrelay-Groups"] = groups[:4000]
    return headers


def _open_audit(relay: SessionContext, session: Session, ctx: dict) -> None:
    """Write the session's start record into its audit file, not yet synced.

    The file is the one the session took from :mod:`relay.audit_pool`, or
    is created here when the pool had none.  The record is written to the
    file now and made durable by :func:`_sync_start_record`, which
    :func:`_run_tunnel` overlaps with the backend connect and waits for
    before the 200 and before a byte reaches the backend.

    Raises:
        RemoteProtocolError: 503 ``audit_unavailable`` (fail closed).
    """
    claims, target, info = session.grant.claims, session.grant.target, session.tls
    started = datetime.fromtimestamp(session.started, UTC)
    try:
        if session.audit is None:
            session.audit = relay.create_audit_file(session.id, started)
        session.audit.append(
            "session.opened",
            session_id=session.id,
            user=claims.sub,
            jti=claims.jti,
            client=session.peer,
            tls_version=info.version,
            tls_cipher=info.cipher,
            tls_group=info.group,
            tls_resumed=info.resumed,
            client_cert=info.peer_subject,
            client_cert_serial=str(info.peer_serial) if info.peer_serial is not None else None,
            target=target.name,
            **_grant_fields(session.grant),
            kind=target.kind,
            backend=target.backend_url,
            token_exp=claims.exp,
            start=started.isoformat(),
        )
        session.audit.flush()
    except (OSError, RelayError) as exc:
        relay.metrics.audit_write_error()
        log.error("audit.unwritable", extra=ctx | {"error": str(exc)})
        if session.audit is not None:
            # The file holds session.opened: end it, as every session file
            # ends, if the disk lets us.  Either way close it; a failure here
            # must not replace the 503 the client is owed.
            with contextlib.suppress(OSError, RelayError):
                session.audit.close_session(reason="audit_failed", error=str(exc)[:500])
            with contextlib.suppress(OSError, RelayError):
                session.audit.close()
        raise RemoteProtocolError(
            "the relay cannot write its audit log", reason="audit_unavailable", status=503
        ) from exc


async def _sync_start_record(
    relay: SessionContext, session: Session, failed: list[Exception]
) -> None:
    """Make the start record durable (fdatasync); a failure is put in ``failed``.

    Its file and folder entry are on disk already when the file came from
    the pool, so this is one ``fdatasync`` of the appended record.
    """
    assert session.audit is not None
    try:
        await relay.sync_audit(session.audit)
    except (OSError, RelayError) as exc:
        failed.append(exc)
    else:
        session.opening = False


async def _refuse(
    relay: SessionContext,
    tls: trio.abc.Stream,
    exc: RemoteProtocolError,
    ctx: dict,
    **fields: Any,
) -> None:
    """Answer with a status and one-line reason, log and count it, close."""
    relay.metrics.refusal(exc.reason)
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
    await _send_and_close(
        tls,
        render_refusal(exc.status, exc.reason, message),
        limit=relay.config.relay.final_write_timeout,
    )


# What a refused peer is told: short, and never the token, paths or internals.
_PEER_MESSAGES = {
    "missing": "send the token as Proxy-Authorization: Bearer <token>",
    "malformed": "the token is malformed; ask an admin for a new one",
    "expired": "the token has expired; ask an admin for a new one",
    "not_yet_valid": "the token is not valid yet; check this machine's clock",
    "bad_signature": "the token's signature does not verify",
    "bad_issuer": "the token was issued for another relay",
    "bad_audience": "the token was issued for another relay",
    "unknown_kid": "the token was signed with a key this relay does not know",
    "bad_algorithm": "the token's signature algorithm is not accepted",
    "missing_claim": "the token lacks a required claim",
    "revoked": "the token has been revoked",
    "cert_revoked": "this client certificate has been revoked",
    "not_granted": "the token does not grant this target",
    "not_allowed": "this user may not use this target",
    "cert_user_mismatch": "this target needs a client certificate that names your user",
    "bad_azp": "the token was issued to another client (azp)",
    "keys_unavailable": "the relay has not yet fetched the signing keys of the token's issuer",
    "keys_stale": "the relay cannot reach the token's identity provider; try again later",
    "unknown_target": "no such target",
    "pq_required": "this target requires post-quantum key exchange (X25519MLKEM768)",
    "relay_full": "too many tunnels; try again later",
    "user_sessions": "you have too many tunnels open; close one and try again",
    "shutting_down": "the relay is shutting down; try again later",
    "audit_unavailable": "the relay cannot record sessions right now",
    "backend_unreachable": "the debug server is not reachable",
    "backend_timeout": "the debug server did not answer in time",
    "backend_unsupported": "this relay cannot reach that kind of debug server",
    "launch_failed": "the debug server could not be started",
    "backend_reset": "the debug server dropped the connection before the tunnel opened",
    "backend_closed": "the debug server closed the connection before the tunnel opened",
    "ended_by_admin": "an admin ended this tunnel",
    "server_elsewhere": "the target's debug server runs on another relay; try that one or later",
}


async def _throttle(
    relay: SessionContext,
    tls: trio.abc.Stream,
    admission: Admission,
    refused: Refused,
    **fields: Any,
) -> None:
    """Answer 429 with Retry-After; counted, and reported at most every few seconds."""
    admission.throttled(refused.reason, **fields)
    retry = str(refused.retry_after or 1)
    message = f"too many failed attempts from your address; retry in {retry} s"
    await _send_and_close(
        tls,
        render_refusal(429, refused.reason, message, headers={"Retry-After": retry}),
        limit=relay.config.relay.final_write_timeout,
    )


# How a tunnel ended before its 200 is answered: (status, reason code).
_ENDED_BEFORE_OPEN = {
    "revoked": (401, "revoked"),
    "token_expired": (401, "expired"),
    "shutdown": (503, "shutting_down"),
    "audit_failed": (503, "audit_unavailable"),
    "ended_by_admin": (503, "ended_by_admin"),
}


async def _answer(relay: SessionContext, tls: trio.abc.Stream, status: int, reason: str) -> None:
    """Send a refusal line inside a tunnel that was authorised; bounded, best effort."""
    message = _PEER_MESSAGES.get(reason, reason)
    with trio.move_on_after(relay.config.relay.final_write_timeout):
        try:
            await tls.send_all(render_refusal(status, reason, message))
        except _BROKEN:
            pass


async def _sync_end_record(relay: SessionContext, audit: AuditWriter) -> None:
    """fsync the end record within ``relay.session_end_timeout``: a hung disk
    must not hold the session's teardown, or the relay's shutdown, forever.

    Raises:
        RelayError: the fsync did not finish in time (the record may not be durable).
    """
    limit = relay.config.relay.session_end_timeout
    with trio.move_on_after(limit) as scope:
        await relay.sync_audit(audit)
    if scope.cancelled_caught:
        raise RelayError(
            f"{audit.path}: fsync did not finish within {limit:g}s (relay.session_end_timeout)",
            reason="audit_failed",
        )


def _backend_gone(backend: trio.abc.Stream) -> str | None:
    """``backend_reset``/``backend_closed`` if the backend already dropped the connection.

    A non-blocking peek at the socket: it reports only what has already
    arrived, and never waits.  A server that resets later is seen by the
    pump instead.  Streams without a socket (tests' memory streams) pass.
    """
    sock = getattr(backend, "socket", None)
    if sock is None:
        return None
    probe = stdlib_socket.socket(fileno=sock.fileno())
    try:
        data = probe.recv(1, stdlib_socket.MSG_PEEK | getattr(stdlib_socket, "MSG_DONTWAIT", 0))
    except BlockingIOError:
        return None
    except OSError:
        return "backend_reset"
    finally:
        probe.detach()
    return None if data else "backend_closed"


async def _run_tunnel(
    relay: SessionContext,
    session: Session,
    tls: trio.abc.Stream,
    trailing: bytes,
    ctx: dict,
) -> None:
    target = session.grant.target
    audit = session.audit
    assert audit is not None
    reason: str | None = None
    detail: str | None = None
    backend: trio.abc.Stream | None = None
    managed: ManagedServer | None = None
    recorder: ByteRecorder | None = None
    established = False
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

            # Backend: launch (or reuse) a managed server, then connect, while
            # the start record goes to disk; both are done before anything
            # is sent either way.
            unsynced: list[Exception] = []
            backend_error: BackendError | None = None
            async with trio.open_nursery() as overlap:
                overlap.start_soon(_sync_start_record, relay, session, unsynced)
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
                    # A managed server is reached through its launcher, never on the host.
                    backend = await relay.open_backend(
                        managed or backend_addr, connect_timeout=target.connect_timeout
                    )
                except BackendError as exc:
                    backend_error = exc
            if unsynced:
                relay.metrics.audit_write_error()
                reason, detail = "audit_failed", f"start record not on disk: {unsynced[0]}"
                log.error("audit.unwritable", extra=ctx | {"error": str(unsynced[0])})
                await _answer(relay, tls, 503, "audit_unavailable")
                return
            if backend_error is not None:
                exc = backend_error
                relay.metrics.backend_connect_error(target.name)
                reason, detail = exc.reason, str(exc)
                audit.append("backend.failed", reason=exc.reason, error=str(exc))
                log.warning("backend.failed", extra=ctx | {"reason": exc.reason, "error": str(exc)})
                await _answer(relay, tls, 502, exc.reason)
                return
            assert backend is not None
            gone = _backend_gone(backend)
            if gone is not None:
                # Connected, but the server already reset or closed it (a
                # server that accepts and drops, a port held by something
                # else): say 502 while the client can still be told.
                relay.metrics.backend_connect_error(target.name)
                reason, detail = gone, "the backend closed the connection before the tunnel opened"
                audit.append("backend.failed", reason=gone, error=detail)
                log.warning("backend.failed", extra=ctx | {"reason": gone, "error": detail})
                await _answer(relay, tls, 502, gone)
                return
            audit.append("backend.connected", backend=str(backend_addr))

            if target.record:
                try:
                    recorder = ByteRecorder.create(
                        audit.path.with_name(f"{session.id}.bytes.jsonl"),
                        session_id=session.id,
                        max_bytes=target.record_max_bytes,
                        clock=relay.audit_clock,
                    )
                except (OSError, RelayError) as exc:
                    # Fail closed: a target that must be recorded is not
                    # reached unrecorded.  Nothing was forwarded yet.
                    relay.metrics.audit_write_error()
                    reason, detail = "audit_failed", f"byte recording failed: {exc}"
                    log.error("audit.unwritable", extra=ctx | {"error": str(exc)})
                    await _answer(relay, tls, 503, "audit_unavailable")
                    return

            try:
                established = True
                # All of the 200 or none of it: an end (revocation, admin)
                # arriving while it is written takes effect right after it,
                # instead of leaving the client half a status line.
                limit = relay.config.relay.final_write_timeout
                with trio.CancelScope(shield=True, deadline=trio.current_time() + limit) as ok:
                    await tls.send_all(render_established(session_id=session.id))
                if ok.cancelled_caught:
                    reason, detail = "client_error", f"the 200 was not taken within {limit:g}s"
                    return
                if trailing:
                    # Bytes sent right behind the request head belong to the debugger.
                    await backend.send_all(trailing)
                    session.traffic.to_backend += len(trailing)
                    if recorder is not None:
                        recorder.add("c2b", 0.0, trailing)
            except _BROKEN as exc:
                reason, detail = "client_error", str(exc)
                return
            except (OSError, RelayError) as exc:
                # Only the recorder raises these here.
                relay.metrics.audit_write_error()
                reason, detail = "audit_failed", f"byte recording failed: {exc}"
                return

            tap = None
            if recorder is not None:

                def tap(direction: str, data: bytes) -> None:
                    recorder.add(direction, trio.current_time() - t0, data)

            with trio.CancelScope() as idle:
                try:
                    result = await driver_for(relay.config.relay.data_plane)(
                        tls,
                        backend,
                        session.traffic,
                        activity=idle,
                        idle_timeout=target.idle_timeout,
                        close_timeout=relay.config.relay.close_timeout,
                        tap=tap,
                    )
                    reason, detail = result.reason, result.detail
                    traffic = session.traffic
                    if reason == BACKEND_ERROR and not (traffic.to_backend or traffic.to_client):
                        # Reset before a byte moved: the client saw 200 then EOF;
                        # the end record at least names the cause.
                        reason = "backend_reset"
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
            if not established:
                # Ended (revoked, by an admin, at shutdown, token expired)
                # before the 200: the client gets a refusal, not a bare close.
                status, code = _ENDED_BEFORE_OPEN.get(reason, (503, reason))
                await _answer(relay, tls, status, code)
    finally:
        with trio.CancelScope(shield=True):
            if reason is None:
                # Cancelled from outside the session's own scope.
                draining = relay.unready_reason() == "shutting_down"
                reason = session.end_reason or ("shutdown" if draining else "error")
            await _end_session(
                relay,
                session,
                tls,
                ctx,
                reason=reason,
                detail=detail,
                duration=trio.current_time() - t0,
                backend=backend,
                managed=managed,
                recorder=recorder,
            )


# Failures a teardown step may meet on a full or broken disk: logged without
# a traceback.  Anything else is a bug: logged with one, and teardown goes on.
_EXPECTED_IN_TEARDOWN = (OSError, RelayError)


def _teardown_failed(relay: SessionContext, ctx: dict, step: str, exc: Exception) -> None:
    if isinstance(exc, _EXPECTED_IN_TEARDOWN):
        if step.startswith("audit") or step.startswith("recording"):
            with contextlib.suppress(Exception):  # a broken metrics object must not stop us
                relay.metrics.audit_write_error()
            log.error("audit.unwritable", extra=ctx | {"step": step, "error": str(exc)})
        else:
            log.error("session.teardown_failed", extra=ctx | {"step": step, "error": str(exc)})
    else:
        log.error(
            "session.teardown_failed",
            extra=ctx | {"step": step, "error": repr(exc)},
            exc_info=exc,
        )


async def _end_session(
    relay: SessionContext,
    session: Session,
    tls: trio.abc.Stream,
    ctx: dict,
    *,
    reason: str,
    detail: str | None,
    duration: float,
    backend: trio.abc.Stream | None,
    managed: ManagedServer | None,
    recorder: ByteRecorder | None,
) -> None:
    """Tear a tunnel down: every step runs, whatever the ones before it raised.

    Order: the backend connection, the managed server's tunnel count, the
    bytes file, the one ``session.closed`` record (written and fsync'd), the
    session file, the byte and session metrics, the log line, a signature on
    the relay file, and last the client's connection, so the client sees the
    end only once the end record is on disk.  A step that fails (a full
    disk, a backend that will not close, a bug) is logged, and the steps
    after it still run: the end record is attempted exactly once, every file
    descriptor is closed and every gauge returns.

    Cancellation:
        Call it inside a shielded scope: a cancelled teardown would leave the
        gauges and files this function exists to settle.
    """
    audit = session.audit
    assert audit is not None
    fields: dict[str, Any] = {
        "reason": reason,
        "bytes_to_backend": session.traffic.to_backend,
        "bytes_to_client": session.traffic.to_client,
        "duration": round(duration, 6),
    }
    if detail:
        fields["error"] = detail[:500]

    if backend is not None:
        try:
            await _close(backend, limit=relay.config.relay.final_write_timeout)
        except Exception as exc:
            _teardown_failed(relay, ctx, "backend_close", exc)
    if managed is not None:
        try:
            managed.tunnel_closed()
        except Exception as exc:
            _teardown_failed(relay, ctx, "managed_release", exc)
    if recorder is not None:
        try:
            fields |= dict(zip(("bytes_hash", "bytes_records"), recorder.close(), strict=True))
        except Exception as exc:
            _teardown_failed(relay, ctx, "recording_close", exc)
            fields["bytes_error"] = str(exc)[:500]
            # The file is closed anyway, and a second close() returns what it
            # should hold: the end record names it, so verify reports the gap.
            with contextlib.suppress(Exception):
                pair = recorder.close()
                fields |= {"bytes_hash": pair[0], "bytes_records": pair[1]}
    try:
        audit.close_session(**fields)
    except Exception as exc:
        _teardown_failed(relay, ctx, "audit_end_record", exc)
    else:
        try:
            await _sync_end_record(relay, audit)
        except Exception as exc:
            _teardown_failed(relay, ctx, "audit_sync", exc)
    try:
        audit.close()
    except Exception as exc:
        _teardown_failed(relay, ctx, "audit_close", exc)
    try:
        relay.flush_bytes(session)
    except Exception as exc:
        _teardown_failed(relay, ctx, "metrics_bytes", exc)
    try:
        relay.metrics.session_closed(session.target, outcome=reason, duration=duration)
    except Exception as exc:
        _teardown_failed(relay, ctx, "metrics_session", exc)
    log.info("session.closed", extra=ctx | fields)
    try:
        relay.checkpoint_relay_audit()
    except Exception as exc:
        _teardown_failed(relay, ctx, "audit_relay_checkpoint", exc)
    try:
        await _close(tls, limit=relay.config.relay.final_write_timeout)
    except Exception as exc:
        _teardown_failed(relay, ctx, "client_close", exc)
