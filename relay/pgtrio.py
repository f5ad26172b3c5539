"""Statements on PostgreSQL connections driven by trio itself, without a worker thread.

The per-user cap's claim (:meth:`relay.state.SharedState.claim_session`) is
one statement on every admitted tunnel's connect path.  In a worker thread
(``trio.to_thread.run_sync``) the hop there and back costs about as much as
the statement itself on a local database, so :class:`QueryConnections` runs
it on the event loop through libpq's asynchronous API, which psycopg 3
exposes as ``conn.pgconn`` (psycopg's own async API needs asyncio):
``send_query_params`` with text parameters, ``flush`` while the socket takes
the query, then ``consume_input`` / ``is_busy`` / ``get_result`` each time
``trio.lowlevel.wait_readable`` says the socket has data, until
``get_result`` returns ``None``.  None of these calls block on a connection
in non-blocking mode.

Why not psycopg's generators (``psycopg.generators.execute`` driven the way
``psycopg.waiting`` drives them): they are not part of psycopg's documented
API, and while sending they ask to wait for "readable or writable" at once,
which trio can only do with a task per direction; the libpq calls above are
psycopg's documented ``pq`` interface and need one wait at a time.

Opening a connection (rare: the first claim, or after one broke) stays in a
worker thread; it is bounded by ``connect_timeout``.

This module imports psycopg: only the PostgreSQL backend loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import psycopg
import trio
from psycopg import pq
from psycopg.errors import error_from_result

from auth.revocation_pg import written_to_while_idle

if TYPE_CHECKING:
    from psycopg.pq.abc import PGconn

__all__ = ["QueryConnections", "text_array"]

_OK = pq.ConnStatus.OK
_IDLE = pq.TransactionStatus.IDLE
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_POLL_OK = pq.PollingStatus.OK
_POLL_READING = pq.PollingStatus.READING
_POLL_WRITING = pq.PollingStatus.WRITING


def text_array(items: Sequence[str]) -> str:
    """``items`` as a PostgreSQL ``text[]`` literal (every element quoted and escaped)."""
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"


class QueryConnections:
    """A few connections that run one statement at a time each, from trio.

    A statement takes a free connection (opening one, in a worker thread, if
    none is free and fewer than ``size`` are open), so concurrent statements
    never share one.  A connection goes back to the free list only when its
    statement ran to the end and it is idle and healthy; otherwise it is
    closed, and the next statement opens a new one.  An idle connection the
    server has written to since (a restart or an administrator ends
    connections with a last message, then closes them) is replaced before
    use, so a database restart between two statements costs the second one
    a new connection, not a failure.

    Args:
        opener: Opens an autocommit connection in non-blocking mode with the
            statement timeout set (run in a worker thread).
        size: Connections open at most.
        cancel_timeout: Seconds a statement that is cancelled mid-flight may
            spend asking the server to cancel it too (see :meth:`fetch_value`).

    Resource handling:
        Call :meth:`close` when done.
    """

    def __init__(
        self, opener: Callable[[], psycopg.Connection], *, size: int, cancel_timeout: float
    ) -> None:
        self._opener = opener
        self._slots = trio.CapacityLimiter(size)
        self._cancel_timeout = cancel_timeout
        self._free: list[psycopg.Connection] = []
        self._closed = False

    def _take_free(self) -> psycopg.Connection | None:
        while self._free:
            conn = self._free.pop()
            if conn.pgconn.status == _OK and not written_to_while_idle(conn.pgconn.socket):
                return conn
            conn.close()
        return None

    async def fetch_value(self, sql: bytes, params: Sequence[str | None]) -> str | None:
        """Run ``sql`` (one statement, ``$1``... text parameters) and return its one value.

        Returns:
            The first column of the first row as text, or ``None`` for SQL
            ``NULL`` or no row.

        Raises:
            psycopg.Error: the connection could not be used or the statement
                failed (the connection is closed).
            AuthError: from ``opener``, when a connection cannot be opened.

        Cancellation:
            Safe at any point.  Cancelled while the statement runs, it asks
            the server to cancel the statement too (waiting at most
            ``cancel_timeout``, shielded) and closes the connection: a
            connection with a statement in flight never goes back to the free
            list, and the statement's transaction (with any transaction-level
            lock it holds or waits for) ends with it.
        """
        async with self._slots:
            conn = self._take_free()
            if conn is None:
                # Not abandoned on cancellation: the connection comes back, and the
                # statement's first checkpoint raises Cancelled, which closes it.
                conn = await trio.to_thread.run_sync(self._opener)
            reusable = False
            try:
                value = await _fetch_value(conn, sql, params)
                reusable = True
            finally:
                if not reusable:
                    await self._discard(conn)
                elif (
                    self._closed
                    or conn.pgconn.status != _OK
                    or conn.pgconn.transaction_status != _IDLE
                ):
                    conn.close()
                else:
                    self._free.append(conn)
            return value

    async def _discard(self, conn: psycopg.Connection) -> None:
        """Close ``conn``; first ask the server to cancel its statement if one is running."""
        try:
            if conn.pgconn.status == _OK and conn.pgconn.transaction_status != _IDLE:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self._cancel_timeout
                    await _cancel_statement(conn.pgconn)
        except psycopg.Error:
            pass  # closing ends the statement all the same, once the server notices
        finally:
            conn.close()

    def close(self) -> None:
        """Close the free connections; those in use close when their statement ends."""
        self._closed = True
        free, self._free = self._free, []
        for conn in free:
            conn.close()


async def _fetch_value(
    conn: psycopg.Connection, sql: bytes, params: Sequence[str | None]
) -> str | None:
    # Already cancelled (say while the connection opened): send nothing.
    await trio.lowlevel.checkpoint_if_cancelled()
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    fd = pgconn.socket
    try:
        values = [None if p is None else p.encode(encoding) for p in params]
    except UnicodeEncodeError as exc:
        raise psycopg.DataError(f"a parameter cannot be sent in {encoding}: {exc}") from exc
    pgconn.send_query_params(sql, values)
    # 1: part of the query is still in libpq's buffer (a few hundred bytes: rare).
    while pgconn.flush():
        await trio.lowlevel.wait_writable(fd)
    error: psycopg.Error | None = None
    value: str | None = None
    while True:
        while pgconn.is_busy():
            await trio.lowlevel.wait_readable(fd)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == _FATAL_ERROR:
            error = error or error_from_result(result, encoding=encoding)
        elif result.status != _TUPLES_OK:
            error = error or psycopg.InterfaceError(
                f"unexpected result status {pq.ExecStatus(result.status).name}"
            )
        elif result.ntuples and value is None:
            raw = result.get_value(0, 0)
            value = None if raw is None else bytes(raw).decode(encoding)
    if error is not None:
        raise error
    return value


async def _cancel_statement(pgconn: PGconn) -> None:
    """Ask the server to cancel what ``pgconn`` runs (libpq 17's non-blocking cancel).

    Raises:
        psycopg.Error: the request could not be delivered.
    """
    if not psycopg.capabilities.has_cancel_safe():
        # Older libpq: its cancel call blocks, so it runs in a worker thread.
        await trio.to_thread.run_sync(pgconn.get_cancel().cancel, abandon_on_cancel=True)
        return
    cancel = pgconn.cancel_conn()
    try:
        cancel.start()
        while (status := cancel.poll()) != _POLL_OK:
            if status == _POLL_READING:
                await trio.lowlevel.wait_readable(cancel.socket)
            elif status == _POLL_WRITING:
                await trio.lowlevel.wait_writable(cancel.socket)
            else:
                raise psycopg.OperationalError(f"cancellation failed: {cancel.get_error_message()}")
    finally:
        cancel.finish()
