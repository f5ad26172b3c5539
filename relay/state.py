"""Keeping one relay in step with the shared state in PostgreSQL.

With ``[state] backend = "postgres"`` every relay of a cluster reads and
writes revocations in one database (:class:`auth.PgRevocationStore`).  This
module is the trio side of it:

* :func:`open_revocation_store` picks the store the config names (SQLite for
  one relay, PostgreSQL for several); the CLI and the relay both use it.
* :class:`SharedState` registers the relay's live sessions in the database
  under a lease it renews (so the rows of a relay that died expire), lists
  the whole cluster's sessions and asks the relay holding one to end it.
  The leases, the per-user cap and the watcher's view of other relays'
  tunnels are :class:`SessionLeases`, which :class:`WorkerSessions` shares:
  the same for the workers of ``serve --workers N`` in their SQLite file.
* One relay of the cluster runs a target's managed server at a time
  (:meth:`SharedState.claim_server`, a PostgreSQL advisory lock); one worker
  of the host with SQLite (:meth:`WorkerSessions.claim_server`, a lock file,
  :class:`ServerLocks`).
* It also runs one task per relay that LISTENs for the
  notification every revocation write sends, re-reads the whole list when one
  arrives, after every reconnect and every ``resync_interval`` (a
  notification sent while the relay was disconnected is lost), and hands the
  result to the relay, which ends matching live tunnels.  It also knows
  whether the database is reachable: after ``unavailable_grace`` without it,
  :meth:`SharedState.admitting` turns false and new tunnels are refused with
  503 ``state_unavailable`` (fail closed: a relay that cannot learn
  revocations must not keep admitting tokens).  Live tunnels continue.

Why these two mechanisms (psycopg 3's sync API; its async API needs asyncio
and does not run under trio):

* Queries go through the store's small pool in worker threads
  (``trio.to_thread.run_sync``) under a :class:`trio.CapacityLimiter` as large
  as the pool, so a slow database never blocks the event loop and never
  takes more threads than connections.  Nothing of it touches the per-chunk
  data path.  The exception is the per-user claim, one statement on every
  admitted tunnel's connect path: the thread hop would cost about as much as
  the statement, so it runs on the event loop through libpq's non-blocking
  API, on connections of its own (:mod:`relay.pgtrio`).
* The LISTEN connection stays on the event loop: its socket is awaited with
  ``trio.lowlevel.wait_readable`` and drained with ``pgconn.consume_input()``
  and ``pgconn.notifies()``, which never block.  A notification reaches the
  relay within milliseconds and no thread sits parked in a blocking wait that
  cancellation could not interrupt.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Container
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from auth import AuthError, RevocationStore
from config import Config, StateSection

from .backends import BackendError
from .errors import RemoteProtocolError

try:  # POSIX only: serve --workers needs SO_REUSEPORT, which Windows lacks.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from types import ModuleType

    from auth import PgRevocationStore

    from .server import Relay
    from .session import Session

__all__ = [
    "RECONNECT_INTERVAL",
    "ROUND_SETTLE",
    "SESSIONS_CHANNEL",
    "WATCH_LOCK",
    "ServerLocks",
    "SessionLeases",
    "SharedState",
    "WorkerSessions",
    "open_revocation_store",
    "open_worker_sessions",
]

log = logging.getLogger("dbgrelay.state")

#: Closed sessions of a relay that may have a row: id -> (target, close time as Unix time).
Closes = dict[str, tuple[str, float]]

#: Seconds between attempts to reach the database again after it went away.
RECONNECT_INTERVAL = 1.0

#: Seconds a registration round waits after the first change it answers, so
#: that a burst of opens and closes costs one round, not one each.
ROUND_SETTLE = 0.2


def _pg() -> ModuleType:
    """:mod:`auth.revocation_pg`, loaded by the postgres backend only.

    It imports psycopg, 14 MiB of resident memory a SQLite relay does
    without (VmRSS of an interpreter importing trio alone, then with psycopg).
    """
    from auth import revocation_pg

    return revocation_pg


def _pgtrio() -> ModuleType:
    """:mod:`relay.pgtrio` (it imports psycopg too), loaded by the postgres backend only."""
    from . import pgtrio

    return pgtrio


#: Notified when a relay's set of sessions changes or a relay asks another to end one.
SESSIONS_CHANNEL = "dbgrelay_sessions"

#: Advisory lock held by the one relay of a cluster that runs the watcher
#: (forgotten-server probes and on_idle), so no target is probed or killed twice.
WATCH_LOCK = 0x646267_776174  # "dbg" "wat"

#: Seconds between looks at whether a session another relay holds has ended.
_GONE_POLL_INTERVAL = 0.1


def open_revocation_store(config: Config) -> RevocationStore | PgRevocationStore:
    """The revocation store ``config`` names: SQLite in ``relay.state_dir`` or PostgreSQL.

    Raises:
        AuthError: the store cannot be opened; for PostgreSQL also when its
            schema is missing or unknown (the message says what to run).
    """
    state = config.state
    if state.backend == "postgres":
        assert state.dsn_file is not None  # the config loader requires it
        pg = _pg()
        return pg.PgRevocationStore(
            pg.read_dsn(state.dsn_file),
            pool_size=state.pool_size,
            connect_timeout=state.connect_timeout,
            statement_timeout=state.statement_timeout,
        )
    config.relay.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return RevocationStore(config.relay.state_dir / "tokens.sqlite")


class SessionLeases(abc.ABC):
    """Live sessions in a table shared by several relays, each row under a lease its holder renews.

    The one code path of the per-user cap (and of the watcher's view of the
    other relays' tunnels) for both places such a table lives: PostgreSQL,
    shared by the relays of a cluster (:class:`SharedState`), and the SQLite
    file shared by the workers of one host (:class:`WorkerSessions`).  A
    subclass supplies the table's statements (:meth:`_claim_row`,
    :meth:`sync_rows`, :meth:`busy_rows`); the last two run in worker threads
    under :attr:`limiter`, never on the data path.  The claim runs where its
    subclass says: SQLite's in a worker thread too, PostgreSQL's on the event
    loop.

    A session gets its row from its claim, at admission (registration rounds
    skip sessions still opening, so a claim in flight is not counted before
    it succeeds); each round renews the rows of this relay's live sessions
    and deletes those of closed ones and every expired row.  A round comes
    every third of the lease, and :data:`ROUND_SETTLE` after a session
    opened or closed (changes meanwhile join that round).  A round that
    deletes a closed session's row records when the session closed, per
    target (a small table of its own, one row per target), so the watcher
    learns of a tunnel that opened and closed elsewhere between two of its
    looks.  The close time is this relay's own record, kept until a round
    succeeds: it is written even when the row is gone already (it expired
    while the database was out of reach, or the session was admitted then
    and never had one).

    Args:
        relay_id: This relay's (or worker's) name in the table.
        lease: Seconds a row stays valid without renewal (renewed every
            third of it, and at once when a session closes).
        limiter: Bounds the worker threads that use the table.

    Attributes:
        busy_elsewhere: Targets with a live session held elsewhere, as of the last look.
    """

    #: Where the caps hold, for a refusal's message.
    scope = "in the cluster"

    def __init__(self, relay_id: str, *, lease: float, limiter: trio.CapacityLimiter) -> None:
        self.relay_id = relay_id
        self.lease = lease
        self.limiter = limiter
        self._sessions_changed = trio.Event()
        self._registered: frozenset[str] | None = None
        # Sessions of this relay that may have a row in the table (registered
        # or claimed), with their targets.
        self._rows: dict[str, str] = {}
        # When those of them that closed did (Unix time), until a round records it.
        self._ended: dict[str, float] = {}
        self.busy_elsewhere: frozenset[str] = frozenset()
        # Closes recorded before this relay started are older than its first idle spells.
        self._since = time.time()
        # The latest close of each target's sessions applied to last_activity (Unix time).
        self._closed_seen: dict[str, float] = {}

    # -- the table ----------------------------------------------------------------

    @abc.abstractmethod
    async def _claim_row(
        self, session_id: str, user: str, info: str, *, cap: int, total_cap: int | None,
        closed: Closes,
    ) -> str | None:  # fmt: skip
        """Insert ``session_id``'s row unless a cap is reached, as one atomic step.

        Counted: the unexpired rows (of ``user`` against ``cap``, all of them
        against ``total_cap``), but for this relay's rows of ``closed``
        (sessions it closed whose rows may linger; their targets and close
        times, which the claim may record as a round does).

        Returns:
            ``None`` when inserted, else the refusal's reason:
            ``"user_sessions"`` or ``"relay_full"``.
        """

    @abc.abstractmethod
    def sync_rows(
        self, infos: dict[str, tuple[str, str]], gone: Closes, announce: bool
    ) -> tuple[list[tuple[str, str]], list[str], dict[str, float]]:
        """Renew this relay's rows (id -> user, info), delete those of ``gone`` and expired ones.

        ``gone`` are sessions of this relay that closed, with their targets
        and close times: each target's latest close is recorded, whether or
        not its row was still there.

        Returns:
            Requests to end sessions of this relay (id, reason), the targets
            other relays hold live sessions to, and when each target's latest
            session closed on any relay (Unix time; closes before this relay
            started are left out).
        """

    @abc.abstractmethod
    def busy_rows(self) -> tuple[list[str], dict[str, float]]:
        """The targets other relays hold live sessions to, and their latest closes (as above)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what this holds in the table (the relay is stopping)."""

    # -- the trio side ----------------------------------------------------------

    def sessions_changed(self) -> None:
        """A session opened: register it in a round soon, not at the next renewal."""
        self._sessions_changed.set()

    def session_closed(self, session_id: str) -> None:
        """A session closed: note when, and delete its row in a round soon."""
        if session_id in self._rows:
            self._ended.setdefault(session_id, time.time())
        self._sessions_changed.set()

    def _closes(self, live: Container[str]) -> Closes:
        """This relay's sessions with a row that are not ``live``: targets and close times."""
        now = time.time()
        return {
            sid: (target, self._ended.get(sid, now))
            for sid, target in self._rows.items()
            if sid not in live
        }

    def _up(self) -> None:  # noqa: B027 (a hook, empty unless an outage can end)
        """The table answered (the PostgreSQL backend ends an outage here)."""

    async def run_registration(self, relay: Relay) -> None:
        """Keep this relay's rows in the table current; end what others asked to.

        Cancellation:
            Safe at any point; a round in a worker thread finishes (bounded
            by the backend's timeouts) before this returns.
        """
        while True:
            # A fresh event before reading the sessions: a change from here on wakes the next round.
            self._sessions_changed = trio.Event()
            live = {sid: s for sid, s in relay.sessions.items() if not s.opening}
            infos = {sid: (s.user, json.dumps(s.describe())) for sid, s in live.items()}
            # Only rows of sessions that closed go: a claimed row of a session
            # still opening stays (it counts for its user).
            gone = self._closes(relay.sessions)
            # Tell the other relays when our set changed: their watcher needs to know.
            announce = frozenset(infos) != self._registered
            sync = partial(self.sync_rows, infos, gone, announce)
            ends, busy, closed = await trio.to_thread.run_sync(sync, limiter=self.limiter)
            self._up()
            for sid in gone:
                del self._rows[sid]
                self._ended.pop(sid, None)
            self._rows |= {sid: s.target for sid, s in live.items()}
            self._registered = frozenset(infos)
            self._update_busy(relay, frozenset(busy), closed)
            for sid, reason in ends:
                session = relay.sessions.get(sid)
                if session is not None and session.end_reason is None:
                    log.info(
                        "session.end_requested",
                        extra={"session_id": sid, "reason": reason, "from": "another relay"},
                    )
                    session.end(reason)
            with trio.move_on_after(self.lease / 3):
                await self._sessions_changed.wait()
                await trio.sleep(ROUND_SETTLE)

    async def claim_session(
        self, session: Session, *, limit: int, live: set[str], total: int | None = None
    ) -> None:
        """Give ``session`` its row now, if its user stays within ``limit`` sessions.

        Args:
            session: The session being admitted.
            limit: ``max_sessions_per_user``.
            live: This relay's live session ids (rows of others it held are
                not counted: they closed and linger until the next round).
            total: The cap on all rows (``max_sessions``), or ``None``.

        Raises:
            RemoteProtocolError: 429 ``user_sessions`` when the user is at the
                cap, 503 ``relay_full`` when all rows reach ``total``.
            AuthError: the table cannot be used.
        """
        user = session.user
        self._rows[session.id] = session.target
        refused = await self._claim_row(
            session.id,
            user,
            # Listed as open elsewhere: the row exists only once admitted.
            json.dumps(session.describe() | {"state": "open"}),
            cap=limit,
            total_cap=total,
            closed=self._closes(live),
        )
        if refused is not None:
            del self._rows[session.id]  # no row: nothing to delete, no close to record
        if refused == "user_sessions":
            raise RemoteProtocolError(
                f"user {user!r} already has {limit} tunnels open {self.scope}",
                reason="user_sessions",
                status=429,
            )
        if refused == "relay_full":
            raise RemoteProtocolError(
                f"the relay is full ({total} tunnels {self.scope})", reason="relay_full", status=503
            )

    def _update_busy(self, relay: Relay, busy: frozenset[str], closed: dict[str, float]) -> None:
        now = trio.current_time()
        wall = time.time()
        for target, at in closed.items():
            if at < self._since or at <= self._closed_seen.get(target, 0.0):
                continue  # older than this relay, or applied already
            self._closed_seen[target] = at
            # A session to it closed (perhaps elsewhere, between two looks):
            # its idle spell starts then, on trio's clock, and never earlier.
            spell = now - max(0.0, wall - at)
            if spell > relay.last_activity.get(target, -math.inf):
                relay.last_activity[target] = spell
                log.debug("state.target_closed", extra={"target": target, "closed_at": at})
        if busy == self.busy_elsewhere:
            return
        for target in self.busy_elsewhere - busy:
            # Its last tunnel elsewhere closed: an idle spell starts now, here too.
            relay.last_activity[target] = now
        self.busy_elsewhere = busy
        log.info("state.busy_elsewhere", extra={"targets": sorted(busy)})

    async def refresh_busy(self, relay: Relay) -> None:
        """Look at the table now for targets other relays hold sessions to.

        The watcher calls this before it reports a server forgotten or runs
        ``on_idle``: a tunnel opened elsewhere since the last round counts,
        and so does one that opened and closed there meanwhile (its close
        starts the target's idle spell).

        Raises:
            AuthError: the table cannot be read.
        """
        busy, closed = await trio.to_thread.run_sync(self.busy_rows, limiter=self.limiter)
        self._update_busy(relay, frozenset(busy), closed)


class SharedState(SessionLeases):
    """One relay's link to the shared PostgreSQL state.

    Args:
        store: The relay's PostgreSQL store (already open and current).
        section: ``[state]`` of the config.
        metrics: Gets ``state_up``, ``state_outage`` and ``state_notification``.

    Attributes:
        unavailable_since: Trio time the current outage began, or ``None``
            while the database is reachable.
        last_error: Why the database was last unreachable.
    """

    def __init__(self, store: PgRevocationStore, section: StateSection, *, metrics: Any) -> None:
        super().__init__(
            # This relay's name in the sessions table; unique per process start.
            f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
            lease=section.session_lease,
            limiter=trio.CapacityLimiter(section.pool_size),
        )
        self.store = store
        self.section = section
        self.metrics = metrics
        self.unavailable_since: float | None = None
        self.last_error: str | None = None
        # Managed servers this relay owns: target name -> the connection holding its lock.
        self._owned: dict[str, Any] = {}
        # The per-user claims run on the event loop, on connections of their own
        # (opened on first use): see relay/pgtrio.py for why.
        self._claims = _pgtrio().QueryConnections(
            partial(
                _pg().open_query_connection,
                store.dsn,
                doing=_CLAIM_DOING,
                connect_timeout=section.connect_timeout,
                statement_timeout=section.statement_timeout,
            ),
            size=section.pool_size,
            cancel_timeout=section.connect_timeout,
        )
        metrics.state_up(True)

    def admitting(self) -> bool:
        """Whether new tunnels may be admitted: the database is up, or down for less than the grace."""
        if self.unavailable_since is None:
            return True
        return trio.current_time() - self.unavailable_since < self.section.unavailable_grace

    def describe(self) -> dict[str, Any]:
        """The backend's health, for the admin API and logs."""
        down = self.unavailable_since
        return {
            "backend": "postgres",
            "available": down is None,
            "admitting": self.admitting(),
            "unavailable_for": None if down is None else round(trio.current_time() - down, 3),
            "error": self.last_error if down is not None else None,
        }

    async def _refresh(self) -> None:
        await trio.to_thread.run_sync(self.store.refresh, limiter=self.limiter)

    def _down(self, exc: BaseException) -> None:
        if not isinstance(exc, AuthError):  # psycopg's own, possibly several lines
            exc = _pg().unavailable_error(exc, "follow")
        self.last_error = str(exc)
        if self.unavailable_since is not None:
            return  # one line per outage, not one per retry
        self.unavailable_since = trio.current_time()
        self.metrics.state_up(False)
        self.metrics.state_outage()
        log.warning(
            "state.unavailable",
            extra={
                "error": self.last_error,
                "unavailable_grace": self.section.unavailable_grace,
                "note": "live tunnels continue; new ones are refused after the grace",
            },
        )

    def _up(self) -> None:
        if self.unavailable_since is not None:
            down_for = trio.current_time() - self.unavailable_since
            self.unavailable_since = None
            log.info("state.recovered", extra={"unavailable_for": round(down_for, 3)})
        self.metrics.state_up(True)

    async def run(self, relay: Relay) -> None:
        """Follow the database for ``relay`` until cancelled.

        After each re-read of the revocations, ``relay.refresh_revocations()``
        runs on the event loop (it compares versions and ends revoked
        tunnels).  The relay's live sessions are registered under a lease, and
        those another relay asked to end are ended.

        Cancellation:
            Safe at any point; a connection attempt in a worker thread is
            bounded by ``connect_timeout`` and finishes before this returns.
        """
        on_change = relay.refresh_revocations
        opener = partial(
            _pg().open_listen_connection,
            self.store.dsn,
            connect_timeout=self.section.connect_timeout,
            statement_timeout=self.section.statement_timeout,
            channels=(_pg().CHANNEL, SESSIONS_CHANNEL),
        )
        while True:
            conn = None
            try:
                conn = await trio.to_thread.run_sync(opener)
                # Read after LISTEN: whatever commits from now on also notifies us.
                await self._refresh()
                self._up()
                on_change()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen, conn, on_change)
                    nursery.start_soon(self._resync, on_change)
                    nursery.start_soon(self.run_registration, relay)
            except* AuthError as group:
                self._down(group.exceptions[0])
            except* _pg().psycopg.Error as group:
                self._down(group.exceptions[0])
            finally:
                if conn is not None:
                    conn.close()
            await trio.sleep(RECONNECT_INTERVAL)

    async def _listen(self, conn: Any, on_change: Callable[[], None]) -> None:
        pgconn = conn.pgconn
        fd = conn.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            # Reads what the socket holds without blocking; raises once the server is gone.
            pgconn.consume_input()
            notified = False
            while (note := pgconn.notifies()) is not None:
                if note.relname.decode() == SESSIONS_CHANNEL:
                    # Our own announcement needs no new round of ours.
                    if note.extra.decode() != self.relay_id:
                        self._sessions_changed.set()
                else:
                    notified = True
            if notified:
                self.metrics.state_notification()
                await self._refresh()
                self._up()
                on_change()

    async def _resync(self, on_change: Callable[[], None]) -> None:
        while True:
            await trio.sleep(self.section.resync_interval)
            await self._refresh()
            self._up()
            on_change()

    async def claim_session(
        self, session: Session, *, limit: int, live: set[str], total: int | None = None
    ) -> None:
        """Register ``session`` in the cluster now, if its user stays within ``limit`` sessions.

        The user's live sessions are their unexpired rows, but for this
        relay's rows of sessions no longer in ``live`` (this relay's session
        ids; a closed session's row lingers until the next registration
        round).  A session has a row once its claim committed (registration
        rounds skip sessions still opening), so claims in flight are not
        counted before they succeed.  A transaction-level
        advisory lock per user serialises the count and the insert across
        the cluster: two relays admitting the same user at once take turns,
        and the second sees the first's row.  The lock goes with the
        transaction (commit, rollback or a dropped connection), so a relay
        that dies mid-claim leaves nothing held; and only claims for the same
        user wait on each other.  The inserted row is the session's lease:
        this relay renews it, and it expires with a relay that died.

        While the database is unreachable the claim is skipped and the cap
        counts this relay's sessions alone, within the same grace as the
        revocations (after it, admission already refuses with 503).

        The statement runs on the event loop, on a connection no other claim
        uses meanwhile (:meth:`_claim_row`).  Cancelled mid-statement (the
        session was ended, the relay drains, or the bound below passed), the
        claim asks the server to cancel the statement and closes that
        connection, so no statement of a cancelled claim goes on to insert
        a row, and the user's lock goes with it.

        Raises:
            RemoteProtocolError: 429 ``user_sessions`` when the user is at the
                cap; 503 ``state_unavailable`` when the database cannot be
                reached and no grace is left.
        """
        if self.unavailable_since is None:
            # The query is bounded by the connect and statement timeouts; waiting
            # for a free connection is bounded here.
            with trio.move_on_after(self.section.connect_timeout + self.section.statement_timeout):
                try:
                    await super().claim_session(session, limit=limit, live=live)
                except AuthError as exc:
                    self._down(exc)
                else:
                    return
            if self.unavailable_since is None:
                self._down(_pg().unavailable_error(TimeoutError("no free connection"), "reach"))
        if not self.admitting():
            raise RemoteProtocolError(
                "the relay cannot reach its shared state", reason="state_unavailable", status=503
            )

    async def _claim_row(
        self, session_id: str, user: str, info: str, *, cap: int, total_cap: int | None,
        closed: Closes,
    ) -> str | None:  # fmt: skip
        """Insert the row on the event loop: one statement, no worker thread.

        Raises:
            AuthError: ``state_unavailable`` when the database cannot be
                reached or the statement fails.
        """
        # max_sessions stays per relay in a cluster: total_cap is for one host's workers.
        # One statement, so one round trip and one implicit transaction: the
        # function (schema migration 3) takes the user's lock, counts and inserts.
        params = (
            str(_user_lock(user)),
            session_id,
            self.relay_id,
            user,
            info,
            repr(float(self.lease)),
            str(cap),
            _pgtrio().text_array(sorted(closed)),
        )
        try:
            live = await self._claims.fetch_value(_CLAIM_SESSION, params)
        except _pg().psycopg.Error as exc:
            raise _pg().unavailable_error(exc, _CLAIM_DOING) from exc
        return None if live is None else "user_sessions"

    # -- the sessions table (run in worker threads) ---------------------------

    def sync_rows(
        self, infos: dict[str, tuple[str, str]], gone: Closes, announce: bool
    ) -> tuple[list[tuple[str, str]], list[str], dict[str, float]]:
        return _sync_sessions(
            self.store, self.relay_id, infos, gone, self.lease, announce, since=self._since
        )

    def busy_rows(self) -> tuple[list[str], dict[str, float]]:
        with self.store.connection("read sessions in") as conn:
            rows = conn.execute(_BUSY_ELSEWHERE, (self.relay_id,)).fetchall()
            closed = conn.execute(_TARGETS_CLOSED, (self._since,)).fetchall()
        return [target for (target,) in rows], dict(closed)

    async def run_watch(self, relay: Relay, watch: Callable[[Relay], Any]) -> None:
        """Run ``watch(relay)`` while this relay holds the cluster's watcher lock.

        One relay of the cluster probes for forgotten servers and runs
        ``on_idle``; the others wait for the lock, which PostgreSQL releases
        when the holder's connection ends (it stopped, crashed or lost the
        database), and take over.
        """
        opener = partial(
            _pg().open_lock_connection,
            self.store.dsn,
            WATCH_LOCK,
            connect_timeout=self.section.connect_timeout,
            statement_timeout=self.section.statement_timeout,
        )
        while True:
            try:
                conn = await trio.to_thread.run_sync(opener)
            except AuthError:
                conn = None
            if conn is None:
                await trio.sleep(self.section.session_lease / 3)
                continue
            log.info("state.watch_leader", extra={"relay": self.relay_id})
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch, relay)
                    await _wait_broken(conn)
                    nursery.cancel_scope.cancel()
            finally:
                conn.close()
            log.warning("state.watch_lost", extra={"relay": self.relay_id})
            await trio.sleep(RECONNECT_INTERVAL)

    async def claim_server(self, target: str) -> None:
        """Become the one relay that runs ``target``'s managed server, or refuse.

        The claim is a PostgreSQL advisory lock on a connection of its own,
        held until :meth:`release_server`; PostgreSQL drops it when this
        relay dies, so a crashed relay's targets can be launched elsewhere.

        Raises:
            BackendError: ``server_elsewhere`` when another relay runs it,
                ``state_unavailable`` when the database cannot be reached.
        """
        if target in self._owned:
            return
        opener = partial(
            _pg().open_lock_connection,
            self.store.dsn,
            _server_lock(target),
            connect_timeout=self.section.connect_timeout,
            statement_timeout=self.section.statement_timeout,
        )
        try:
            conn = await trio.to_thread.run_sync(opener)
        except AuthError as exc:
            raise BackendError(
                f"target {target!r}: cannot claim its managed server: {exc}",
                reason="state_unavailable",
            ) from exc
        if conn is None:
            raise BackendError(
                f"target {target!r}: its managed server runs on another relay",
                reason="server_elsewhere",
            )
        self._owned[target] = conn

    def release_server(self, target: str) -> None:
        """Give up the claim on ``target``'s managed server (it has exited)."""
        conn = self._owned.pop(target, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Release every claim (the relay is stopping)."""
        for target in list(self._owned):
            self.release_server(target)
        self._claims.close()

    async def list_sessions(self, now: float) -> list[dict[str, Any]]:
        """The live sessions other relays of the cluster hold, as the admin API lists them.

        Raises:
            AuthError: ``"state_unavailable"``.
        """
        rows = await trio.to_thread.run_sync(
            partial(_list_sessions, self.store, self.relay_id), limiter=self.limiter
        )
        listed = []
        for holder, info, end_reason in rows:
            session = json.loads(info)
            started = datetime.fromisoformat(session["started"]).timestamp()
            listed.append(
                session
                | {
                    "duration": round(max(0.0, now - started), 3),
                    "ending": end_reason,
                    "relay": holder,
                }
            )
        return listed

    async def request_end(self, session_id: str, reason: str) -> tuple[str, dict] | None:
        """Ask the relay holding ``session_id`` to end it.

        Returns:
            The holder's id and the session as listed, or ``None`` if no live
            relay holds such a session.

        Raises:
            AuthError: ``"state_unavailable"``.
        """
        found = await trio.to_thread.run_sync(
            partial(_request_end, self.store, session_id, reason), limiter=self.limiter
        )
        if found is None:
            return None
        holder, info = found
        return holder, json.loads(info)

    async def wait_session_gone(self, session_id: str) -> None:
        """Return once no live relay lists ``session_id`` any more (its holder ended it).

        Raises:
            AuthError: ``"state_unavailable"``.
        """
        look = partial(_session_listed, self.store, session_id)
        # The row lives in another process's database: polling is the only way to watch it.
        while True:
            if not await trio.to_thread.run_sync(look, limiter=self.limiter):
                return
            await trio.sleep(_GONE_POLL_INTERVAL)


#: The live sessions of ``serve --workers N`` with SQLite, beside the revocations.
_WORKER_SESSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS live_sessions (
    id          TEXT PRIMARY KEY,
    relay       TEXT NOT NULL,    -- the holding worker: worker-INDEX:PID:RANDOM
    lease_until REAL NOT NULL,    -- Unix time
    info        TEXT NOT NULL,    -- JSON: the session as the admin API lists it
    sub         TEXT NOT NULL
)
"""

#: When each target's latest session closed on any worker (the watcher's view of the others).
_WORKER_ACTIVITY_TABLE = """
CREATE TABLE IF NOT EXISTS target_activity (
    target      TEXT PRIMARY KEY,
    last_closed REAL NOT NULL     -- Unix time
)
"""


def open_worker_sessions(config: Config, index: int) -> WorkerSessions | None:
    """The live-sessions table of worker ``index`` of ``serve --workers N`` (``None`` with PostgreSQL).

    Removes the rows a dead predecessor with the same index left behind: the
    supervisor starts a worker again only after the last one exited, so they
    belong to no live tunnel.

    Raises:
        AuthError: the SQLite file cannot be opened or written.
    """
    if config.state.backend != "sqlite":
        return None  # every worker is a relay of the cluster: SharedState covers it
    config.relay.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A connection of its own: claims wait in worker threads for SQLite's
    # write lock, never for the lock of the store the event loop reads.
    store = RevocationStore(config.relay.state_dir / "tokens.sqlite")
    try:
        sessions = WorkerSessions(store, index, lease=config.state.session_lease)
        cleared = store.transaction(sessions.clear_predecessors)
    except BaseException:
        store.close()
        raise
    if cleared:
        log.info("state.rows_cleared", extra={"worker": index, "sessions": cleared})
    return sessions


class WorkerSessions(SessionLeases):
    """The live sessions of the workers of one host, in their shared SQLite file.

    Only with ``serve --workers N`` (N > 1): a single relay counts its
    sessions in memory and writes nothing per tunnel.  Each claim is one
    ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock before
    counting, so workers admitting at once take turns and each sees the rows
    the others committed: ``max_sessions_per_user`` and ``max_sessions`` hold
    for the host.  The file is in WAL mode with ``synchronous = NORMAL``, so a
    commit is not an fsync; a lease lost in a power cut belongs to a tunnel
    that did not survive it either.  Rows of a worker that died expire with
    their lease and are removed as soon as the supervisor has started its
    successor (:func:`open_worker_sessions`).

    Args:
        store: A connection of its own to the revocation file.
        index: The worker's index.
        lease: ``state.session_lease``.
    """

    scope = "on this host"

    def __init__(self, store: RevocationStore, index: int, *, lease: float) -> None:
        # One thread at a time: the connection is used one call at a time anyway.
        super().__init__(
            f"worker-{index}:{os.getpid()}:{secrets.token_hex(3)}",
            lease=lease,
            limiter=trio.CapacityLimiter(1),
        )
        self.store = store
        self.index = index
        # One worker of the host at a time runs a target's managed server.
        self.servers = ServerLocks(store.path.parent / "claims")

    async def claim_server(self, target: str) -> None:
        """Become the one worker of the host that runs ``target``'s managed server, or refuse.

        Raises:
            BackendError: ``server_elsewhere`` when another worker runs it,
                ``state_unavailable`` when its lock file cannot be opened.
        """
        self.servers.claim(target)

    def release_server(self, target: str) -> None:
        """Give up the claim on ``target``'s managed server (it has exited)."""
        self.servers.release(target)

    def clear_predecessors(self, conn: sqlite3.Connection) -> int:
        """Create the tables; delete the rows of earlier workers with this index.  Their count."""
        conn.execute(_WORKER_SESSIONS_TABLE)
        conn.execute(_WORKER_ACTIVITY_TABLE)
        cur = conn.execute(
            "DELETE FROM live_sessions WHERE relay LIKE ? AND relay <> ?",
            (f"worker-{self.index}:%", self.relay_id),
        )
        return cur.rowcount

    def admitting(self) -> bool:
        return True

    async def _claim_row(
        self, session_id: str, user: str, info: str, *, cap: int, total_cap: int | None,
        closed: Closes,
    ) -> str | None:  # fmt: skip
        """:meth:`claim_row` in a worker thread under :attr:`limiter`."""
        claim = partial(
            self.claim_row, session_id, user, info, cap=cap, total_cap=total_cap, closed=closed
        )
        return await trio.to_thread.run_sync(claim, limiter=self.limiter)

    def claim_row(
        self, session_id: str, user: str, info: str, *, cap: int, total_cap: int | None,
        closed: Closes,
    ) -> str | None:  # fmt: skip
        """The claim as one ``BEGIN IMMEDIATE`` transaction (run in a worker thread)."""

        def run(conn: sqlite3.Connection) -> str | None:
            self._delete(conn, closed)
            if total_cap is not None:
                (count,) = conn.execute("SELECT count(*) FROM live_sessions").fetchone()
                if count >= total_cap:
                    return "relay_full"
            (count,) = conn.execute(
                "SELECT count(*) FROM live_sessions WHERE sub = ?", (user,)
            ).fetchone()
            if count >= cap:
                return "user_sessions"
            conn.execute(
                "INSERT OR IGNORE INTO live_sessions (id, relay, lease_until, info, sub) "
                "VALUES (?, ?, ?, ?, ?)",
                (session_id, self.relay_id, time.time() + self.lease, info, user),
            )
            return None

        return self.store.transaction(run)

    def sync_rows(
        self, infos: dict[str, tuple[str, str]], gone: Closes, announce: bool
    ) -> tuple[list[tuple[str, str]], list[str], dict[str, float]]:
        def run(conn: sqlite3.Connection) -> tuple[list[str], dict[str, float]]:
            self._delete(conn, gone)
            until = time.time() + self.lease
            conn.executemany(
                "INSERT INTO live_sessions (id, relay, lease_until, info, sub) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "lease_until = excluded.lease_until, info = excluded.info, sub = excluded.sub "
                "WHERE live_sessions.relay = excluded.relay",
                [(sid, self.relay_id, until, info, user) for sid, (user, info) in infos.items()],
            )
            return self._busy(conn)

        # Ending another worker's session goes through that worker's admin endpoint.
        return [], *self.store.transaction(run)

    def busy_rows(self) -> tuple[list[str], dict[str, float]]:
        return self.store.transaction(self._busy)

    def _delete(self, conn: sqlite3.Connection, closed: Closes) -> None:
        """Delete expired rows and this worker's rows of ``closed``, recording their targets' close."""
        conn.executemany(
            "INSERT INTO target_activity (target, last_closed) VALUES (?, ?) "
            "ON CONFLICT (target) DO UPDATE SET "
            "last_closed = max(last_closed, excluded.last_closed)",
            list(closed.values()),
        )
        conn.execute("DELETE FROM live_sessions WHERE lease_until < ?", (time.time(),))
        conn.executemany(
            "DELETE FROM live_sessions WHERE relay = ? AND id = ?",
            [(self.relay_id, sid) for sid in closed],
        )

    def _busy(self, conn: sqlite3.Connection) -> tuple[list[str], dict[str, float]]:
        rows = conn.execute(
            "SELECT DISTINCT json_extract(info, '$.target') FROM live_sessions "
            "WHERE relay <> ? AND lease_until >= ?",
            (self.relay_id, time.time()),
        ).fetchall()
        closed = conn.execute(
            "SELECT target, last_closed FROM target_activity WHERE last_closed >= ?",
            (self._since,),
        ).fetchall()
        return [target for (target,) in rows], dict(closed)

    async def claim_session(
        self, session: Session, *, limit: int, live: set[str], total: int | None = None
    ) -> None:
        """Give ``session`` its row if its user and the host stay within their caps.

        Raises:
            RemoteProtocolError: 429 ``user_sessions``, 503 ``relay_full``, or
                503 ``state_unavailable`` when the SQLite file cannot be
                written (fail closed: an uncounted tunnel could pass the cap).
        """
        try:
            await super().claim_session(session, limit=limit, live=live, total=total)
        except AuthError as exc:
            log.error("state.claim_failed", extra={"session_id": session.id, "error": str(exc)})
            raise RemoteProtocolError(
                "the relay cannot count the host's sessions", reason="state_unavailable", status=503
            ) from exc

    async def run_registration(self, relay: Relay) -> None:
        """Renew this worker's rows until cancelled; after a failure, again a second later."""
        while True:
            try:
                await super().run_registration(relay)
            except AuthError as exc:
                log.warning("state.register_failed", extra={"error": str(exc)})
            await trio.sleep(RECONNECT_INTERVAL)

    def close(self) -> None:
        """Delete this worker's rows (it is stopping) and close the connection."""

        def run(conn: sqlite3.Connection) -> None:
            # Every session of this worker has ended by now: the rows it still
            # has, and those of its closes no round recorded yet.
            now = time.time()
            rows = conn.execute(
                "SELECT id, json_extract(info, '$.target') FROM live_sessions WHERE relay = ?",
                (self.relay_id,),
            )
            left = {sid: (target, now) for sid, target in rows.fetchall() if target is not None}
            self._delete(conn, left | self._closes(()))

        try:
            self.store.transaction(run)
        except AuthError as exc:
            log.warning("state.register_failed", extra={"error": str(exc)})
        finally:
            self.servers.close()
            self.store.close()


class ServerLocks:
    """Per-target lock files that make one process of the host a managed server's owner.

    For the workers of ``serve --workers N`` with SQLite (PostgreSQL has its
    advisory locks): a claim is an exclusive, non-blocking ``flock`` on
    ``<folder>/<sha256 of the target name>.lock`` (0600, in a 0700 folder),
    held on an open file descriptor until :meth:`release`.  The kernel drops
    it when the process dies, so a killed worker's targets can be launched by
    another worker or its successor.  The descriptor is not inherited by the
    servers the relay starts (Python opens files non-inheritable).

    Args:
        folder: Where the lock files live (created on first claim).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._owned: dict[str, int] = {}

    def path(self, target: str) -> Path:
        """The lock file of ``target`` (its name a hash: any target name is a safe file name)."""
        return self.folder / f"{_server_digest(target).hex()[:32]}.lock"

    def claim(self, target: str) -> None:
        """Lock ``target``'s file, or refuse because another process holds it.

        Raises:
            BackendError: ``server_elsewhere`` when another process holds the
                lock, ``state_unavailable`` when the file cannot be opened.
        """
        if target in self._owned:
            return
        path = self.path(target)
        fd = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise BackendError(
                        f"target {target!r}: its managed server runs on another worker",
                        reason="server_elsewhere",
                    ) from exc
            raise BackendError(
                f"target {target!r}: cannot claim its managed server: {path}: {exc.strerror}",
                reason="state_unavailable",
            ) from exc
        self._owned[target] = fd

    def release(self, target: str) -> None:
        """Unlock ``target``'s file (closing the descriptor drops the lock)."""
        fd = self._owned.pop(target, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Release every claim (the worker is stopping)."""
        for target in list(self._owned):
            self.release(target)


# -- the sessions table (run in worker threads) ---------------------------------


def _server_digest(target: str) -> bytes:
    """What names a target's managed-server claim: the lock file, or the advisory lock key."""
    return hashlib.sha256(b"dbgrelay managed server\0" + target.encode()).digest()


def _server_lock(target: str) -> int:
    """The advisory lock key of a target's managed server (a signed 64-bit integer)."""
    return int.from_bytes(_server_digest(target)[:8], "big", signed=True)


async def _wait_broken(conn: Any) -> None:
    """Return when the server closes ``conn`` (or the network drops it)."""
    pgconn = conn.pgconn
    while True:
        await trio.lowlevel.wait_readable(conn.fileno())
        try:
            pgconn.consume_input()
        except _pg().psycopg.Error:
            return
        while pgconn.notifies() is not None:
            pass


#: What a failed claim could not do, as its error message (and state.unavailable) says.
_CLAIM_DOING = "count the user's sessions in"

#: The per-user claim (schema migration 3); its text parameters cast to the function's types.
_CLAIM_SESSION = (
    b"SELECT dbgrelay_claim_session($1::bigint, $2::text, $3::text, $4::text, $5::text, "
    b"$6::double precision, $7::integer, $8::text[])"
)


def _user_lock(user: str) -> int:
    """The advisory lock key of a user's session count (a signed 64-bit integer)."""
    digest = hashlib.sha256(b"dbgrelay user sessions\0" + user.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _sync_sessions(
    store: PgRevocationStore,
    relay_id: str,
    infos: dict[str, tuple[str, str]],
    gone: Closes,
    lease: float,
    announce: bool,
    *,
    since: float,
) -> tuple[list[tuple[str, str]], list[str], dict[str, float]]:
    """Register ``relay_id``'s live sessions (id -> user, info) for ``lease`` seconds.

    Rows of ``gone`` (sessions that closed: their targets and close times)
    are deleted, their targets' latest close recorded, and every expired row
    goes too.

    Returns:
        The end requests for them, the targets other relays hold sessions to,
        and when each target's latest session closed (Unix time, since ``since``).
    """
    with store.connection("register sessions in") as conn, conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")  # leases: see the claim
        if gone:
            conn.execute(_DELETE_CLOSED, (relay_id, list(gone)))
            targets, times = zip(*gone.values(), strict=True)
            conn.execute(_RECORD_CLOSES, (list(targets), list(times)))
        conn.execute("DELETE FROM dbgrelay_sessions WHERE lease_until < now()")
        if infos:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO dbgrelay_sessions (id, relay, lease_until, info, sub) "
                    "VALUES (%s, %s, now() + make_interval(secs => %s), %s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until, "
                    "info = excluded.info, sub = excluded.sub "
                    "WHERE dbgrelay_sessions.relay = excluded.relay",
                    [(sid, relay_id, lease, info, user) for sid, (user, info) in infos.items()],
                )
        rows = conn.execute(
            "SELECT id, end_reason FROM dbgrelay_sessions "
            "WHERE relay = %s AND end_reason IS NOT NULL",
            (relay_id,),
        ).fetchall()
        busy = conn.execute(_BUSY_ELSEWHERE, (relay_id,)).fetchall()
        closed = conn.execute(_TARGETS_CLOSED, (since,)).fetchall()
        if announce:
            conn.execute("SELECT pg_notify(%s, %s)", (SESSIONS_CHANNEL, relay_id))
    return [(sid, reason) for sid, reason in rows], [target for (target,) in busy], dict(closed)


#: Delete a relay's rows of closed sessions.
_DELETE_CLOSED = "DELETE FROM dbgrelay_sessions WHERE relay = %s AND id = ANY(%s)"

#: Record when targets' sessions closed (targets, Unix times), keeping each one's latest (migration 4).
_RECORD_CLOSES = (
    "INSERT INTO dbgrelay_target_activity (target, last_closed) "
    "SELECT target, to_timestamp(max(at)) FROM unnest(%s::text[], %s::float8[]) AS c(target, at) "
    "GROUP BY target "
    "ON CONFLICT (target) DO UPDATE SET "
    "last_closed = greatest(dbgrelay_target_activity.last_closed, excluded.last_closed)"
)

#: When each target's latest session closed on any relay, as Unix time, since a given one.
_TARGETS_CLOSED = (
    "SELECT target, extract(epoch FROM last_closed)::float8 FROM dbgrelay_target_activity "
    "WHERE last_closed >= to_timestamp(%s)"
)


#: The targets other relays hold live sessions to.
_BUSY_ELSEWHERE = (
    "SELECT DISTINCT (info::json)->>'target' FROM dbgrelay_sessions "
    "WHERE relay <> %s AND lease_until > now()"
)


def _list_sessions(store: PgRevocationStore, relay_id: str) -> list[tuple[str, str, str | None]]:
    with store.connection("list sessions in") as conn:
        rows = conn.execute(
            "SELECT relay, info, end_reason FROM dbgrelay_sessions "
            "WHERE lease_until > now() AND relay <> %s",
            (relay_id,),
        ).fetchall()
    return [(holder, info, end_reason) for holder, info, end_reason in rows]


def _request_end(store: PgRevocationStore, session_id: str, reason: str) -> tuple[str, str] | None:
    with store.connection("end a session through") as conn, conn.transaction():
        row = conn.execute(
            "UPDATE dbgrelay_sessions SET end_reason = coalesce(end_reason, %s) "
            "WHERE id = %s AND lease_until > now() RETURNING relay, info",
            (reason, session_id),
        ).fetchone()
        if row is None:
            return None
        conn.execute("SELECT pg_notify(%s, %s)", (SESSIONS_CHANNEL, session_id))
    return row[0], row[1]


def _session_listed(store: PgRevocationStore, session_id: str) -> bool:
    with store.connection("read sessions in") as conn:
        row = conn.execute(
            "SELECT 1 FROM dbgrelay_sessions WHERE id = %s AND lease_until > now()",
            (session_id,),
        ).fetchone()
    return row is not None
