"""Letting a dead holder's session lease run out, without waiting for it.

A relay (or worker) killed with SIGKILL leaves its sessions' rows behind;
they stop counting when their leases end.  Instead of sleeping until then,
a test checks that the row is still there and that its lease ends within the
configured lease (its holder is dead: nobody can extend it), then moves the
lease into the past in the database, which is all the passage of time does
to the row.  Whatever the test asserts next follows from the expired lease.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .support import READY_TIMEOUT

__all__ = ["expire_pg_lease", "expire_sqlite_lease"]


def expire_pg_lease(dsn: str, session_id: str, lease: float) -> str:
    """End the lease of ``session_id``'s row in PostgreSQL's ``dbgrelay_sessions``.

    Compares ``lease_until`` with the database's ``now()``, the clock the
    relays' queries use.

    Returns:
        The id of the relay that holds the row.
    """
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT relay, extract(epoch FROM lease_until - now()) "
            "FROM dbgrelay_sessions WHERE id = %s",
            (session_id,),
        ).fetchone()
        assert row is not None, f"session {session_id} has no row before its lease ended"
        holder, left = row[0], float(row[1])
        assert 0 < left <= lease, f"the lease of {session_id} ends in {left} s, not within {lease}"
        conn.execute(
            "UPDATE dbgrelay_sessions SET lease_until = now() - interval '1 second' WHERE id = %s",
            (session_id,),
        )
    return holder


def expire_sqlite_lease(path: Path, session_id: str, lease: float) -> str:
    """End the lease of ``session_id``'s row in the ``live_sessions`` table of SQLite ``path``.

    ``lease_until`` is Unix time, written and compared by the workers with
    ``time.time()``: the same clock here.

    Returns:
        The id of the worker that holds the row.
    """
    # The workers write to the file meanwhile: wait for their lock, bounded.
    db = sqlite3.connect(path, timeout=READY_TIMEOUT, isolation_level=None)
    try:
        row = db.execute(
            "SELECT relay, lease_until FROM live_sessions WHERE id = ?", (session_id,)
        ).fetchone()
        assert row is not None, f"session {session_id} has no row before its lease ended"
        holder, left = row[0], row[1] - time.time()
        assert 0 < left <= lease, f"the lease of {session_id} ends in {left} s, not within {lease}"
        db.execute(
            "UPDATE live_sessions SET lease_until = ? WHERE id = ?", (time.time() - 1, session_id)
        )
    finally:
        db.close()
    return holder
