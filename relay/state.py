"""Keeping one relay in step with the shared state in PostgreSQL.

With ``[state] backend = "postgres"`` every relay of a cluster reads and
writes revocations in one database (:class:`auth.PgRevocationStore`).  This
module is the trio side of it:

* :func:`open_revocation_store` picks the store the config names (SQLite for
  one relay, PostgreSQL for several); the CLI and the relay both use it.
* :class:`SharedState` runs one task per relay that LISTENs for the
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
  takes more threads than connections.  Only revocation reads and writes go
  there; nothing of it touches the per-chunk data path.
* The LISTEN connection stays on the event loop: its socket is awaited with
  ``trio.lowlevel.wait_readable`` and drained with ``pgconn.consume_input()``
  and ``pgconn.notifies()``, which never block.  A notification reaches the
  relay within milliseconds and no thread sits parked in a blocking wait that
  cancellation could not interrupt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg
import trio

from auth import AuthError, PgRevocationStore, RevocationStore, read_dsn
from auth.revocation_pg import open_listen_connection
from config import Config, StateSection

__all__ = ["RECONNECT_INTERVAL", "SharedState", "open_revocation_store"]

log = logging.getLogger("dbgrelay.state")

#: Seconds between attempts to reach the database again after it went away.
RECONNECT_INTERVAL = 1.0


def open_revocation_store(config: Config) -> RevocationStore | PgRevocationStore:
    """The revocation store ``config`` names: SQLite in ``relay.state_dir`` or PostgreSQL.

    Raises:
        AuthError: the store cannot be opened; for PostgreSQL also when its
            schema is missing or unknown (the message says what to run).
    """
    state = config.state
    if state.backend == "postgres":
        assert state.dsn_file is not None  # the config loader requires it
        return PgRevocationStore(
            read_dsn(state.dsn_file),
            pool_size=state.pool_size,
            connect_timeout=state.connect_timeout,
            statement_timeout=state.statement_timeout,
        )
    config.relay.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return RevocationStore(config.relay.state_dir / "tokens.sqlite")


class SharedState:
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
        self.store = store
        self.section = section
        self.metrics = metrics
        self.limiter = trio.CapacityLimiter(section.pool_size)
        self.unavailable_since: float | None = None
        self.last_error: str | None = None
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

    async def run(self, on_change: Callable[[], None]) -> None:
        """Follow the database until cancelled; call ``on_change`` after each re-read.

        ``on_change`` runs on the event loop after the store's copy in memory
        was refreshed (the relay compares versions and ends revoked tunnels).

        Cancellation:
            Safe at any point; a connection attempt in a worker thread is
            bounded by ``connect_timeout`` and finishes before this returns.
        """
        opener = partial(
            open_listen_connection,
            self.store.dsn,
            connect_timeout=self.section.connect_timeout,
            statement_timeout=self.section.statement_timeout,
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
            except* AuthError as group:
                self._down(group.exceptions[0])
            except* psycopg.Error as group:
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
            while pgconn.notifies() is not None:
                notified = True
            if notified:
                self.metrics.state_notification()
                await self._refresh()
                on_change()

    async def _resync(self, on_change: Callable[[], None]) -> None:
        while True:
            await trio.sleep(self.section.resync_interval)
            await self._refresh()
            on_change()
