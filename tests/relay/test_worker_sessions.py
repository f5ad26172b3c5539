"""The live-sessions table of ``serve --workers N`` in the shared SQLite file.

Real SQLite files and real threads: each worker has its own connection, as
the worker processes do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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


def claim(worker: WorkerSessions, sid: str, user: str = "alice", **caps: object) -> str | None:
    kwargs = {"cap": 1, "total_cap": None, "closed": []} | caps
    return worker.claim_row(sid, user, info(), **kwargs)  # type: ignore[arg-type]


def test_a_user_at_the_cap_on_one_worker_is_refused_on_the_other(open_worker) -> None:
    w0, w1 = open_worker(0), open_worker(1)
    assert claim(w0, "s1") is None
    assert claim(w1, "s2") == "user_sessions"
    assert claim(w1, "s3", "bob") is None
    # max_sessions counts every worker's rows.
    assert claim(w1, "s4", "carol", total_cap=2) == "relay_full"
    # A session the claiming worker closed no longer counts, though its row lingers.
    assert claim(w0, "s5", closed=["s1"]) is None


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
    ends, busy = w1.sync_rows({"s1": ("alice", info())}, [], True)
    assert (ends, busy) == ([], [])
    assert w0.busy_rows() == ["build42"]
    # Its session closed: the next round deletes its row.
    assert w1.sync_rows({}, ["s1"], True) == ([], [])
    assert w0.busy_rows() == []
    assert claim(w0, "s2") is None


def test_close_deletes_the_workers_rows(open_worker, tmp_path: Path) -> None:
    w0 = open_worker(0)
    assert claim(w0, "s1") is None
    leaving = WorkerSessions(RevocationStore(tmp_path / "tokens.sqlite"), 1, lease=60.0)
    assert claim(leaving, "s2", "bob") is None
    leaving.close()
    assert claim(w0, "s3", "bob") is None
