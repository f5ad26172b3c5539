"""The SQLite revocation store, used by two processes at once."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from auth import AuthError, Claims, RevocationSet, RevocationStore

from .conftest import NOW


def claims(jti: str, sub: str = "alice", *, iat: int = NOW, ttl: int = 3600) -> Claims:
    return Claims(
        sub=sub,
        jti=jti,
        iss="dbgrelay-admin",
        aud="dbgrelay",
        iat=iat,
        nbf=iat,
        exp=iat + ttl,
        targets=("build*",),
        scope=None,
        kid="k1",
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "revocations.db"


@pytest.fixture
def store(db: Path):
    with RevocationStore(db) as s:
        yield s


def test_new_database_is_wal_and_private(store: RevocationStore, db: Path) -> None:
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        conn.close()


def test_revoke_jti(store: RevocationStore) -> None:
    token = claims("t1")
    store.record_issued(token)
    assert not store.snapshot().is_revoked(token)
    assert store.revoke("t1", reason="laptop stolen", now=NOW + 5) is True
    assert store.revoke("t1", now=NOW + 6) is False
    snap = store.snapshot()
    assert snap.jtis == {"t1"}
    assert snap.is_revoked(token)
    assert not snap.is_revoked(claims("t2"))


def test_revoking_an_unknown_jti_is_recorded_and_listed(store: RevocationStore) -> None:
    assert store.revoke("never-seen", reason="leaked", now=NOW) is True
    assert store.snapshot().is_revoked(claims("never-seen", sub="whoever"))
    [record] = store.list_tokens()
    assert record.jti == "never-seen"
    assert record.status == "revoked"
    assert record.sub is None
    assert record.revoked_at == NOW
    assert record.revoke_reason == "leaked"


def test_revoke_user_cutoff(store: RevocationStore) -> None:
    live = claims("live", iat=NOW - 100)
    also_live = claims("also-live", iat=NOW - 50)
    expired = claims("expired", iat=NOW - 10_000, ttl=60)
    already = claims("already", iat=NOW - 20)
    bobs = claims("bobs", sub="bob", iat=NOW - 100)
    for c in (live, also_live, expired, already, bobs):
        store.record_issued(c)
    store.revoke("already", now=NOW - 10)

    # Counts the live tokens that become revoked; not the expired one, not the
    # one revoked before, not Bob's.
    assert store.revoke_user("alice", now=NOW, reason="left the team") == 2

    snap = store.snapshot()
    assert snap.user_cutoffs == {"alice": NOW}
    for c in (live, also_live, expired, already):
        assert snap.is_revoked(c), c.jti
    assert not snap.is_revoked(bobs)
    # A token issued after the cutoff is valid again.
    assert not snap.is_revoked(claims("fresh", iat=NOW + 1))
    # Same second counts as revoked: iat <= cutoff.
    assert snap.is_revoked(claims("same-second", iat=NOW))


def test_revoke_user_cutoff_never_moves_back(store: RevocationStore) -> None:
    store.revoke_user("alice", now=NOW)
    store.revoke_user("alice", now=NOW - 1000)
    assert store.snapshot().user_cutoffs["alice"] == NOW


def test_revoke_user_again_counts_only_new_tokens(store: RevocationStore) -> None:
    store.record_issued(claims("a", iat=NOW - 10))
    assert store.revoke_user("alice", now=NOW) == 1
    store.record_issued(claims("b", iat=NOW + 10))
    assert store.revoke_user("alice", now=NOW + 20) == 1


def test_revoke_serial(store: RevocationStore) -> None:
    big = (1 << 158) | 0xDEADBEEF  # random_serial_number() size
    assert store.revoke_serial(big, now=NOW, reason="lost") is True
    assert store.revoke_serial(big, now=NOW) is False
    snap = store.snapshot()
    assert snap.serials == {big}
    assert snap.is_serial_revoked(big)
    assert not snap.is_serial_revoked(big + 1)
    with pytest.raises(ValueError, match="serial"):
        store.revoke_serial(0, now=NOW)


def test_list_tokens_reports_status(store: RevocationStore) -> None:
    store.record_issued(claims("a", iat=NOW - 30), now=NOW - 30)
    store.record_issued(claims("b", sub="bob", iat=NOW - 20), now=NOW - 20)
    store.record_issued(claims("c", sub="carol", iat=NOW - 10, ttl=5), now=NOW - 10)
    store.revoke("a", now=NOW, reason="r1")
    store.revoke_user("bob", now=NOW + 1, reason="r2")
    records = {r.jti: r for r in store.list_tokens()}
    assert [r.jti for r in store.list_tokens()] == ["a", "b", "c"]
    assert (records["a"].status, records["a"].revoke_reason) == ("revoked", "r1")
    assert (records["b"].status, records["b"].revoke_reason) == ("revoked", "r2")
    assert records["b"].revoked_at == NOW + 1
    assert records["c"].status == "active"
    assert records["c"].targets == ("build*",)
    assert records["c"].is_expired(NOW)
    assert not records["a"].is_expired(NOW)


def test_second_connection_sees_revocation(db: Path) -> None:
    with RevocationStore(db) as relay, RevocationStore(db) as cli:
        token = claims("t1")
        cli.record_issued(token)
        first = relay.snapshot()
        version = relay.data_version()
        assert relay.data_version() == version  # nothing changed

        cli.revoke("t1", now=NOW)

        assert relay.data_version() != version
        assert not first.is_revoked(token)  # snapshots are immutable
        assert relay.snapshot().is_revoked(token)


def test_own_writes_change_data_version(store: RevocationStore) -> None:
    version = store.data_version()
    store.revoke("x", now=NOW)
    assert store.data_version() != version


def test_revocation_from_another_process(db: Path) -> None:
    with RevocationStore(db) as relay:
        version = relay.data_version()
        assert relay.snapshot().jtis == frozenset()
        script = (
            "import sys\n"
            "from pathlib import Path\n"
            "from auth import RevocationStore\n"
            "with RevocationStore(Path(sys.argv[1])) as s:\n"
            "    s.revoke('from-cli', now=1.0)\n"
            "    s.revoke_serial(255, now=1.0)\n"
            "    s.revoke_user('mallory', now=2.0)\n"
        )
        subprocess.run([sys.executable, "-c", script, str(db)], check=True, timeout=30)
        assert relay.data_version() != version
        snap = relay.snapshot()
        assert snap.jtis == {"from-cli"}
        assert snap.serials == {255}
        assert snap.user_cutoffs == {"mallory": 2.0}


def test_store_usable_from_another_thread(store: RevocationStore) -> None:
    # The relay takes snapshots in a worker thread.
    store.revoke("t", now=NOW)
    result: list[RevocationSet] = []
    worker = threading.Thread(target=lambda: result.append(store.snapshot()))
    worker.start()
    worker.join(timeout=10)
    assert result[0].jtis == {"t"}


def test_reopen_keeps_data(db: Path) -> None:
    with RevocationStore(db) as s:
        s.revoke("persisted", now=NOW)
    with RevocationStore(db) as s:
        assert "persisted" in s.snapshot().jtis


def test_newer_schema_refused(db: Path) -> None:
    RevocationStore(db).close()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(AuthError, match="upgrade dbgrelay") as info:
        RevocationStore(db)
    assert info.value.reason == "bad_revocation_db"


def test_not_a_database(db: Path) -> None:
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuthError) as info:
        RevocationStore(db)
    assert info.value.reason == "bad_revocation_db"
    assert str(db) in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "revocations.db"
    with pytest.raises(AuthError, match="folder exists") as info:
        RevocationStore(path)
    assert str(path) in str(info.value)


def test_empty_revocation_set_revokes_nothing() -> None:
    empty = RevocationSet()
    assert not empty.is_revoked(claims("a"))
    assert not empty.is_serial_revoked(1)


def test_revocation_set_is_immutable() -> None:
    cutoffs = {"alice": 5.0}
    snap = RevocationSet(jtis={"a"}, user_cutoffs=cutoffs, serials={1})  # type: ignore[arg-type]
    cutoffs["bob"] = 1.0
    assert "bob" not in snap.user_cutoffs
    with pytest.raises(TypeError):
        snap.user_cutoffs["eve"] = 1.0  # type: ignore[index]
    assert isinstance(snap.jtis, frozenset)


_OPEN_AT_ONCE = r"""
import sys, time
from pathlib import Path
from auth import RevocationStore
path, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    pass
RevocationStore(path).close()
"""


def test_processes_opening_a_new_database_at_once_all_open_it(tmp_path: Path) -> None:
    # What `serve --workers N` does at start: N processes open one new file.
    # Switching a new file to WAL takes an exclusive lock that SQLite does not
    # wait for, so the slower opener used to fail with "database is locked".
    for attempt in range(8):
        path = tmp_path / f"tokens-{attempt}.sqlite"
        start = time.time() + 0.5
        openers = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN_AT_ONCE, str(path), str(start)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=60)[1] for p in openers]
        assert [p.returncode for p in openers] == [0] * 4, errors
