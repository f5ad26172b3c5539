"""The long-lived relay: listeners, sessions, managed servers, housekeeping.

::

    main nursery
    ├─ accept.serve_listeners(...) one task per connection -> gate -> session.handle_connection
    ├─ housekeeping                audit fsync + checkpoints, byte metrics, revocation
    ├─ probes                      forgotten-server detection for unmanaged targets
    ├─ metrics / admin endpoints
    └─ signals                     reload trigger (SIGHUP / named event), drain on stop signals
    managed nursery
    └─ one ManagedServer.run per launched debug server
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from auth import (
    KeySet,
    RevocationSet,
    RevocationStore,
    TokenCache,
    load_audit_key,
    load_jwks,
)
from config import Config, TargetConfig, format_address, load_config

from . import access
from .accept import serve_listeners
from .access import ClientCertNames, Grant
from .audit import AuditWriter, relay_audit_path, session_audit_path
from .audit_pool import AuditPool
from .backends import ManagedServer, default_launchers, open_backend
from .errors import LocalProtocolError, RelayError
from .gate import Gate
from .identity import IdentityKeys, issuer_ssl_contexts
from .metrics import Metrics, NilMetrics
from .platform import STOP_SIGNALS, run_reload_trigger
from .session import Session, handle_connection
from .state import SessionLeases, SharedState, WorkerSessions, open_revocation_store
from .tls import ServerEngine, ServerTLS, make_server_engine
from .watch import run_watch
from .workers import open_reuseport_listeners

if TYPE_CHECKING:
    from auth import PgRevocationStore

__all__ = ["Relay", "ReloadResult", "open_relay", "serve_relay", "load_runtime", "Runtime"]

log = logging.getLogger("dbgrelay.relay")
audit_log = logging.getLogger("audit")

VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything built from the config files, swapped as one on reload."""

    config: Config
    keys: KeySet
    tls_engine: Any
    audit_key: Any


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did.

    Attributes:
        ok: The new config, certificates and keys are in use.
        problems: Why the new config was refused (empty when ``ok``).
        restart_needed: Changed keys that only a restart applies
            (``relay.listen``, ``relay.state_dir``, ``relay.user``, the
            ``[metrics]`` keys, ``admin.listen``, ``identity.oidc``, the
            ``[state]`` keys); the running relay keeps their old values.
        targets: The target names in use after the reload.
    """

    ok: bool
    problems: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.ok


# Keys bound to sockets or files opened once at start: a reload cannot apply them.
_RESTART_KEYS: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("relay.listen", lambda c: c.relay.listen),
    ("relay.state_dir", lambda c: c.relay.state_dir),
    ("relay.user", lambda c: c.relay.user),
    ("metrics.listen", lambda c: c.metrics.listen),
    ("metrics.bearer_token_file", lambda c: c.metrics.bearer_token_file),
    ("metrics.tls_cert", lambda c: c.metrics.tls_cert),
    ("metrics.tls_key", lambda c: c.metrics.tls_key),
    ("metrics.client_ca", lambda c: c.metrics.client_ca),
    ("admin.listen", lambda c: c.admin.listen),
    ("identity.oidc", lambda c: c.identity.oidc),
    ("state", lambda c: c.state),
)


def _keep_bound(new: Config, old: Config) -> Config:
    """``new`` with the old values of the keys that need a restart."""
    return dataclasses.replace(
        new,
        relay=dataclasses.replace(
            new.relay, listen=old.relay.listen, state_dir=old.relay.state_dir, user=old.relay.user
        ),
        metrics=old.metrics,
        admin=old.admin,
        identity=dataclasses.replace(new.identity, oidc=old.identity.oidc),
        state=old.state,
    )


def server_engine(
    config: Config, *, is_serial_revoked: Callable[[int], bool] | None = None
) -> ServerEngine:
    """The TLS server engine ``[tls]`` describes, with a new session-ticket key.

    Raises:
        RelayError: a file cannot be used; the message names it.
    """
    return make_server_engine(
        engine=config.tls.engine,
        cert=config.tls.cert,
        key=config.tls.key,
        min_version=config.tls.min_version,
        client_ca=config.tls.client_ca,
        require_client_cert=config.tls.require_client_cert,
        is_serial_revoked=is_serial_revoked,
        ocsp_response=config.tls.ocsp_response,
        ticket_lifetime=config.tls.ticket_key_interval,
    )


def load_runtime(
    config: Config, *, is_serial_revoked: Callable[[int], bool] | None = None
) -> Runtime:
    """Load keys and certificates named by ``config``.

    Raises:
        RelayError or AuthError: a file cannot be used; the message names it.
    """
    keys = load_jwks(config.auth.jwks)
    engine = server_engine(config, is_serial_revoked=is_serial_revoked)
    audit_key = load_audit_key(config.auth.audit_key) if config.auth.audit_key else None
    issuer_ssl_contexts(config.identity.oidc)  # a bad identity.oidc ca fails here, not later
    return Runtime(config=config, keys=keys, tls_engine=engine, audit_key=audit_key)


def open_relay(
    config: Config,
    *,
    metrics: Metrics | NilMetrics | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> Relay:
    """Open the relay's state from ``config``: all the disk I/O of starting up.

    Creates ``relay.state_dir`` (mode 0700), opens the revocation store and
    reads the current revocations, and loads the keys, certificates and
    IdP CA bundles the config names.

    Args:
        config: The validated configuration.
        metrics: A :class:`Metrics` or :class:`NilMetrics`.
        wall_clock: Unix time source for token checks (tests pass one tied
            to trio's mock clock).

    Returns:
        The relay, ready for :func:`serve_relay`.

    Raises:
        OSError: the state folder cannot be created.
        RelayError or AuthError: a file cannot be used; the message names it.

    Resource handling:
        The caller closes the relay with :meth:`Relay.close`; if this raises,
        everything it opened is already closed.
    """
    config.relay.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_revocation_store(config)
    try:
        relay: Relay  # bound below; neither callback runs before the relay serves

        def is_serial_revoked(serial: int) -> bool:
            # The TLS engine checks client certificates against our revocations.
            return relay.is_serial_revoked(serial)

        def audit(event: str, **fields: Any) -> None:
            relay.audit_event(event, **fields)

        runtime = load_runtime(config, is_serial_revoked=is_serial_revoked)
        identity = IdentityKeys(config.identity.oidc, wall_clock=wall_clock, audit=audit)
        relay = Relay(runtime, store, identity, metrics=metrics, wall_clock=wall_clock)
    except BaseException:
        store.close()
        raise
    try:
        relay.refresh_revocations()
    except BaseException:
        relay.close()  # the store, and the shared state built on it
        raise
    return relay


class Relay:
    """The relay's state, shared by the sessions and the housekeeping tasks.

    Build one with :func:`open_relay`, which does the disk I/O; the
    constructor only wires together what it is given.

    Sessions, the watcher and the gate see it only through the contexts
    they declare (:class:`relay.session.SessionContext` and
    :class:`relay.watch.WatchContext`, both extending
    :class:`relay.context.RelayContext`, which the gate uses as it is);
    ``tests/relay/test_imports.py`` checks that it provides them.

    Args:
        runtime: Keys, certificates and TLS engine loaded from the config.
        store: The open revocation store; :meth:`close` closes it.
        identity: Signing keys of the OIDC issuers.
        metrics: A :class:`Metrics` or :class:`NilMetrics`.
        wall_clock: Unix time source for token checks (tests pass one tied
            to trio's mock clock).
    """

    def __init__(
        self,
        runtime: Runtime,
        store: RevocationStore | PgRevocationStore,
        identity: IdentityKeys,
        *,
        metrics: Metrics | NilMetrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        config = runtime.config
        self.metrics = metrics if metrics is not None else NilMetrics()
        self.wall_clock = wall_clock
        # How tunnels reach backends; tests swap in an in-memory listener.
        self.open_backend = open_backend
        # fsync in a worker thread so a slow disk does not stall every tunnel.
        # Tests on trio's autojump clock turn this off: the clock would jump
        # to the next deadline while the thread runs.
        self.fsync_in_thread = True
        self.sessions: dict[str, Session] = {}
        self.draining = False
        self.managed: dict[str, ManagedServer] = {}
        self._launch_locks: dict[str, trio.Lock] = {}
        self._managed_nursery: trio.Nursery | None = None
        # Starts managed servers' launchers; `dbgrelay serve` passes the privileged helper.
        self.launchers = default_launchers()
        self.listeners: list[trio.SocketListener] = []
        # Set by ``serve --workers``: this process is one of several sharing the port.
        self.worker_index: int | None = None
        # Worker 0 with SQLite: the other workers' admin endpoints, by index.
        self.worker_siblings: dict[int, Any] = {}
        self.store = store
        # With PostgreSQL, revocations are shared by every relay of a cluster.
        self.shared: SharedState | None = None
        if config.state.backend == "postgres":
            self.shared = SharedState(self.store, config.state, metrics=self.metrics)
        # Live sessions in a table shared with other relays: the cluster's
        # (PostgreSQL) or, with ``serve --workers N`` and SQLite, the host's
        # workers' (set by the CLI).  ``None`` for a single SQLite relay,
        # which counts its sessions in memory and writes nothing per tunnel.
        self.leases: SessionLeases | None = self.shared
        # Who owns a target's managed server: the cluster's advisory locks
        # (PostgreSQL) or, with ``serve --workers N`` and SQLite, the host's
        # lock files (set by the CLI).  ``None`` for a single SQLite relay.
        self.server_claims: SharedState | WorkerSessions | None = self.shared
        # Filled by refresh_revocations(), which open_relay calls first.
        self.revoked: RevocationSet = RevocationSet()
        self._revocation_version: int | None = None
        self.runtime = runtime
        self.tls = ServerTLS(self.runtime.tls_engine)
        # Signing keys of the OIDC issuers, refreshed by serve_relay's identity task.
        self.identity = identity
        # Tokens verified before: a connector opening several tunnels pays
        # the signature check once (revocation is still checked every time).
        self.token_cache = TokenCache()
        # Server handshakes at once (limits.max_handshakes; a reload resizes it).
        self.handshake_slots = trio.CapacityLimiter(config.limits.max_handshakes)
        # Session audit files made ahead of time (filled by serve_relay).
        self.audit_pool = AuditPool()
        self._relay_audit: AuditWriter | None = None
        self._relay_audit_day: str | None = None
        # Monotonic (trio) time each target last saw a tunnel end, for forgotten-server checks.
        self.last_activity: dict[str, float] = {}
        self.forgotten: set[str] = set()
        self._no_sessions = trio.Event()
        # Sessions someone waits to see gone (the admin API's end request).
        self._gone: dict[str, trio.Event] = {}

    # -- the current runtime ------------------------------------------------

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def keys(self) -> KeySet:
        return self.runtime.keys

    @property
    def audit_key(self) -> Any:
        return self.runtime.audit_key

    def is_serial_revoked(self, serial: int) -> bool:
        return self.revoked.is_serial_revoked(serial)

    def authorize(
        self,
        token: str | None,
        target_name: str,
        *,
        config: Config,
        client_cert: ClientCertNames | None,
    ) -> Grant:
        """Check a tunnel's token with the current keys, revocations and OIDC trust.

        Args:
            token: The bearer token, or ``None`` if the request had none.
            target_name: The requested target.
            config: The configuration the request is judged by (the
                session's, as of its connection).
            client_cert: Names in the verified client certificate, if any.

        Raises:
            RemoteProtocolError: 401, 403 or 404 with the reason code.
        """
        return access.authorize(
            token=token,
            target_name=target_name,
            config=config,
            keys=self.keys,
            revoked=self.revoked,
            now=self.wall_clock(),
            oidc=self.identity.trust(),
            client_cert=client_cert,
            cache=self.token_cache,
        )

    # -- audit ---------------------------------------------------------------

    def audit_event(self, event: str, **fields: Any) -> None:
        """Append a relay-level record (refused handshakes, reloads) and log it."""
        audit_log.info(event, extra=fields)
        try:
            writer = self._relay_writer()
            writer.append(event, **fields)
            writer.flush()
        except (OSError, RelayError) as exc:
            self.metrics.audit_write_error()
            log.error("audit.unwritable", extra={"error": str(exc)})

    def _relay_writer(self) -> AuditWriter:
        now = datetime.fromtimestamp(self.wall_clock(), UTC)
        day = now.strftime("%Y-%m-%d")
        if self._relay_audit is None or self._relay_audit_day != day:
            if self._relay_audit is not None:
                self._retire_relay_writer()
            path = relay_audit_path(self.config.relay.audit_dir, now)
            # Records older than checkpoint_interval are never left unsigned.
            sign_interval = self.config.relay.checkpoint_interval
            if path.exists():
                self._relay_audit = AuditWriter.open_append(
                    path,
                    signing_key=self.audit_key,
                    clock=self.audit_clock,
                    sign_interval=sign_interval,
                )
            else:
                self._relay_audit = AuditWriter.create(
                    path,
                    kind="relay",
                    session_id=None,
                    signing_key=self.audit_key,
                    clock=self.audit_clock,
                    sign_interval=sign_interval,
                )
            self._relay_audit_day = day
        return self._relay_audit

    def _retire_relay_writer(self) -> None:
        """Sign and close the relay file before the relay moves to another one.

        A file left with unsigned records at its end would fail
        ``audit verify`` for good: nothing would ever sign them.
        """
        writer, self._relay_audit = self._relay_audit, None
        if writer is None:
            return
        try:
            writer.checkpoint()
            writer.sync()
        except (OSError, RelayError) as exc:
            self.metrics.audit_write_error()
            log.error("audit.unwritable", extra={"error": str(exc)})
        finally:
            try:
                writer.close()
            except (OSError, RelayError) as exc:
                log.error("audit.unwritable", extra={"error": str(exc)})

    def checkpoint_relay_audit(self) -> None:
        """Sign what the relay file holds so far (no fsync; housekeeping does that).

        Called when a session ends, so the records of that session in the
        relay file (its ``token.accepted``) are covered by a signature at
        once, not only at the next scheduled checkpoint.
        """
        writer = self._relay_audit
        if writer is None or writer.closed:
            return
        try:
            writer.checkpoint()
            writer.flush()
        except (OSError, RelayError) as exc:
            self.metrics.audit_write_error()
            log.error("audit.unwritable", extra={"error": str(exc)})

    def take_audit_file(self, now: datetime, *, config: Config) -> tuple[str, AuditWriter] | None:
        """A session file made ahead of time (see :mod:`relay.audit_pool`) and its session id.

        Args:
            now: When the session starts (the file's day folder).
            config: The configuration whose audit folder and checkpoint
                interval the file must have (the session's).

        Returns:
            ``None`` when the pool has no file that fits (the current key included).
        """
        return self.audit_pool.take(
            audit_dir=config.relay.audit_dir,
            signing_key=self.audit_key,
            sign_interval=config.relay.checkpoint_interval,
            now=now,
        )

    def create_audit_file(self, session_id: str, started: datetime) -> AuditWriter:
        """Create a session's audit file now (the pool had none ready).

        Raises:
            OSError or RelayError: the file cannot be created.
        """
        return AuditWriter.create(
            session_audit_path(self.config.relay.audit_dir, session_id, started),
            kind="session",
            session_id=session_id,
            signing_key=self.audit_key,
            clock=self.audit_clock,
            sign_interval=self.config.relay.checkpoint_interval,
        )

    def audit_clock(self) -> datetime:
        """Timestamps for audit records, from the relay's wall clock."""
        return datetime.fromtimestamp(self.wall_clock(), UTC)

    async def sync_audit(self, writer: AuditWriter) -> None:
        """Flush and fsync one audit file, off the event loop."""
        writer.flush()
        if self.fsync_in_thread:
            # Abandoned on cancel, so a deadline can bound a hung disk.
            await trio.to_thread.run_sync(writer.sync, abandon_on_cancel=True)
        else:
            writer.sync()

    def flush_bytes(self, session: Session) -> None:
        """Push a session's byte counts into the metrics (batched, not per chunk)."""
        t, r = session.traffic, session.reported
        if t.to_backend != r.to_backend or t.to_client != r.to_client:
            self.metrics.add_bytes(
                session.target,
                to_backend=t.to_backend - r.to_backend,
                to_client=t.to_client - r.to_client,
            )
            r.to_backend, r.to_client = t.to_backend, t.to_client

    # -- managed servers -----------------------------------------------------

    async def managed_server(self, target: TargetConfig) -> tuple[ManagedServer, bool]:
        """The running server for ``target``, launched now if there is none.

        Returns:
            The server and whether this call launched it.

        Raises:
            BackendError: it could not be launched.
        """
        lock = self._launch_locks.setdefault(target.name, trio.Lock())
        async with lock:
            server = self.managed.get(target.name)
            if server is not None and server.running:
                return server, False
            if self.server_claims is not None:
                # One relay of the cluster (worker of the host) runs a target's server at a time.
                await self.server_claims.claim_server(target.name)
            server = ManagedServer(
                target,
                log_dir=self.config.relay.state_dir / "servers",
                on_event=partial(self._server_event, target.name),
                run_as=self.config.run_as(target),
                launchers=self.launchers,
            )
            assert self._managed_nursery is not None
            self.managed[target.name] = server
            try:
                await self._managed_nursery.start(server.run)
            except BaseException:
                if self.server_claims is not None:
                    self.server_claims.release_server(target.name)
                raise
            self.metrics.managed_servers(target.name, 1)
            return server, True

    def _server_event(self, target: str, event: str, fields: dict) -> None:
        self.audit_event(event, target=target, **fields)
        log.info(event, extra={"target": target} | fields)
        if event == "server.exited":
            if self.server_claims is not None:
                self.server_claims.release_server(target)
            self.metrics.managed_servers(target, 0)
            if fields.get("reason") in ("idle", "max_session"):
                self.metrics.idle_kill(target)

    def add_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        if self.leases is not None:
            self.leases.sessions_changed()

    def unready_reason(self) -> str | None:
        """Why new tunnels would be refused now (for ``/readyz``), or ``None`` while admitted."""
        if self.draining:
            return "shutting_down"
        if self.shared is not None and not self.shared.admitting():
            return "state_unavailable"
        return None

    async def claim_in_cluster(self, session: Session) -> None:
        """Register ``session`` in the shared table if its user is within the cap there.

        With PostgreSQL the per-user cap counts the cluster's sessions; with
        SQLite workers it counts the host's, and so does ``max_sessions``
        (in a cluster that one stays per relay).  A single SQLite relay has
        no table: its caps were checked in memory at admission.

        Raises:
            RemoteProtocolError: 429 ``user_sessions``, 503 ``relay_full`` or
                503 ``state_unavailable``.
        """
        if self.leases is None:
            return
        await self.leases.claim_session(
            session,
            limit=self.config.limits.max_sessions_per_user,
            live=set(self.sessions),
            total=None if self.shared is not None else self.config.relay.max_sessions,
        )

    def remove_session(self, session: Session) -> None:
        del self.sessions[session.id]
        if self.leases is not None:
            self.leases.session_closed(session.id)
        self.last_activity[session.target] = trio.current_time()
        gone = self._gone.pop(session.id, None)
        if gone is not None:
            gone.set()
        if not self.sessions:
            self._no_sessions.set()
            self._no_sessions = trio.Event()

    async def wait_no_sessions(self) -> None:
        if self.sessions:
            await self._no_sessions.wait()

    async def wait_session_gone(self, session_id: str) -> None:
        """Return once the session has ended and its end record is written."""
        if session_id in self.sessions:
            await self._gone.setdefault(session_id, trio.Event()).wait()

    # -- TLS session tickets --------------------------------------------------

    def new_ticket_key(self) -> None:
        """Start issuing session tickets under a new key; earlier tickets stop resuming.

        Neither engine lets the relay set OpenSSL's ticket key, which is made
        with each context: so the server context is built again, from the
        ``[tls]`` files as of the last reload.  Live tunnels keep theirs.  If
        the files cannot be loaded now, the current context stays (logged).
        """
        try:
            engine = server_engine(self.config, is_serial_revoked=self.is_serial_revoked)
        except RelayError as exc:
            log.error("tls.ticket_key_failed", extra={"error": str(exc)})
            return
        self.runtime = dataclasses.replace(self.runtime, tls_engine=engine)
        self.tls.swap(engine)
        log.info("tls.ticket_key_rotated")

    async def run_ticket_keys(self) -> None:
        """Rotate the session-ticket key every ``tls.ticket_key_interval`` seconds."""
        while True:
            interval = self.config.tls.ticket_key_interval
            if interval <= 0:
                # No tickets are issued; look again after a reload might change that.
                await trio.sleep(60)
                continue
            await trio.sleep(interval)
            if self.config.tls.ticket_key_interval > 0:
                self.new_ticket_key()  # reads two small files, once per interval

    # -- housekeeping --------------------------------------------------------

    def refresh_revocations(self) -> None:
        """Re-read the revocation store if it changed; end revoked live tunnels."""
        version = self.store.data_version()
        if version == self._revocation_version:
            return
        self._revocation_version = version
        self.revoked = self.store.snapshot()
        for session in list(self.sessions.values()):
            serial = session.tls.peer_serial
            if self.revoked.is_revoked(session.grant.claims) or (
                serial is not None and self.revoked.is_serial_revoked(serial)
            ):
                log.info(
                    "session.revoked",
                    extra={"session_id": session.id, "jti": session.grant.claims.jti},
                )
                session.end("revoked")

    async def run_housekeeping(self) -> None:
        """Periodic work: revocations, audit fsync, checkpoints, byte metrics.

        Every ``checkpoint_interval`` seconds, each audit file with records
        after its last signature (live session files, the relay file) gets a
        signed ``audit.checkpoint`` and is fsync'd; files whose last record
        is signed get nothing.  So a record stays unsigned for at most
        ``checkpoint_interval``, which bounds what a crash leaves covered by
        the hash chain alone.
        """
        rc = self.config.relay
        next_checkpoint = trio.current_time() + rc.checkpoint_interval
        interval = max(0.05, min(rc.revocation_interval, rc.audit_fsync_interval or 1.0))
        while True:
            # Wake for the checkpoint on time, not at the next tick after it.
            await trio.sleep(max(0.0, min(interval, next_checkpoint - trio.current_time())))
            self.refresh_revocations()
            checkpoint = trio.current_time() >= next_checkpoint
            if checkpoint:
                next_checkpoint = trio.current_time() + self.config.relay.checkpoint_interval
            for session in list(self.sessions.values()):
                self.flush_bytes(session)
                # The await below lets other sessions end meanwhile: skip those
                # whose end record is written (a checkpoint after it would be refused).
                if session.audit is None or session.audit.ended:
                    continue
                try:
                    if checkpoint:
                        session.audit.checkpoint()
                    await self.sync_audit(session.audit)
                except (OSError, RelayError) as exc:
                    # Fail closed: no unaudited debugging.
                    self.metrics.audit_write_error()
                    log.error(
                        "audit.unwritable", extra={"session_id": session.id, "error": str(exc)}
                    )
                    session.end("audit_failed")
            if checkpoint and self._relay_audit is not None:
                try:
                    self._relay_audit.checkpoint()
                    await self.sync_audit(self._relay_audit)
                except (OSError, RelayError) as exc:
                    self.metrics.audit_write_error()
                    log.error("audit.unwritable", extra={"error": str(exc)})

    # -- reload and shutdown -------------------------------------------------

    def reload(self, config_path: Path | None = None, *, actor: str = "unknown") -> ReloadResult:
        """Re-read config, certificates and JWKS; swap them in if all is well.

        Live tunnels keep what they negotiated; new handshakes and tokens use
        the new files.  A bad new config is refused with its problems logged
        (``reload.failed``), and the old one stays.  Keys that only a restart
        can apply are logged (``reload.restart_needed``) and keep their old
        values until then.

        Args:
            config_path: The file to read; default the one the relay started with.
            actor: Who asked (``signal:SIGHUP``, an admin's name), for the audit trail.
        """
        old = self.config
        path = config_path or old.source
        try:
            config = load_config(path) if path else old
            runtime = load_runtime(config, is_serial_revoked=self.is_serial_revoked)
        except Exception as exc:  # every failure keeps the old runtime
            problems = tuple(getattr(exc, "problems", None) or [str(exc)])
            log.error("reload.failed", extra={"problems": list(problems), "actor": actor})
            self.audit_event("reload.failed", problems=list(problems), actor=actor)
            return ReloadResult(
                ok=False, problems=problems, targets=tuple(t.name for t in old.targets)
            )
        restart = tuple(key for key, get in _RESTART_KEYS if get(config) != get(old))
        if restart:
            log.warning(
                "reload.restart_needed",
                extra={"keys": list(restart), "note": "these keys apply after a restart"},
            )
            runtime = dataclasses.replace(runtime, config=_keep_bound(runtime.config, old))
        if runtime.config.relay.audit_dir != old.relay.audit_dir and self._relay_audit is not None:
            # The next relay-level record starts a file in the new folder.
            self._retire_relay_writer()
        self.runtime = runtime
        self.tls.swap(runtime.tls_engine)
        self.handshake_slots.total_tokens = runtime.config.limits.max_handshakes
        self.refresh_revocations()
        targets = tuple(t.name for t in runtime.config.targets)
        fields = {"targets": list(targets), "actor": actor, "restart_needed": list(restart)}
        log.info("reload.ok", extra=fields)
        self.audit_event("reload.ok", **fields)
        return ReloadResult(ok=True, restart_needed=restart, targets=targets)

    def end_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.end(reason)

    def close(self) -> None:
        self.audit_pool.close()
        self._retire_relay_writer()
        if self.leases is not None:
            self.leases.close()  # with PostgreSQL, the shared state
        self.store.close()


async def serve_relay(
    relay: Relay,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until ``stop`` is set, then drain and return.

    Shutdown: stop accepting, answer new preambles with 503, let live tunnels
    run for ``shutdown_grace``, then end them, kill managed servers, write
    and fsync the audit trail.

    Resource handling:
        Binds the listeners itself and closes them on return.
    """
    if stop is None:
        stop = trio.Event()
    config = relay.config
    listeners: list[trio.SocketListener] = []
    for host, port in config.relay.listen:
        try:
            if relay.worker_index is None:
                listeners += await trio.open_tcp_listeners(port, host=host)
            else:
                listeners += await open_reuseport_listeners(port, host)
        except OSError as exc:
            for lst in listeners:
                await lst.aclose()
            raise LocalProtocolError(
                f"relay.listen {format_address((host, port))}: {exc.strerror or exc}; "
                "pick a free port or stop whatever holds it",
                reason="bad_listen",
            ) from exc
    relay.listeners = listeners
    relay.audit_event(
        "relay.started",
        version=VERSION,
        listen=[format_address(lst.socket.getsockname()[:2]) for lst in listeners],
        targets=[t.name for t in config.targets],
    )
    try:
        async with trio.open_nursery() as managed_nursery:
            relay._managed_nursery = managed_nursery
            async with trio.open_nursery() as sessions:
                async with trio.open_nursery() as main:
                    await main.start(relay.identity.serve)
                    main.start_soon(relay.run_housekeeping)
                    main.start_soon(relay.audit_pool.serve, relay)
                    main.start_soon(relay.run_ticket_keys)
                    if relay.shared is None:
                        if not relay.worker_index:  # SQLite workers: worker 0 watches
                            main.start_soon(run_watch, relay)
                        if relay.leases is not None:  # ...counting every worker's tunnels
                            main.start_soon(relay.leases.run_registration, relay)
                    else:
                        # One watcher per cluster: probes and on_idle run on one relay.
                        main.start_soon(relay.shared.run_watch, relay, run_watch)
                        main.start_soon(relay.shared.run, relay)
                    accept = trio.CancelScope()
                    gate = Gate(relay)

                    async def accept_loop() -> None:
                        with accept:
                            await serve_listeners(
                                partial(gate.serve, handle=handle_connection),
                                listeners,
                                handler_nursery=sessions,
                                metrics=relay.metrics,
                            )

                    main.start_soon(accept_loop)
                    for lst in listeners:
                        log.info(
                            "relay.listening",
                            extra={"address": format_address(lst.socket.getsockname()[:2])},
                        )
                    task_status.started(listeners)
                    await stop.wait()
                    # Drain: no new connections; new preambles get 503.
                    relay.draining = True
                    # Cancelling serve_listeners would close the listening
                    # sockets only once its task runs again; a connection in
                    # that window was still accepted after relay.draining was
                    # logged (issue 11).  So close them here, and log after.
                    accept.cancel()
                    await _close_listeners(listeners, relay.config.relay.final_write_timeout)
                    grace = relay.config.relay.shutdown_grace  # as of the last reload
                    log.info(
                        "relay.draining",
                        extra={"sessions": len(relay.sessions), "shutdown_grace": grace},
                    )
                    with trio.move_on_after(grace):
                        await relay.wait_no_sessions()
                    relay.end_all("shutdown")
                    main.cancel_scope.cancel()
                # Sessions end (and write their end records) on their own now;
                # give them a bounded moment, then cancel what is left.
                sessions.cancel_scope.deadline = (
                    trio.current_time() + relay.config.relay.session_end_timeout
                )
            for server in relay.managed.values():
                server.kill("shutdown")
            managed_nursery.cancel_scope.deadline = (
                trio.current_time() + relay.config.relay.server_stop_timeout
            )
    finally:
        await _close_listeners(listeners, relay.config.relay.final_write_timeout)
        relay.audit_event("relay.stopped", sessions_left=len(relay.sessions))
        if relay._relay_audit is not None:
            try:
                relay._relay_audit.checkpoint()
                await _final_sync(relay, relay._relay_audit)
            except (OSError, RelayError) as exc:
                log.error("audit.unwritable", extra={"error": str(exc)})


async def _close_listeners(listeners: list[trio.SocketListener], limit: float) -> None:
    """Close listening sockets, each shielded and bounded by ``limit`` seconds."""
    for lst in listeners:
        with trio.CancelScope(shield=True), trio.move_on_after(limit):
            await lst.aclose()


async def _final_sync(relay: Relay, writer: AuditWriter) -> None:
    """The last fsync of the relay's audit file, shielded but bounded.

    A hung disk must not hang shutdown: the fsync runs in a thread that is
    abandoned after ``relay.session_end_timeout`` seconds.

    Raises:
        RelayError: the fsync did not finish in time.
    """
    limit = relay.config.relay.session_end_timeout
    with trio.CancelScope(shield=True), trio.move_on_after(limit) as scope:
        await relay.sync_audit(writer)
    if scope.cancelled_caught:
        raise RelayError(
            f"{writer.path}: fsync did not finish within {limit:g}s (relay.session_end_timeout)",
            reason="audit_failed",
        )


async def run_signals(relay: Relay, stop: trio.Event, *, stop_signals: bool = True) -> None:
    """The platform's reload trigger reloads; a stop signal starts the drain.

    On POSIX: SIGHUP reloads, SIGTERM/SIGINT stop.  On Windows: the named
    reload event reloads, Ctrl-C/Ctrl-Break stop (see :mod:`relay.platform`).
    A second stop signal is ignored: the drain is already under way.  With
    ``stop_signals=False`` (a Windows service, off Python's main thread,
    stopped by the service manager) only the reload trigger runs.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_reload_trigger, partial(_reload_by, relay)))
        if not stop_signals:
            return
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for signum in signals:
                log.info("relay.stopping", extra={"signal": signal.Signals(signum).name})
                stop.set()


def _reload_by(relay: Relay, actor: str) -> None:
    relay.reload(actor=actor)
