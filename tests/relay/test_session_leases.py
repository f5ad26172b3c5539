"""When registration rounds run, and what they record of closed sessions (on a real SQLite file).

The rounds are :class:`relay.state.SessionLeases`' trio side, shared by the
PostgreSQL and SQLite tables; here they run against the SQLite file the
workers of one host share, under trio's mock clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from auth import RevocationStore
from relay.state import ROUND_SETTLE, WorkerSessions

from .test_state import Watching, make_session


class Recorded(WorkerSessions):
    """A worker's table whose rounds report what they handed over, and when they ended.

    The report is sent on the event loop once the round's worker thread is
    done (from :meth:`_up`), so a test that receives it knows the round is
    over and the registration task waits for the next change.
    """

    def __init__(self, store: RevocationStore) -> None:
        super().__init__(store, 1, lease=60.0)
        self.send, self.rounds = trio.open_memory_channel[tuple[list[str], dict, float]](math.inf)
        self._handed: tuple[list[str], dict] | None = None

    def sync_rows(self, infos, gone, announce):  # type: ignore[no-untyped-def]
        self._handed = (sorted(infos), dict(gone))
        return super().sync_rows(infos, gone, announce)

    def _up(self) -> None:
        assert self._handed is not None
        self.send.send_nowait((*self._handed, trio.current_time()))


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Recorded]:
    sessions = Recorded(RevocationStore(tmp_path / "tokens.sqlite"))
    sessions.store.transaction(sessions.clear_predecessors)  # as a worker starts
    yield sessions
    sessions.store.close()


def opened(relay: Watching, sid: str) -> None:
    session = make_session(sid, "alice")
    session.opening = False
    relay.sessions[sid] = session


async def claimed(worker: WorkerSessions, relay: Watching, sid: str) -> None:
    """A session of ``relay`` admitted with its row, as the relay's claim gives it one."""
    opened(relay, sid)
    await worker.claim_session(relay.sessions[sid], limit=5, live=set(relay.sessions))


def closes(worker: WorkerSessions) -> dict[str, float]:
    return dict(
        worker.store.transaction(lambda c: c.execute("SELECT * FROM target_activity").fetchall())
    )


async def test_a_burst_of_opens_and_closes_is_one_round_a_settle_after_its_first_change(
    worker: Recorded, autojump_clock: trio.testing.MockClock
) -> None:
    relay = Watching()
    await claimed(worker, relay, "s1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run_registration, relay)
        assert (await worker.rounds.receive())[:2] == (["s1"], {})  # the first, at start
        start = trio.current_time()
        opened(relay, "s2")
        worker.sessions_changed()
        await trio.sleep(ROUND_SETTLE / 4)
        opened(relay, "s3")
        worker.sessions_changed()
        await trio.sleep(ROUND_SETTLE / 4)
        del relay.sessions["s1"]
        before = time.time()
        worker.session_closed("s1")
        after = time.time()
        infos, gone, at = await worker.rounds.receive()
        # One round for the three changes, ROUND_SETTLE after the first.
        assert at == start + ROUND_SETTLE
        assert infos == ["s2", "s3"]
        assert list(gone) == ["s1"]
        (target, closed_at) = gone["s1"]
        assert target == "build42" and before <= closed_at <= after
        assert closes(worker) == {"build42": closed_at}
        # Nothing more until the renewal, a third of the lease after that round.
        with trio.move_on_after(worker.lease / 3 - ROUND_SETTLE):
            await worker.rounds.receive()
            pytest.fail("a round without a change before the renewal")
        assert (await worker.rounds.receive())[2] == at + worker.lease / 3
        nursery.cancel_scope.cancel()


async def test_a_close_is_recorded_though_the_sessions_row_expired_before_the_round(
    worker: Recorded, autojump_clock: trio.testing.MockClock
) -> None:
    relay = Watching()
    await claimed(worker, relay, "s1")
    # The row ran out (the table was out of reach longer than the lease) and
    # another worker's claim deleted it, as it deletes every expired row.
    worker.store.transaction(lambda c: c.execute("DELETE FROM live_sessions"))
    del relay.sessions["s1"]
    worker.session_closed("s1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run_registration, relay)
        _, gone, _ = await worker.rounds.receive()
        nursery.cancel_scope.cancel()
    assert closes(worker) == {"build42": gone["s1"][1]}
