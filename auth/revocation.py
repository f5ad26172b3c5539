"""Revocation list shared by the CLI and the relay, kept in SQLite.

Both processes open the same file: the CLI records issued tokens and
revocations, the relay takes a :class:`RevocationSet` snapshot every couple of
seconds and checks live tunnels against it. SQLite in WAL mode lets the relay
read while the CLI writes (https://www.sqlite.org/wal.html); ``busy_timeout``
makes a writer wait for another writer instead of failing at once.

What can be revoked:

* a single token, by ``jti``;
* every token of a user issued at or before a cutoff time (``revoke_user``);
* a client certificate, by serial number.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from .errors import AuthError
from .tokens import Claims

__all__ = ["RevocationStore", "RevocationSet", "TokenRecord", "SCHEMA_VERSION"]

_T = TypeVar("_T")

#: Version of the database layout this code writes and reads.
SCHEMA_VERSION = 1

#: How long a writer waits for another writer's lock, in milliseconds.
_BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS issued_tokens (
    jti       TEXT PRIMARY KEY,
    sub       TEXT NOT NULL,
    targets   TEXT NOT NULL,          -- JSON list of glob patterns
    scope     TEXT,
    iat       INTEGER NOT NULL,
    exp       INTEGER NOT NULL,
    issued_at REAL NOT NULL           -- when it was recorded
);
CREATE INDEX IF NOT EXISTS issued_tokens_sub ON issued_tokens (sub);
CREATE TABLE IF NOT EXISTS revoked_jtis (
    jti        TEXT PRIMARY KEY,
    revoked_at REAL NOT NULL,
    reason     TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS user_cutoffs (
    sub            TEXT PRIMARY KEY,
    revoked_before REAL NOT NULL,     -- tokens with iat <= this are revoked
    revoked_at     REAL NOT NULL,
    reason         TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS revoked_serials (
    serial     TEXT PRIMARY KEY,      -- lowercase hex, no 0x
    revoked_at REAL NOT NULL,
    reason     TEXT NOT NULL DEFAULT ''
);
"""


def _db_error(path: Path, exc: BaseException, doing: str) -> AuthError:
    return AuthError(
        f"{path}: cannot {doing} revocation database ({exc}); check the path, its "
        "permissions, and that it is a dbgrelay revocation database",
        reason="bad_revocation_db",
    )


@dataclass(frozen=True, slots=True)
class RevocationSet:
    """An immutable snapshot of everything revoked.

    The default instance revokes nothing.

    Attributes:
        jtis: Revoked token IDs.
        user_cutoffs: User to cutoff time: their tokens with ``iat <= cutoff`` are revoked.
        serials: Revoked client certificate serial numbers.
    """

    jtis: frozenset[str] = frozenset()
    user_cutoffs: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    serials: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "jtis", frozenset(self.jtis))
        object.__setattr__(self, "serials", frozenset(self.serials))
        object.__setattr__(self, "user_cutoffs", MappingProxyType(dict(self.user_cutoffs)))

    def is_revoked(self, claims: Claims) -> bool:
        """Whether the token with these claims is revoked, by jti or by user cutoff."""
        if claims.jti in self.jtis:
            return True
        cutoff = self.user_cutoffs.get(claims.sub)
        return cutoff is not None and claims.iat <= cutoff

    def is_serial_revoked(self, serial: int) -> bool:
        """Whether the client certificate with this serial number is revoked."""
        return serial in self.serials


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One row of :meth:`RevocationStore.list_tokens`.

    A jti that was revoked without ever being recorded as issued has ``sub``,
    ``iat``, ``exp`` and ``issued_at`` set to ``None`` and no targets.

    Attributes:
        jti: Token ID.
        status: ``"active"`` or ``"revoked"``. Expiry is not part of the status
            (it depends on the time); use :meth:`is_expired`.
        sub: User.
        targets: Target globs.
        scope: Scope claim.
        iat: Issued-at claim.
        exp: Expiry claim.
        issued_at: When the token was recorded.
        revoked_at: When it was revoked (by jti, or the user cutoff's time).
        revoke_reason: The reason given at revocation.
    """

    jti: str
    status: str
    sub: str | None = None
    targets: tuple[str, ...] = ()
    scope: str | None = None
    iat: int | None = None
    exp: int | None = None
    issued_at: float | None = None
    revoked_at: float | None = None
    revoke_reason: str = ""

    def is_expired(self, now: float) -> bool:
        """Whether the token has expired at ``now`` (unknown expiry counts as not expired)."""
        return self.exp is not None and self.exp <= now


def issued_row(claims: Claims, issued_at: float) -> tuple:
    """The ``issued_tokens`` row of a token: (jti, sub, targets, scope, iat, exp, issued_at)."""
    return (
        claims.jti,
        claims.sub,
        json.dumps(list(claims.targets)),
        claims.scope,
        claims.iat,
        claims.exp,
        issued_at,
    )


def token_records(rows: Iterable[tuple], orphans: Iterable[tuple]) -> list[TokenRecord]:
    """Token records from the store's rows, whichever database they came from.

    Args:
        rows: (jti, sub, targets, scope, iat, exp, issued_at, revoked_at,
            revoke_reason, user_cutoff, cutoff_at, cutoff_reason) per issued
            token, the last five NULL where they do not apply.
        orphans: (jti, revoked_at, reason) of revoked jtis never recorded as
            issued (the token was issued elsewhere).
    """
    records: list[TokenRecord] = []
    for (
        jti, sub, targets, scope, iat, exp, issued_at,
        r_at, r_reason, cutoff, c_at, c_reason,
    ) in rows:  # fmt: skip
        status, revoked_at, reason = "active", None, ""
        if r_at is not None:
            status, revoked_at, reason = "revoked", r_at, r_reason
        elif cutoff is not None and iat <= cutoff:
            status, revoked_at, reason = "revoked", c_at, c_reason
        records.append(
            TokenRecord(
                jti=jti,
                status=status,
                sub=sub,
                targets=tuple(json.loads(targets)),
                scope=scope,
                iat=iat,
                exp=exp,
                issued_at=issued_at,
                revoked_at=revoked_at,
                revoke_reason=reason,
            )
        )
    for jti, r_at, r_reason in orphans:
        records.append(
            TokenRecord(jti=jti, status="revoked", revoked_at=r_at, revoke_reason=r_reason)
        )
    return records


class RevocationStore:
    """Read and write the revocation database.

    Args:
        path: The SQLite file; created (mode 0600) with its schema if missing.
            Its folder must exist.

    Raises:
        AuthError: With reason ``"bad_revocation_db"`` if the file cannot be
            opened, is not a SQLite database, or has a newer schema.

    Resource handling:
        The store owns one SQLite connection; call :meth:`close` or use it as a
        context manager. The connection is guarded by a lock and may be used
        from worker threads (for example through ``trio.to_thread.run_sync``),
        one call at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._local_writes = 0
        try:
            # Create the file ourselves so it is never world-readable; SQLite
            # gives the -wal and -shm files the same mode as the database.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as exc:
            raise AuthError(
                f"{self.path}: cannot create revocation database ({exc.strerror}); check that "
                "the folder exists and is writable",
                reason="bad_revocation_db",
            ) from exc
        try:
            self._conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
                timeout=_BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise _db_error(self.path, exc, "open") from exc
        try:
            self._setup()
        except sqlite3.Error as exc:
            self._conn.close()
            raise _db_error(self.path, exc, "open") from exc
        except AuthError:
            self._conn.close()
            raise

    def _setup(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = self._enter_wal()
        if str(mode).lower() != "wal":
            raise AuthError(
                f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the revocation "
                "database on a local filesystem",
                reason="bad_revocation_db",
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise AuthError(
                    f"{self.path}: revocation database has schema version {version}, newer "
                    f"than this dbgrelay understands ({SCHEMA_VERSION}); upgrade dbgrelay",
                    reason="bad_revocation_db",
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _enter_wal(self) -> str:
        """Switch to WAL mode; the journal mode SQLite reports afterwards.

        Switching a new file to WAL takes an exclusive lock that SQLite does
        not wait for: while another process opens the same new file (the
        workers of ``serve --workers``, all starting at once) it answers
        "database is locked" at once, busy timeout or not.  That is retried
        within the busy timeout.
        """
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    # -- context manager -------------------------------------------------

    def __enter__(self) -> RevocationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Safe to call more than once."""
        with self._lock:
            self._conn.close()

    # -- writes ----------------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in one write transaction (``BEGIN IMMEDIATE`` takes the lock up front)."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._conn)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc, "write to") from exc
            self._local_writes += 1
            return result

    def transaction(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn(connection)`` in one write transaction (``BEGIN IMMEDIATE``) of this file.

        For tables the relay keeps beside the revocations (the live sessions
        of ``serve --workers``); a failure rolls back.

        Raises:
            AuthError: ``"bad_revocation_db"`` if SQLite fails.
        """
        return self._write(fn)

    def record_issued(self, claims: Claims, *, now: float | None = None) -> None:
        """Remember an issued token so it can be listed and counted by ``revoke_user``.

        Args:
            claims: The token's claims.
            now: Recording time; defaults to the token's ``iat``.
        """
        issued_at = float(claims.iat if now is None else now)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO issued_tokens "
                "(jti, sub, targets, scope, iat, exp, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                issued_row(claims, issued_at),
            )

        self._write(run)

    def revoke(self, jti: str, *, reason: str = "", now: float) -> bool:
        """Revoke one token.

        A jti that was never recorded as issued is still recorded as revoked
        (the token may have been issued elsewhere).

        Returns:
            True if the jti was newly revoked, False if it already was.
        """
        if not isinstance(jti, str) or not jti:
            raise ValueError("jti must be a non-empty token ID")

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO revoked_jtis (jti, revoked_at, reason) VALUES (?, ?, ?)",
                (jti, float(now), reason),
            )
            return cur.rowcount == 1

        return self._write(run)

    def revoke_user(self, sub: str, *, now: float, reason: str = "") -> int:
        """Revoke every token of ``sub`` issued at or before ``now``.

        Tokens issued later (``iat > now``) stay valid, so a user can be given
        a fresh token after the cutoff. A cutoff never moves backwards.

        Returns:
            How many recorded tokens of the user were still live (not expired at
            ``now``) and not already revoked, and are revoked now.
        """
        if not isinstance(sub, str) or not sub:
            raise ValueError("sub must be a non-empty user name")

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT revoked_before FROM user_cutoffs WHERE sub = ?", (sub,)
            ).fetchone()
            old_cutoff = row[0] if row is not None else None
            affected = conn.execute(
                "SELECT count(*) FROM issued_tokens t "
                "WHERE t.sub = ? AND t.iat <= ? AND t.exp > ? "
                "AND (? IS NULL OR t.iat > ?) "
                "AND NOT EXISTS (SELECT 1 FROM revoked_jtis r WHERE r.jti = t.jti)",
                (sub, now, now, old_cutoff, old_cutoff),
            ).fetchone()[0]
            if old_cutoff is None or now > old_cutoff:
                conn.execute(
                    "INSERT OR REPLACE INTO user_cutoffs (sub, revoked_before, revoked_at, reason) "
                    "VALUES (?, ?, ?, ?)",
                    (sub, float(now), float(now), reason),
                )
            return int(affected)

        return self._write(run)

    def revoke_serial(self, serial: int, *, now: float, reason: str = "") -> bool:
        """Revoke a client certificate by serial number.

        Returns:
            True if the serial was newly revoked, False if it already was.
        """
        if isinstance(serial, bool) or not isinstance(serial, int) or serial <= 0:
            raise ValueError(f"serial must be a positive integer, got {serial!r}")

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO revoked_serials (serial, revoked_at, reason) "
                "VALUES (?, ?, ?)",
                (format(serial, "x"), float(now), reason),
            )
            return cur.rowcount == 1

        return self._write(run)

    # -- reads -----------------------------------------------------------

    def data_version(self) -> int:
        """A number that changes whenever the database content may have changed.

        Combines SQLite's ``PRAGMA data_version`` (which changes when another
        connection commits) with a count of this store's own commits. Compare
        values for equality only: if it is unchanged, the last
        :meth:`snapshot` is still current.
        """
        with self._lock:
            try:
                pragma = self._conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc, "read") from exc
            return int(pragma) + self._local_writes

    def snapshot(self) -> RevocationSet:
        """Read everything revoked, in one consistent read transaction."""
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                try:
                    jtis = frozenset(
                        row[0] for row in self._conn.execute("SELECT jti FROM revoked_jtis")
                    )
                    cutoffs = dict(
                        self._conn.execute("SELECT sub, revoked_before FROM user_cutoffs")
                    )
                    serials = frozenset(
                        int(row[0], 16)
                        for row in self._conn.execute("SELECT serial FROM revoked_serials")
                    )
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc, "read") from exc
        return RevocationSet(jtis=jtis, user_cutoffs=cutoffs, serials=serials)

    def list_tokens(self) -> list[TokenRecord]:
        """Every recorded token and every revoked jti, oldest first.

        Recorded tokens come first, ordered by ``issued_at``; revoked jtis that
        were never recorded follow, ordered by revocation time.
        """
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT t.jti, t.sub, t.targets, t.scope, t.iat, t.exp, t.issued_at, "
                    "r.revoked_at, r.reason, c.revoked_before, c.revoked_at, c.reason "
                    "FROM issued_tokens t "
                    "LEFT JOIN revoked_jtis r ON r.jti = t.jti "
                    "LEFT JOIN user_cutoffs c ON c.sub = t.sub "
                    "ORDER BY t.issued_at, t.jti"
                ).fetchall()
                orphans = self._conn.execute(
                    "SELECT r.jti, r.revoked_at, r.reason FROM revoked_jtis r "
                    "WHERE NOT EXISTS (SELECT 1 FROM issued_tokens t WHERE t.jti = r.jti) "
                    "ORDER BY r.revoked_at, r.jti"
                ).fetchall()
            except sqlite3.Error as exc:
                raise _db_error(self.path, exc, "read") from exc
        return token_records(rows, orphans)
