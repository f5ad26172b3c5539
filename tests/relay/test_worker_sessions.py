"""The live-sessions table of ``serve --workers N`` in the shared SQLite file.

Real SQLite files and real threads: each worker has its own connection, as
the worker processes do.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

from auth import RevocationStore
from relay.state import WorkerSessions


@pytest.fixture
def open_worker(tmp_path: Path) -> Iterator:
    opened: list[WorkerSessions] = []

    def open_(index: int, lease: float = 60.0) -> WorkerSessions:
        sessions = WorkerSessions(RevocationStore(tmp_path / "tokens.sqlite"), index, lease=lease)
        sessions.store.transaction(sessions.clear_predecessors)
        opened.append(sessions)
        return sessions

    yield open_
    for sessions in opened:
        sessions.store.close()


def info(target: str = "build42") -> str:
    return json.dumps({"target": target})


def ended(*sids: str, target: str = "build42") -> dict[str, tuple[str, float]]:
    """Closed sessions as a round hands them over: their target, closed now."""
    return {sid: (target, time.time()) for sid in sids}


def claim(worker: WorkerSessions, sid: str, user: str = "alice", **caps: object) -> str | None:
    kwargs = {"cap": 1, "total_cap": None, "closed": {}} | caps
    return worker.claim_row(sid, user, info(), **kwargs)  # type: ignore[arg-type]


def test_a_user_at_the_cap_on_one_worker_is_refused_on_the_other(open_worker) -> None:
    w0, w1 = open_worker(0), open_worker(1)
    assert claim(w0, "s1") is None
    assert claim(w1, "s2") == "user_sessions"
    assert claim(w1, "s3", "bob") is None
    # max_sessions counts every worker's rows.
    assert claim(w1, "s4", "carol", total_cap=2) == "relay_full"
    # A session the claiming worker closed no longer counts, though its row lingers.
    assert claim(w0, "s5", closed=ended("s1")) is None


def test_workers_claiming_for_one_user_at_once_never_pass_the_cap(open_worker) -> None:
    workers = [open_worker(0), open_worker(1)]
    barrier = threading.Barrier(12)

    def attempt(n: int) -> str | None:
        barrier.wait()
        return claim(workers[n % 2], f"s{n}", cap=3)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(attempt, range(12)))
    assert results.count(None) == 3
    assert results.count("user_sessions") == 9


def test_rows_go_when_their_lease_runs_out_or_a_successor_starts(open_worker) -> None:
    dead = open_worker(1, lease=-1.0)  # every lease it writes has run out already
    assert claim(dead, "s1") is None
    w0 = open_worker(0)
    assert claim(w0, "s2") is None

    crashed = open_worker(1)
    assert claim(crashed, "s3", "bob") is None
    assert claim(w0, "s4", "bob") == "user_sessions"
    successor = WorkerSessions(RevocationStore(crashed.store.path), 1, lease=60.0)
    try:
        # Only the rows of worker 1's predecessors: worker 0's stay.
        assert successor.store.transaction(successor.clear_predecessors) == 1
    finally:
        successor.store.close()
    assert claim(w0, "s4", "bob") is None
    assert claim(w0, "s5") == "user_sessions"


def test_a_round_renews_this_workers_rows_and_names_targets_in_use_elsewhere(
    open_worker,
) -> None:
    w0, w1 = open_worker(0), open_worker(1)
    assert claim(w1, "s1") is None
    ends, busy, closed = w1.sync_rows({"s1": ("alice", info())}, {}, True)
    assert (ends, busy, closed) == ([], [], {})
    assert w0.busy_rows() == (["build42"], {})
    # Its session closed: the next round deletes its row, and records the close.
    ends, busy, closed = w1.sync_rows({}, ended("s1"), True)
    assert (ends, busy, list(closed)) == ([], [], ["build42"])
    assert w0.busy_rows() == ([], closed)
    assert claim(w0, "s2") is None


def test_close_deletes_the_workers_rows(open_worker, tmp_path: Path) -> None:
    w0 = open_worker(0)
    assert claim(w0, "s1") is None
    leaving = WorkerSessions(RevocationStore(tmp_path / "tokens.sqlite"), 1, lease=60.0)
    assert claim(leaving, "s2", "bob") is None
    leaving.close()
    assert claim(w0, "s3", "bob") is None


def test_every_way_a_workers_row_goes_records_when_its_targets_last_session_closed(
    open_worker, tmp_path: Path
) -> None:
    w0, w1 = open_worker(0), open_worker(1)
    before = time.time()
    # Claimed, then closed before any round registered it: the next round deletes it.
    assert claim(w1, "s1") is None
    (_, _, closed) = w1.sync_rows({}, ended("s1"), True)
    (_, first) = w0.busy_rows()
    assert first == closed and before <= first["build42"] <= time.time()
    # A claim deletes the claiming worker's closed rows: the close is recorded there too.
    assert claim(w1, "s2") is None
    assert claim(w1, "s3", "bob", closed=ended("s2")) is None
    (_, second) = w0.busy_rows()
    assert second["build42"] >= first["build42"]
    assert w1.sync_rows({}, ended("s2", "s3"), True)[2]["build42"] >= second["build42"]
    # A worker that stops deletes its rows, and records their closes.
    leaving = WorkerSessions(RevocationStore(tmp_path / "tokens.sqlite"), 2, lease=60.0)
    assert leaving.claim_row("s4", "carol", info("other"), cap=1, total_cap=None, closed={}) is None
    assert "other" not in w0.busy_rows()[1]
    leaving.close()
    assert "other" in w0.busy_rows()[1]
    # An expired row records nothing: when its tunnel ended is unknown.
    dead = open_worker(3, lease=-1.0)
    assert dead.claim_row("s5", "dave", info("lost"), cap=1, total_cap=None, closed={}) is None
    assert claim(w0, "s6", "erin") is None
    assert "lost" not in w0.busy_rows()[1]


class Watching:
    """What :meth:`WorkerSessions.refresh_busy` uses of the relay."""

    def __init__(self) -> None:
        self.sessions: dict = {}
        self.last_activity: dict[str, float] = {}


def test_a_tunnel_that_opened_and_closed_on_another_worker_between_looks_starts_a_spell(
    open_worker,
) -> None:
    w0, w1 = open_worker(0), open_worker(1)
    watching = Watching()

    async def main() -> None:
        await w0.refresh_busy(watching)
        assert watching.last_activity == {}
        watching.last_activity["build42"] = old_spell = trio.current_time()
        # Between two looks of worker 0, a tunnel on worker 1 opens and closes.
        assert claim(w1, "s1") is None
        w1.sync_rows({}, ended("s1"), True)
        await w0.refresh_busy(watching)
        assert w0.busy_elsewhere == frozenset()
        spell = watching.last_activity["build42"]
        assert old_spell < spell <= trio.current_time()
        # The same close seen again is the same spell, not a newer one.
        await w0.refresh_busy(watching)
        assert watching.last_activity["build42"] == spell
        # A spell this relay started later (a close of its own) is never moved back.
        watching.last_activity["build42"] = later = trio.current_time() + 1
        w1.store.transaction(
            lambda conn: conn.execute("UPDATE target_activity SET last_closed = last_closed + 0.5")
        )
        await w0.refresh_busy(watching)
        assert watching.last_activity["build42"] == later

    trio.run(main)
