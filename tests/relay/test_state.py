"""The per-user claim of the PostgreSQL backend, run on the event loop against a real server.

Real PostgreSQL (the test session's server), real sessions, real trio
cancellation; another client holds a user's advisory lock the way a claim on
another relay would.  These tests use the real clock: the claim waits on a
real socket, which an autojump clock would mistake for idleness.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import partial

import psycopg
import pytest
import trio

from auth import PgRevocationStore, migrate_schema
from auth.tokens import Claims
from config import StateSection
from config.schema import TargetConfig, TcpBackend
from relay.access import Grant
from relay.datapath.tls import TLSInfo
from relay.errors import RemoteProtocolError
from relay.metrics import NilMetrics
from relay.session import Session
from relay.state import SharedState, _user_lock

from ..postgres import PgServer

_TARGET = TargetConfig(
    name="build42",
    kind="tcp",
    backend=TcpBackend(host="127.0.0.1", port=9),
    backend_url="tcp://127.0.0.1:9",
)
_TLS = TLSInfo(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", group="unknown", alpn=None)


def make_session(sid: str, user: str) -> Session:
    now = int(time.time())
    claims = Claims(
        sub=user,
        jti=f"jti-{sid}",
        iss="dbgrelay",
        aud="dbgrelay",
        iat=now,
        nbf=now,
        exp=now + 600,
        targets=("*",),
        scope=None,
        kid="k1",
    )
    grant = Grant(claims=claims, target=_TARGET)
    return Session(id=sid, peer="127.0.0.1:40000", grant=grant, tls=_TLS, started=time.time())


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    migrate_schema(pg_dsn)
    return pg_dsn


@pytest.fixture
async def open_state(dsn: str) -> AsyncIterator[Callable[..., SharedState]]:
    opened: list[SharedState] = []

    def open_(**section: object) -> SharedState:
        settings = {"backend": "postgres", "pool_size": 2} | section
        store = PgRevocationStore(dsn, pool_size=2)
        state = SharedState(store, StateSection(**settings), metrics=NilMetrics())  # type: ignore[arg-type]
        opened.append(state)
        return state

    yield open_
    for state in opened:
        state.close()
        state.store.close()


def rows(dsn: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def claim_rows(dsn: str, user: str) -> list[str]:
    return [sid for (sid,) in rows(dsn, "SELECT id FROM dbgrelay_sessions WHERE sub = %s", user)]


@contextmanager
def holding_user_lock(dsn: str, user: str) -> Iterator[psycopg.Connection]:
    """Hold ``user``'s claim lock in an open transaction, as a claim on another relay does."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_user_lock(user),))
        try:
            yield conn
        finally:
            conn.rollback()


async def until_waiting_for_user_lock(dsn: str) -> None:
    """Return once a backend waits for an advisory lock (a claim queued behind the holder)."""
    sql = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    with trio.fail_after(30):  # a guard against hanging, not a bound on speed
        # Another process's state: nothing to wait on but the query itself.
        while (await trio.to_thread.run_sync(rows, dsn, sql))[0][0] == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)


def running_claims(dsn: str) -> int:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE state <> 'idle' "
        "AND query LIKE '%%dbgrelay_claim_session%%' AND pid <> pg_backend_pid()"
    )
    return rows(dsn, sql)[0][0]


async def test_claims_run_on_the_event_loop_without_a_worker_thread(
    open_state, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = open_state()
    # The first claim opens the claim connection (in a worker thread, once).
    await state.claim_session(make_session("s0", "alice"), limit=1, live=set())

    async def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("a claim went through a worker thread")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    await state.claim_session(make_session("s1", "bob"), limit=1, live=set())
    with pytest.raises(RemoteProtocolError) as refused:
        await state.claim_session(make_session("s2", "bob"), limit=1, live={"s1", "s2"})
    assert (refused.value.reason, refused.value.status) == ("user_sessions", 429)
    # A session this relay closed no longer counts (its id goes as a text[] parameter).
    odd = 'o"dd\\id,{x}'
    await state.claim_session(make_session(odd, "carol"), limit=1, live=set())
    await state.claim_session(make_session("s3", "carol"), limit=1, live={"s3"})
    monkeypatch.undo()
    assert claim_rows(dsn, "bob") == ["s1"]
    assert sorted(claim_rows(dsn, "carol")) == sorted([odd, "s3"])
    assert state.unavailable_since is None


async def test_a_claim_cancelled_mid_query_cancels_it_and_drops_the_connection(
    open_state, dsn: str
) -> None:
    # A statement timeout longer than the test's guard: only a cancel stops the statement.
    state = open_state(statement_timeout=60.0)
    await state.claim_session(make_session("warm", "alice"), limit=1, live=set())
    with holding_user_lock(dsn, "bob"):
        async with trio.open_nursery() as nursery:

            async def claim() -> None:
                await state.claim_session(make_session("cancelled", "bob"), limit=1, live=set())
                raise AssertionError("the claim passed a held lock")

            nursery.start_soon(claim)
            await until_waiting_for_user_lock(dsn)
            nursery.cancel_scope.cancel()
        # The server stopped the statement: nothing waits for the lock any more,
        # though its holder has not let go yet.
        with trio.fail_after(30):  # a guard against hanging, not a bound on speed
            while await trio.to_thread.run_sync(running_claims, dsn):  # noqa: ASYNC110
                await trio.sleep(0.01)
    # The cancelled claim inserted nothing, so bob's one slot is free.
    await state.claim_session(make_session("next", "bob"), limit=1, live=set())
    assert claim_rows(dsn, "bob") == ["next"]
    assert running_claims(dsn) == 0
    assert state.unavailable_since is None


async def test_a_claim_cancelled_while_its_connection_opens_closes_that_connection(
    open_state, dsn: str
) -> None:
    state = open_state()
    opener = state._claims._opener
    started, go = threading.Event(), threading.Event()
    made: list[psycopg.Connection] = []

    def slow_open() -> psycopg.Connection:
        started.set()
        go.wait(30)
        made.append(opener())
        return made[0]

    state._claims._opener = slow_open
    async with trio.open_nursery() as nursery:
        claim = partial(state.claim_session, make_session("s", "bob"), limit=1, live=set())
        nursery.start_soon(claim)
        await trio.to_thread.run_sync(started.wait)
        nursery.cancel_scope.cancel()
        go.set()
    assert len(made) == 1 and made[0].closed
    # Nothing was sent on it: the cancelled session has no row.
    assert claim_rows(dsn, "bob") == []


async def test_a_claim_waiting_for_one_users_lock_holds_up_no_other_users_claim(
    open_state, dsn: str
) -> None:
    state = open_state(pool_size=2)
    with holding_user_lock(dsn, "bob") as holder:
        async with trio.open_nursery() as nursery:
            waiting = partial(
                state.claim_session, make_session("waits", "bob"), limit=1, live=set()
            )
            nursery.start_soon(waiting)
            await until_waiting_for_user_lock(dsn)
            await state.claim_session(make_session("other", "carol"), limit=1, live=set())
            assert claim_rows(dsn, "carol") == ["other"]
            holder.rollback()  # bob's turn: the waiting claim goes through
    assert claim_rows(dsn, "bob") == ["waits"]


async def test_a_statement_timeout_fails_the_claim_as_state_unavailable(
    open_state, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = open_state(statement_timeout=0.2, unavailable_grace=0.0)
    await state.claim_session(make_session("warm", "alice"), limit=1, live=set())
    with holding_user_lock(dsn, "bob"):
        with pytest.raises(RemoteProtocolError) as refused:
            await state.claim_session(make_session("late", "bob"), limit=1, live=set())
    assert (refused.value.reason, refused.value.status) == ("state_unavailable", 503)
    assert state.last_error is not None
    assert state.last_error.startswith(
        "cannot count the user's sessions in the PostgreSQL state database "
        "(canceling statement due to statement timeout)"
    )
    assert [r.message for r in caplog.records if r.name == "dbgrelay.state"] == [
        "state.unavailable"
    ]
    assert claim_rows(dsn, "bob") == []


async def test_a_postgresql_restart_between_claims_costs_a_new_connection_not_an_outage(
    open_state, dsn: str, pg_server: PgServer
) -> None:
    state = open_state()
    await state.claim_session(make_session("before", "alice"), limit=2, live=set())
    # On this thread: the server dies with the thread that started it (PR_SET_PDEATHSIG).
    pg_server.stop()
    pg_server.start()
    await state.claim_session(make_session("after", "alice"), limit=2, live=set())
    assert sorted(claim_rows(dsn, "alice")) == ["after", "before"]
    assert state.unavailable_since is None


class Watching:
    """What the registration rounds and :meth:`SharedState.refresh_busy` use of a relay."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.last_activity: dict[str, float] = {}


def closes(dsn: str) -> dict[str, float]:
    sql = "SELECT target, extract(epoch FROM last_closed)::float8 FROM dbgrelay_target_activity"
    return dict(rows(dsn, sql))


async def test_a_session_claimed_and_closed_before_any_round_leaves_when_it_closed(
    open_state, dsn: str
) -> None:
    holder, watcher = open_state(), open_state()
    relay, watching = Watching(), Watching()
    before = time.time()
    watching.last_activity["build42"] = old_spell = trio.current_time()
    # Admitted on the holder, and closed before its first registration round.
    await holder.claim_session(make_session("short", "alice"), limit=1, live=set())
    assert watcher.busy_rows() == (["build42"], {})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.run_registration, relay)
        with trio.fail_after(30):  # a guard against hanging, not a bound on speed
            while await trio.to_thread.run_sync(claim_rows, dsn, "alice"):  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    (recorded,) = closes(dsn).values()
    assert before <= recorded <= time.time()
    # The watching relay never saw the row, yet the close moves its idle spell forward.
    await watcher.refresh_busy(watching)
    assert watcher.busy_elsewhere == frozenset()
    spell = watching.last_activity["build42"]
    assert old_spell < spell <= trio.current_time()
    await watcher.refresh_busy(watching)
    assert watching.last_activity["build42"] == spell


async def test_a_round_records_the_latest_close_and_hands_it_to_every_relay(
    open_state, dsn: str
) -> None:
    a, b = open_state(), open_state()
    await a.claim_session(make_session("s1", "alice"), limit=2, live=set())
    await b.claim_session(make_session("s2", "bob"), limit=2, live=set())
    ends, busy, closed = a.sync_rows({}, {"s1": ("build42", time.time())}, True)
    assert (ends, busy, list(closed)) == ([], ["build42"], ["build42"])
    assert b.busy_rows() == ([], closed)
    # An older close recorded later never moves the time back.
    execute(dsn, "UPDATE dbgrelay_target_activity SET last_closed = last_closed + interval '1 h'")
    future = closes(dsn)["build42"]
    b.sync_rows({}, {"s2": ("build42", time.time())}, True)
    assert closes(dsn) == {"build42": future}
    # Closes recorded before a relay started are older than its first idle spell.
    later = open_state()
    execute(dsn, "UPDATE dbgrelay_target_activity SET last_closed = now() - interval '1 h'")
    assert later.busy_rows() == ([], {})
    assert later.sync_rows({}, {}, False) == ([], [], {})


async def test_a_session_admitted_while_the_database_was_away_has_its_close_recorded_on_return(
    open_state, dsn: str, pg_server: PgServer
) -> None:
    holder, relay = open_state(connect_timeout=1.0), Watching()
    pg_server.stop()
    try:
        # Admitted within the grace, with no row: the database cannot be reached.
        await holder.claim_session(make_session("s1", "alice"), limit=1, live=set())
        assert holder.unavailable_since is not None
        before = time.time()
        holder.session_closed("s1")
        after = time.time()
    finally:
        pg_server.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.run_registration, relay)
        with trio.fail_after(30):  # a guard against hanging, not a bound on speed
            while not await trio.to_thread.run_sync(closes, dsn):  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # When it closed, as this relay saw it, not when the database heard of it.
    (recorded,) = closes(dsn).values()
    assert before - 1e-6 <= recorded <= after + 1e-6
