"""The PostgreSQL revocation store, against a real server shared by two stores."""

from __future__ import annotations

import select
from pathlib import Path

import psycopg
import pytest

from auth import AuthError, PgRevocationStore, migrate_schema, read_dsn
from auth.revocation_pg import CHANNEL, PG_SCHEMA_VERSION, open_listen_connection

from .conftest import NOW
from .test_revocation import claims


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    assert migrate_schema(pg_dsn) == (0, PG_SCHEMA_VERSION)
    return pg_dsn


@pytest.fixture
def store(dsn: str):
    with PgRevocationStore(dsn, pool_size=2) as s:
        yield s


def test_migrate_is_idempotent_and_records_the_version(dsn: str) -> None:
    assert migrate_schema(dsn) == (PG_SCHEMA_VERSION, PG_SCHEMA_VERSION)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version FROM dbgrelay_schema ORDER BY version").fetchall()
    assert rows == [(v,) for v in range(1, PG_SCHEMA_VERSION + 1)]


def test_a_database_without_the_schema_is_refused_with_what_to_run(pg_dsn: str) -> None:
    with pytest.raises(AuthError) as info:
        PgRevocationStore(pg_dsn)
    assert info.value.reason == "state_schema"
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(
        "has no dbgrelay schema yet; run `dbgrelay state migrate --config FILE`"
    )


def test_a_newer_schema_is_refused_with_upgrade(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO dbgrelay_schema (version) VALUES (%s)", (PG_SCHEMA_VERSION + 1,))
    with pytest.raises(AuthError) as info:
        PgRevocationStore(dsn)
    assert info.value.reason == "state_schema"
    assert str(info.value).endswith(
        f"schema is at version {PG_SCHEMA_VERSION + 1}, newer than this dbgrelay "
        f"understands ({PG_SCHEMA_VERSION}); upgrade dbgrelay"
    )
    with pytest.raises(AuthError, match="upgrade dbgrelay"):
        migrate_schema(dsn)


def test_an_unreachable_database_is_one_line_naming_the_dsn_file(pg_server) -> None:
    dead = f"host=127.0.0.1 port={pg_server.port} dbname=nosuchdb user={pg_server.user}"
    with pytest.raises(AuthError) as info:
        PgRevocationStore(dead, connect_timeout=2)
    assert info.value.reason == "state_unavailable"
    assert "\n" not in str(info.value) and "check state.dsn_file" in str(info.value)


def test_revocations_written_by_one_store_are_read_by_another(dsn: str, store) -> None:
    with PgRevocationStore(dsn) as other:
        token, later = claims("t1"), claims("t2", iat=NOW + 100)
        store.record_issued(token)
        store.record_issued(later)
        store.record_issued(claims("bob1", sub="bob"))
        assert store.revoke("t1", reason="laptop stolen", now=NOW + 5) is True
        assert store.revoke("t1", now=NOW + 6) is False
        assert store.revoke_user("bob", now=NOW + 10) == 1
        assert store.revoke_user("bob", now=NOW + 11) == 0
        assert store.revoke_serial(0xABC, now=NOW + 12) is True
        assert store.revoke_serial(0xABC, now=NOW + 13) is False

        before = other.data_version()
        assert not other.snapshot().is_revoked(token)  # memory only until refreshed
        revoked = other.refresh()
        assert other.data_version() != before
        assert revoked.is_revoked(token) and not revoked.is_revoked(later)
        assert revoked.is_revoked(claims("bob1", sub="bob"))
        assert not revoked.is_revoked(claims("bob2", sub="bob", iat=NOW + 20))
        assert revoked.is_serial_revoked(0xABC) and not revoked.is_serial_revoked(0xABD)
        # The writer's own copy is current at once.
        assert store.snapshot() == revoked
        records = {r.jti: r for r in other.list_tokens()}
        assert records["t1"].status == "revoked" and records["t1"].revoke_reason == "laptop stolen"
        assert records["t2"].status == "active"
        assert records["bob1"].status == "revoked"


def test_a_write_notifies_every_listener_when_it_commits(dsn: str, store) -> None:
    listener = open_listen_connection(dsn)
    try:
        store.revoke("t9", now=NOW)
        readable, _, _ = select.select([listener.fileno()], [], [], 10)
        assert readable, "no notification within 10 s"
        pgconn = listener.pgconn
        got = []
        # The notification may arrive in more than one read.
        while not got:
            pgconn.consume_input()
            while (note := pgconn.notifies()) is not None:
                got.append(note.relname.decode())
            if not got:
                select.select([listener.fileno()], [], [], 10)
        assert got == [CHANNEL]
    finally:
        listener.close()


def test_read_dsn_strips_the_file_and_refuses_an_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_text("  host=db dbname=dbgrelay\n")
    assert read_dsn(path) == "host=db dbname=dbgrelay"
    path.write_text("\n")
    with pytest.raises(AuthError, match="state.dsn_file is empty"):
        read_dsn(path)
    with pytest.raises(AuthError, match="cannot read state.dsn_file"):
        read_dsn(tmp_path / "missing")


def test_a_pooled_connection_the_server_ended_while_idle_is_replaced_not_an_error(
    store, pg_server
) -> None:
    store.refresh()  # one connection now idle in the pool
    pg_server.stop()
    pg_server.start()
    # The restart ended it; the next use opens a new one instead of failing.
    store.refresh()
    with store.connection("check") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
