"""Session audit files made ahead of time, off a tunnel's critical path.

Creating a session's audit file costs a file create, an fsync of the file
and one of its date folder (about 1 ms of disk, 2 ms with the worker
thread), and every tunnel paid it between its token check and its backend.
The pool makes a few of them in the background: each is created under a
fresh session id with its header written, and the file and its folder are
fsync'd before it is offered.  They are made in batches: once half the pool
is taken, one worker-thread job makes the other half, with one fsync of
their folder for the batch.  A new tunnel takes one (no await, no disk),
appends ``session.opened``, and only that record still has to reach the
disk: one ``fdatasync`` the session overlaps with its backend connect, and
waits for before a byte is forwarded (:mod:`relay.session`).

A file is offered only to a session that would have created the same file:
same ``audit_dir``, same audit key, today's date folder (UTC, by the
relay's audit clock).  Others are discarded (closed and removed) by the
refill task.  Unused files are removed when the relay stops; after a crash
they remain as header-only session files, as a crash between create and
``session.opened`` always could leave (``audit verify`` reports them as
ending without ``session.closed``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .audit import AuditWriter, session_audit_path
from .errors import RelayError

if TYPE_CHECKING:
    from datetime import datetime

    from .server import Relay

__all__ = ["AuditPool", "POOL_SIZE"]

log = logging.getLogger("dbgrelay.audit")

#: Files kept ready: enough for a burst of a few connects; each holds one
#: file descriptor and a few hundred bytes.  A refill starts when half of
#: them are taken and makes the rest in one batch.
POOL_SIZE = 8

#: Seconds before a refill that failed (full disk...) is tried again.
RETRY_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class _Ready:
    session_id: str
    path: Path
    audit_dir: Path
    signing_key: object
    sign_interval: float | None
    # The writer, once made (a list: the entry is made before its file).
    writers: list[AuditWriter] = field(default_factory=list)

    @property
    def writer(self) -> AuditWriter:
        return self.writers[0]


class AuditPool:
    """A few session audit files, durable and waiting for their session.

    Args:
        size: How many files to keep ready.
    """

    def __init__(self, size: int = POOL_SIZE) -> None:
        self.size = size
        #: A refill starts when no more than this many files are ready.
        self.low = size // 2
        self._ready: deque[_Ready] = deque()
        self._stale: list[_Ready] = []
        self._wanted = trio.Event()
        # Made by a worker thread and not yet taken into _ready; and whether
        # close() ran (a thread finishing after it removes its own file).
        self._lock = threading.Lock()
        self._made: list[_Ready] = []
        self._closed = False
        self.made = 0

    def __len__(self) -> int:
        return len(self._ready)

    def take(
        self,
        *,
        audit_dir: Path,
        signing_key: object,
        sign_interval: float | None,
        now: datetime,
    ) -> tuple[str, AuditWriter] | None:
        """A ready file for a session starting ``now``, or None (create one then).

        Never blocks and never touches the disk; files that no longer fit
        (another day, folder or key) are left to the refill task to remove.
        """
        found = None
        while self._ready and found is None:
            entry = self._ready.popleft()
            fits = (
                entry.audit_dir == audit_dir
                and entry.signing_key is signing_key
                and entry.sign_interval == sign_interval
                and entry.writer.path == session_audit_path(audit_dir, entry.session_id, now)
            )
            if fits:
                found = entry
            else:
                self._stale.append(entry)
        self._wanted.set()
        if found is None:
            return None
        return found.session_id, found.writer

    async def serve(self, relay: Relay) -> None:
        """Keep ``size`` files ready for ``relay`` until cancelled; then remove the unused ones."""
        from .session import new_session_id

        try:
            while True:
                self._wanted = trio.Event()
                self._discard_stale()
                rc = relay.config.relay
                if len(self._ready) > self.low:
                    await self._wanted.wait()
                    continue
                now = relay.audit_clock()
                batch = []
                for _ in range(self.size - len(self._ready)):
                    session_id = new_session_id()
                    batch.append(
                        _Ready(
                            session_id=session_id,
                            path=session_audit_path(rc.audit_dir, session_id, now),
                            audit_dir=rc.audit_dir,
                            signing_key=relay.audit_key,
                            sign_interval=rc.checkpoint_interval,
                        )
                    )
                try:
                    if relay.fsync_in_thread:
                        # Abandoned on cancel: the thread then puts the files
                        # where close() finds them, or removes them itself.
                        await trio.to_thread.run_sync(
                            self._make, batch, relay.audit_clock, abandon_on_cancel=True
                        )
                    else:
                        self._make(batch, relay.audit_clock)
                except (OSError, RelayError) as exc:
                    # The session that finds the pool empty creates its own
                    # file, and reports the failure to its client (503).
                    log.warning("audit.pool_failed", extra={"error": str(exc)})
                    await trio.sleep(RETRY_INTERVAL)
                    continue
                with self._lock:
                    self._ready.extend(self._made)
                    self._made.clear()
        finally:
            self.close()

    def _make(self, batch: list[_Ready], clock) -> None:
        """Create, write the header of and sync a batch of files (in a worker thread)."""
        try:
            for entry in batch:
                entry.writers.append(
                    AuditWriter.create(
                        entry.path,
                        kind="session",
                        session_id=entry.session_id,
                        signing_key=entry.signing_key,
                        clock=clock,
                        sign_interval=entry.sign_interval,
                    )
                )
            # The files, and their folder's entries for them.
            AuditWriter.sync_all([entry.writer for entry in batch])
        except BaseException:
            for entry in batch:
                _remove(entry)
            raise
        with self._lock:
            if not self._closed:
                self.made += len(batch)
                self._made.extend(batch)
                return
        for entry in batch:
            _remove(entry)

    def _discard_stale(self) -> None:
        stale, self._stale = self._stale, []
        for entry in stale:
            _remove(entry)

    def close(self) -> None:
        """Remove every unused file (they hold only a header); safe to call twice.

        A file still being made when this runs is removed by its own thread.
        """
        with self._lock:
            self._closed = True
            self._stale.extend(self._made)
            self._made.clear()
        self._stale.extend(self._ready)
        self._ready.clear()
        self._discard_stale()


def _remove(entry: _Ready) -> None:
    for writer in entry.writers:
        try:
            writer.close()
        except (OSError, RelayError) as exc:
            log.warning("audit.pool_failed", extra={"error": str(exc)})
    try:
        entry.path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("audit.pool_failed", extra={"error": str(exc)})
