"""Revocations in PostgreSQL, shared by every relay of a cluster.

The same interface as :class:`~auth.revocation.RevocationStore` (the SQLite
store of a single relay), on a database that several relays and the CLI use
at once.  Every write sends ``NOTIFY dbgrelay_revocations`` in its own
transaction, so PostgreSQL delivers it to every listening relay when the
write commits; relays also re-read the whole list from time to time, since a
notification sent while a relay was disconnected is lost.

This module is synchronous (psycopg 3's sync API): the relay calls it from
worker threads (``trio.to_thread``) under a capacity limiter as large as the
pool, and listens for notifications on a connection of its own
(:func:`open_listen_connection`).

The schema is versioned: :func:`migrate_schema` applies the numbered
:data:`MIGRATIONS` in order under an advisory lock (two relays or two
migration jobs starting at once do not race), and a store refuses to open a
database whose schema it does not know, with one line saying what to run.
"""

from __future__ import annotations

import math
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from .errors import AuthError
from .revocation import RevocationSet, TokenRecord, issued_row, token_records
from .tokens import Claims

__all__ = [
    "CHANNEL",
    "MIGRATIONS",
    "PG_SCHEMA_VERSION",
    "PgRevocationStore",
    "migrate_schema",
    "open_listen_connection",
    "open_lock_connection",
    "open_query_connection",
    "read_dsn",
    "unavailable_error",
]

_T = TypeVar("_T")

#: The LISTEN/NOTIFY channel every revocation write notifies.
CHANNEL = "dbgrelay_revocations"

#: Key of the advisory lock :func:`migrate_schema` holds (any constant unique to dbgrelay).
_MIGRATION_LOCK = 0x646267_72656C  # "dbg" "rel"

#: Numbered schema changes, applied in order; never edit a released one, add the next.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE dbgrelay_issued_tokens (
            jti       text PRIMARY KEY,
            sub       text NOT NULL,
            targets   text NOT NULL,             -- JSON list of glob patterns
            scope     text,
            iat       bigint NOT NULL,
            exp       bigint NOT NULL,
            issued_at double precision NOT NULL
        );
        CREATE INDEX dbgrelay_issued_tokens_sub ON dbgrelay_issued_tokens (sub);
        CREATE TABLE dbgrelay_revoked_jtis (
            jti        text PRIMARY KEY,
            revoked_at double precision NOT NULL,
            reason     text NOT NULL DEFAULT ''
        );
        CREATE TABLE dbgrelay_user_cutoffs (
            sub            text PRIMARY KEY,
            revoked_before double precision NOT NULL,
            revoked_at     double precision NOT NULL,
            reason         text NOT NULL DEFAULT ''
        );
        CREATE TABLE dbgrelay_revoked_serials (
            serial     text PRIMARY KEY,         -- lowercase hex, no 0x
            revoked_at double precision NOT NULL,
            reason     text NOT NULL DEFAULT ''
        );
        """,
    ),
    (
        2,
        """
        -- Live sessions, each registered by the relay that holds it under a
        -- lease the relay renews: the rows of a relay that died expire.
        CREATE TABLE dbgrelay_sessions (
            id          text PRIMARY KEY,
            relay       text NOT NULL,           -- the holding relay's id
            lease_until timestamptz NOT NULL,
            info        text NOT NULL,           -- JSON: what the admin API lists
            end_reason  text                     -- set when another relay asks to end it
        );
        CREATE INDEX dbgrelay_sessions_relay ON dbgrelay_sessions (relay);
        """,
    ),
    (
        3,
        """
        -- The user (token sub) of each live session, so the per-user cap on
        -- concurrent sessions counts the whole cluster's.
        ALTER TABLE dbgrelay_sessions ADD COLUMN sub text;
        CREATE INDEX dbgrelay_sessions_sub ON dbgrelay_sessions (sub);
        -- Admit a session if its user has fewer than p_cap live sessions: the
        -- user's unexpired rows, but for the calling relay's rows of sessions
        -- it closed (p_closed; such a row lingers until its next renewal).
        -- Returns NULL after inserting the row, else that count.  One call is
        -- one round trip on the connect path.  The transaction-level
        -- advisory lock (p_lock, one per user) makes claims for one user take
        -- turns; in READ COMMITTED each statement of a volatile function takes
        -- a new snapshot, so the count after the lock sees every earlier claim.
        -- A lease is not worth a WAL flush: other relays see it at commit all
        -- the same, and one lost in a database crash is written again at the
        -- holder's next renewal.
        CREATE FUNCTION dbgrelay_claim_session(
            p_lock bigint, p_id text, p_relay text, p_sub text, p_info text,
            p_lease double precision, p_cap integer, p_closed text[]
        ) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $claim$
        DECLARE
            live bigint;
        BEGIN
            PERFORM set_config('synchronous_commit', 'off', true);
            PERFORM pg_advisory_xact_lock(p_lock);
            SELECT count(*) INTO live FROM dbgrelay_sessions
                WHERE sub = p_sub AND lease_until > clock_timestamp()
                AND NOT (relay = p_relay AND id = ANY(p_closed));
            IF live >= p_cap THEN
                RETURN live;
            END IF;
            INSERT INTO dbgrelay_sessions (id, relay, lease_until, info, sub)
                VALUES (p_id, p_relay, clock_timestamp() + make_interval(secs => p_lease),
                        p_info, p_sub)
                ON CONFLICT (id) DO NOTHING;
            -- Other relays' watchers learn the target is in use (sent at commit).
            PERFORM pg_notify('dbgrelay_sessions', p_relay);
            RETURN NULL;
        END
        $claim$;
        """,
    ),
    (
        4,
        """
        -- When each target's latest session closed, on any relay: written when
        -- a relay deletes the rows of its closed sessions, so the watching
        -- relay learns of a tunnel that opened and closed elsewhere between
        -- two of its looks, and starts the target's idle spell from there.
        CREATE TABLE dbgrelay_target_activity (
            target      text PRIMARY KEY,
            last_closed timestamptz NOT NULL
        );
        """,
    ),
)

#: The schema version this code reads and writes.
PG_SCHEMA_VERSION = MIGRATIONS[-1][0]

_MIGRATE_HINT = "run `dbgrelay state migrate --config FILE`"


def read_dsn(path: Path) -> str:
    """The libpq connection string in ``path`` (surrounding whitespace removed).

    Raises:
        AuthError: With reason ``"bad_state_dsn"`` if it cannot be read or is empty.
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(
            f"{path}: cannot read state.dsn_file ({exc}); check the path and its permissions",
            reason="bad_state_dsn",
        ) from exc
    if not text:
        raise AuthError(
            f"{path}: state.dsn_file is empty; write a libpq connection string like "
            "host=db.example dbname=dbgrelay user=dbgrelay",
            reason="bad_state_dsn",
        )
    return text


def _where(conn: psycopg.Connection) -> str:
    """``host:port/dbname`` of a connection, for messages (never the password)."""
    info = conn.info
    return f"postgresql {info.host}:{info.port}/{info.dbname}"


def unavailable_error(exc: BaseException, doing: str) -> AuthError:
    """``exc`` from psycopg as one line for operators, with reason ``state_unavailable``."""
    # psycopg's message names host and port, never the password.
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AuthError(
        f"cannot {doing} the PostgreSQL state database ({first}); check state.dsn_file "
        "and that the database is up",
        reason="state_unavailable",
    )


def _connect(dsn: str, *, connect_timeout: float, statement_timeout: float) -> psycopg.Connection:
    """One autocommit connection with bounded connect and query times.

    Keepalives and ``tcp_user_timeout`` make a connection to a vanished
    server fail instead of waiting forever on a half-open TCP connection.
    """
    conn = psycopg.connect(
        dsn,
        autocommit=True,
        connect_timeout=max(2, math.ceil(connect_timeout)),
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=int((connect_timeout + statement_timeout) * 1000),
        application_name="dbgrelay",
    )
    try:
        conn.execute(f"SET statement_timeout = {int(statement_timeout * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _schema_version(conn: psycopg.Connection) -> int | None:
    """The applied schema version, or ``None`` when dbgrelay's tables are missing."""
    exists = conn.execute("SELECT to_regclass('dbgrelay_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT max(version) FROM dbgrelay_schema").fetchone()
    return row[0] if row is not None else None


def migrate_schema(
    dsn: str, *, connect_timeout: float = 5.0, statement_timeout: float = 60.0
) -> tuple[int, int]:
    """Apply every migration the database lacks, in one transaction.

    Safe to run from several places at once: an advisory lock serialises
    them, and the second finds nothing left to do.

    Returns:
        The schema version before and after.

    Raises:
        AuthError: ``"state_unavailable"`` if the database cannot be reached or
            a migration fails; ``"state_schema"`` if the database is newer
            than this code.
    """
    try:
        conn = _connect(dsn, connect_timeout=connect_timeout, statement_timeout=statement_timeout)
    except psycopg.Error as exc:
        raise unavailable_error(exc, "connect to") from exc
    with conn:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS dbgrelay_schema (version integer NOT NULL)"
                )
                before = _schema_version(conn) or 0
                if before > PG_SCHEMA_VERSION:
                    raise AuthError(
                        f"{_where(conn)}: the dbgrelay schema is at version {before}, newer than "
                        f"this dbgrelay understands ({PG_SCHEMA_VERSION}); upgrade dbgrelay",
                        reason="state_schema",
                    )
                for version, sql in MIGRATIONS:
                    if version > before:
                        conn.execute(sql)
                        conn.execute(
                            "INSERT INTO dbgrelay_schema (version) VALUES (%s)", (version,)
                        )
        except psycopg.Error as exc:
            raise unavailable_error(exc, "migrate") from exc
    return before, PG_SCHEMA_VERSION


def check_schema(conn: psycopg.Connection) -> None:
    """Refuse a database whose schema this code does not know.

    Raises:
        AuthError: With reason ``"state_schema"`` and one line saying what to do.
    """
    version = _schema_version(conn)
    where = _where(conn)
    if version is None:
        raise AuthError(
            f"{where} has no dbgrelay schema yet; {_MIGRATE_HINT}", reason="state_schema"
        )
    if version < PG_SCHEMA_VERSION:
        raise AuthError(
            f"{where}: the dbgrelay schema is at version {version}, this dbgrelay needs "
            f"{PG_SCHEMA_VERSION}; {_MIGRATE_HINT}",
            reason="state_schema",
        )
    if version > PG_SCHEMA_VERSION:
        raise AuthError(
            f"{where}: the dbgrelay schema is at version {version}, newer than this dbgrelay "
            f"understands ({PG_SCHEMA_VERSION}); upgrade dbgrelay",
            reason="state_schema",
        )


def open_listen_connection(
    dsn: str,
    *,
    connect_timeout: float = 5.0,
    statement_timeout: float = 5.0,
    channels: tuple[str, ...] = (CHANNEL,),
) -> psycopg.Connection:
    """A connection that has run ``LISTEN`` on ``channels``, in non-blocking mode.

    The caller waits for its socket (``conn.fileno()``) to become readable,
    then calls ``conn.pgconn.consume_input()`` and drains
    ``conn.pgconn.notifies()``; it must issue no other query on it.

    Raises:
        AuthError: ``"state_unavailable"`` if the database cannot be reached.
    """
    try:
        conn = _connect(dsn, connect_timeout=connect_timeout, statement_timeout=statement_timeout)
        try:
            for channel in channels:
                conn.execute(f"LISTEN {channel}")
            conn.pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
    except psycopg.Error as exc:
        raise unavailable_error(exc, "listen on") from exc
    return conn


def open_lock_connection(
    dsn: str, key: int, *, connect_timeout: float = 5.0, statement_timeout: float = 5.0
) -> psycopg.Connection | None:
    """A connection holding the session-level advisory lock ``key``, or ``None`` if another has it.

    The lock lasts as long as the connection: closing it, or the process or
    network dying, releases it.  The connection comes back in non-blocking
    mode for the caller to watch (its socket turns readable when it breaks).

    Raises:
        AuthError: ``"state_unavailable"`` if the database cannot be reached.
    """
    try:
        conn = _connect(dsn, connect_timeout=connect_timeout, statement_timeout=statement_timeout)
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not row or not row[0]:
                conn.close()
                return None
            conn.pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
    except psycopg.Error as exc:
        raise unavailable_error(exc, "lock in") from exc
    return conn


def open_query_connection(
    dsn: str, *, doing: str, connect_timeout: float = 5.0, statement_timeout: float = 5.0
) -> psycopg.Connection:
    """An autocommit connection in non-blocking mode, for statements driven by an event loop.

    The caller sends each statement with ``conn.pgconn.send_query_params`` and
    reads its results as the socket (``conn.fileno()``) becomes readable;
    ``statement_timeout`` bounds each statement on the server.

    Raises:
        AuthError: ``"state_unavailable"`` if the database cannot be reached
            (``doing`` says what for).
    """
    try:
        conn = _connect(dsn, connect_timeout=connect_timeout, statement_timeout=statement_timeout)
        try:
            conn.pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
    except psycopg.Error as exc:
        raise unavailable_error(exc, doing) from exc
    return conn


def written_to_while_idle(fd: int) -> bool:
    """Whether an idle connection's socket has something to read (it can only be its end).

    ``poll`` where the platform has it: ``select`` refuses descriptors above
    1023 on Linux, and a relay holding a thousand tunnels opens its next
    database connection there.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


class _Pool:
    """A few connections shared by worker threads, one user per connection at a time.

    Deliberately tiny: connections are opened on demand up to ``size`` (the
    relay's capacity limiter keeps at most ``size`` threads here), a
    connection that failed is dropped, not reused, and nothing runs in the
    background.
    """

    def __init__(self, dsn: str, *, size: int, connect_timeout: float, statement_timeout: float):
        self._dsn = dsn
        self._size = size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    @contextmanager
    def connection(self, doing: str) -> Iterator[psycopg.Connection]:
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is not None and written_to_while_idle(conn.fileno()):
                conn.close()  # the server ended it meanwhile (a restart): a new one now
            try:
                if conn is None or conn.closed:
                    conn = _connect(
                        self._dsn,
                        connect_timeout=self._connect_timeout,
                        statement_timeout=self._statement_timeout,
                    )
                yield conn
            except psycopg.Error as exc:
                if conn is not None:
                    conn.close()
                raise unavailable_error(exc, doing) from exc
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            else:
                with self._lock:
                    if self._closed or conn.broken:
                        conn.close()
                    else:
                        self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PgRevocationStore:
    """Read and write revocations in PostgreSQL.

    :meth:`snapshot` and :meth:`data_version` answer from memory, at once,
    so the relay can call them on its event loop: the copy in memory is
    what the last :meth:`refresh` (or the store's own last write) read.
    Everything else talks to the database and belongs in a worker thread.

    Args:
        dsn: libpq connection string.
        pool_size: Connections opened at most for queries.
        connect_timeout: Seconds to open a connection.
        statement_timeout: Seconds one query may run.

    Raises:
        AuthError: ``"state_unavailable"`` if the database cannot be reached,
            ``"state_schema"`` if its schema is missing, old or too new.

    Resource handling:
        The store owns its pool; call :meth:`close` or use it as a context
        manager.  Methods may be called from several threads at once.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._pool = _Pool(
            dsn,
            size=pool_size,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
        )
        self._lock = threading.Lock()
        self._current = RevocationSet()
        self._version = 0
        try:
            with self._pool.connection("open") as conn:
                check_schema(conn)
            self.refresh()
        except BaseException:
            self._pool.close()
            raise

    # -- context manager -------------------------------------------------

    def __enter__(self) -> PgRevocationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection. Safe to call more than once."""
        self._pool.close()

    @contextmanager
    def connection(self, doing: str = "use") -> Iterator[psycopg.Connection]:
        """A pooled autocommit connection, for the other shared-state tables.

        Raises:
            AuthError: ``"state_unavailable"`` when the database cannot be
                reached or a query on it fails (``doing`` says what failed).
        """
        with self._pool.connection(doing) as conn:
            yield conn

    # -- the copy in memory ------------------------------------------------

    def snapshot(self) -> RevocationSet:
        """The revocations as last read (no database access)."""
        with self._lock:
            return self._current

    def data_version(self) -> int:
        """A number that changes whenever :meth:`snapshot` may have changed."""
        with self._lock:
            return self._version

    def refresh(self) -> RevocationSet:
        """Read every revocation from the database into memory and return it."""
        with self._pool.connection("read") as conn, conn.transaction():
            # One snapshot of all three tables.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            jtis = frozenset(r[0] for r in conn.execute("SELECT jti FROM dbgrelay_revoked_jtis"))
            cutoffs = dict(
                conn.execute("SELECT sub, revoked_before FROM dbgrelay_user_cutoffs").fetchall()
            )
            serials = frozenset(
                int(r[0], 16) for r in conn.execute("SELECT serial FROM dbgrelay_revoked_serials")
            )
        revoked = RevocationSet(jtis=jtis, user_cutoffs=cutoffs, serials=serials)
        with self._lock:
            if revoked != self._current:
                self._current = revoked
                self._version += 1
        return revoked

    # -- writes ----------------------------------------------------------

    def _write(self, fn: Callable[[psycopg.Connection], _T]) -> _T:
        """Run ``fn`` and a NOTIFY in one transaction, then refresh the copy in memory."""
        with self._pool.connection("write to") as conn:
            with conn.transaction():
                result = fn(conn)
                # Delivered to every listener when (and only if) the transaction commits.
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        self.refresh()
        return result

    def record_issued(self, claims: Claims, *, now: float | None = None) -> None:
        """Remember an issued token so it can be listed and counted by ``revoke_user``."""
        issued_at = float(claims.iat if now is None else now)

        def run(conn: psycopg.Connection) -> None:
            conn.execute(
                "INSERT INTO dbgrelay_issued_tokens "
                "(jti, sub, targets, scope, iat, exp, issued_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (jti) DO UPDATE SET sub = excluded.sub, targets = excluded.targets, "
                "scope = excluded.scope, iat = excluded.iat, exp = excluded.exp, "
                "issued_at = excluded.issued_at",
                issued_row(claims, issued_at),
            )

        self._write(run)

    def revoke(self, jti: str, *, reason: str = "", now: float) -> bool:
        """Revoke one token; True if it was newly revoked."""
        if not isinstance(jti, str) or not jti:
            raise ValueError("jti must be a non-empty token ID")

        def run(conn: psycopg.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO dbgrelay_revoked_jtis (jti, revoked_at, reason) VALUES (%s, %s, %s) "
                "ON CONFLICT (jti) DO NOTHING",
                (jti, float(now), reason),
            )
            return cur.rowcount == 1

        return self._write(run)

    def revoke_user(self, sub: str, *, now: float, reason: str = "") -> int:
        """Revoke every token of ``sub`` issued at or before ``now``.

        Returns:
            How many recorded tokens of the user were still live and not
            already revoked, and are revoked now.
        """
        if not isinstance(sub, str) or not sub:
            raise ValueError("sub must be a non-empty user name")

        def run(conn: psycopg.Connection) -> int:
            # Lock the user's cutoff row (or its absence, via the advisory lock)
            # so two concurrent revocations count each token once.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (sub,))
            row = conn.execute(
                "SELECT revoked_before FROM dbgrelay_user_cutoffs WHERE sub = %s", (sub,)
            ).fetchone()
            old_cutoff = row[0] if row is not None else None
            affected = conn.execute(
                "SELECT count(*) FROM dbgrelay_issued_tokens t "
                "WHERE t.sub = %s AND t.iat <= %s AND t.exp > %s "
                "AND (%s::double precision IS NULL OR t.iat > %s::double precision) "
                "AND NOT EXISTS (SELECT 1 FROM dbgrelay_revoked_jtis r WHERE r.jti = t.jti)",
                (sub, now, now, old_cutoff, old_cutoff),
            ).fetchone()[0]
            if old_cutoff is None or now > old_cutoff:
                conn.execute(
                    "INSERT INTO dbgrelay_user_cutoffs (sub, revoked_before, revoked_at, reason) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (sub) DO UPDATE SET "
                    "revoked_before = excluded.revoked_before, "
                    "revoked_at = excluded.revoked_at, reason = excluded.reason",
                    (sub, float(now), float(now), reason),
                )
            return int(affected)

        return self._write(run)

    def revoke_serial(self, serial: int, *, now: float, reason: str = "") -> bool:
        """Revoke a client certificate by serial number; True if newly revoked."""
        if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
            raise ValueError(f"serial must be a positive integer, got {serial!r}")

        def run(conn: psycopg.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO dbgrelay_revoked_serials (serial, revoked_at, reason) "
                "VALUES (%s, %s, %s) ON CONFLICT (serial) DO NOTHING",
                (format(serial, "x"), float(now), reason),
            )
            return cur.rowcount == 1

        return self._write(run)

    # -- reads -------------------------------------------------------------

    def list_tokens(self) -> list[TokenRecord]:
        """Every recorded token and every revoked jti, oldest first (as the SQLite store)."""
        with self._pool.connection("read") as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows: list[Any] = conn.execute(
                "SELECT t.jti, t.sub, t.targets, t.scope, t.iat, t.exp, t.issued_at, "
                "r.revoked_at, r.reason, c.revoked_before, c.revoked_at, c.reason "
                "FROM dbgrelay_issued_tokens t "
                "LEFT JOIN dbgrelay_revoked_jtis r ON r.jti = t.jti "
                "LEFT JOIN dbgrelay_user_cutoffs c ON c.sub = t.sub "
                "ORDER BY t.issued_at, t.jti"
            ).fetchall()
            orphans = conn.execute(
                "SELECT r.jti, r.revoked_at, r.reason FROM dbgrelay_revoked_jtis r "
                "WHERE NOT EXISTS (SELECT 1 FROM dbgrelay_issued_tokens t WHERE t.jti = r.jti) "
                "ORDER BY r.revoked_at, r.jti"
            ).fetchall()
        return token_records(rows, orphans)
