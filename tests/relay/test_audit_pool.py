"""Session audit files made ahead of time (relay.audit_pool)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import trio
import trio.testing

from relay import audit as audit_module
from relay.audit_pool import AuditPool


async def test_the_pool_refills_half_at_a_time_with_one_folder_fsync_per_batch(
    nursery, tmp_path, monkeypatch
):
    # Each file made ahead used to cost a worker-thread job and an fsync of
    # its folder; a batch costs one of each.
    folders = []
    real_fsync_dir = audit_module._fsync_dir

    def fsync_dir(folder):
        folders.append(folder)
        real_fsync_dir(folder)

    monkeypatch.setattr(audit_module, "_fsync_dir", fsync_dir)
    pool = AuditPool(size=8)
    batches = []
    make = pool._make

    def counted(batch, clock):
        batches.append(len(batch))
        make(batch, clock)

    pool._make = counted
    relay = SimpleNamespace(
        config=SimpleNamespace(relay=SimpleNamespace(audit_dir=tmp_path, checkpoint_interval=None)),
        audit_key=None,
        audit_clock=lambda: datetime.now(UTC),
        fsync_in_thread=False,
    )

    def take():
        now = relay.audit_clock()
        return pool.take(audit_dir=tmp_path, signing_key=None, sign_interval=None, now=now)

    nursery.start_soon(pool.serve, relay)
    await trio.testing.wait_all_tasks_blocked()
    assert (len(pool), batches, len(folders)) == (8, [8], 1)
    taken = [take() for _ in range(3)]
    await trio.testing.wait_all_tasks_blocked()
    assert (len(pool), batches) == (5, [8])  # more than half left: no refill yet
    taken.append(take())
    await trio.testing.wait_all_tasks_blocked()
    assert (len(pool), batches, len(folders)) == (8, [8, 4], 2)
    # Every file was offered with its header on disk, under its own session id.
    files = sorted(tmp_path.glob("*/*.jsonl"))
    assert len(files) == 12
    assert all(json.loads(f.read_text().splitlines()[0])["type"] == "header" for f in files)
    assert len({session_id for session_id, _ in taken}) == 4
    for _, writer in taken:
        writer.close()
