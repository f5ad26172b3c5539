"""Tamper-evident audit files: writing, verifying and reading them back.

Every tunnel gets ``audit_dir/YYYY-MM-DD/<session-id>.jsonl`` (see
:func:`session_audit_path`); relay-level events go to
``audit_dir/relay-YYYY-MM-DD.jsonl`` (:func:`relay_audit_path`).  With
``record = true`` on a target, the raw tunnel bytes go to
``<session-id>.bytes.jsonl`` beside the session file (:class:`ByteRecorder`),
and the signed ``session.closed`` record names that file's last hash.

The chain format and the pure checks are in :mod:`relay.audit_chain`.  This
module does the file work.  Everything here is synchronous: the relay calls
:meth:`AuditWriter.append` and :meth:`AuditWriter.flush` from its event loop and
runs :meth:`AuditWriter.sync` (which fsyncs) in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from auth.keys import jwk_thumbprint

from .audit_chain import (
    FORMAT,
    KINDS,
    SIGNED_EVENTS,
    ChainResult,
    ChainVerifier,
    LineError,
    build_header,
    build_record,
    compute_hash,
    decode_line,
    encode_line,
    format_time,
    parse_time,
)
from .errors import RelayError
from .printable import escape_text

try:  # POSIX only; the verify and timeline commands also run on Windows.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AuditWriteError",
    "AuditWriter",
    "ByteRecorder",
    "VerifyReport",
    "verify_file",
    "render_timeline",
    "session_audit_path",
    "relay_audit_path",
    "bytes_audit_path",
]

# Lines waiting in memory beyond this are written out by append() itself, so a
# busy tunnel with byte recording cannot grow the buffer without bound.
_AUTO_FLUSH_BYTES = 256 * 1024
# open_append reads back at most this much to find the last line.
_MAX_LINE_BYTES = 16 * 1024 * 1024
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DIRECTIONS = {"c2b": "->", "b2c": "<-"}


class AuditWriteError(RelayError):
    """An audit file cannot be created or written.

    ``reason`` is ``"audit_unwritable"`` or, when another process holds the
    file, ``"audit_locked"``.
    """

    def __init__(self, message: str, *, reason: str = "audit_unwritable") -> None:
        super().__init__(message, reason=reason)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc_date(now: datetime) -> str:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"audit paths need a timezone-aware time, got naive {now!r}")
    return now.astimezone(UTC).strftime("%Y-%m-%d")


def _check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
        raise ValueError(
            f"session id must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-' "
            f"(it becomes a file name), got {session_id!r}"
        )
    return session_id


def session_audit_path(audit_dir: Path, session_id: str, now: datetime) -> Path:
    """``audit_dir/YYYY-MM-DD/<session-id>.jsonl``, the date in UTC.

    Raises:
        ValueError: ``session_id`` is not a safe file name, or ``now`` is naive.
    """
    return Path(audit_dir) / _utc_date(now) / f"{_check_session_id(session_id)}.jsonl"


def relay_audit_path(audit_dir: Path, now: datetime) -> Path:
    """``audit_dir/relay-YYYY-MM-DD.jsonl``, the date in UTC."""
    return Path(audit_dir) / f"relay-{_utc_date(now)}.jsonl"


def bytes_audit_path(session_path: Path) -> Path:
    """The raw-bytes file beside a session file: ``<session-id>.bytes.jsonl``."""
    session_path = Path(session_path)
    return session_path.with_name(session_path.name.removesuffix(".jsonl") + ".bytes.jsonl")


def _suffixed(path: Path, n: int) -> Path:
    # relay-2026-11-22.jsonl -> relay-2026-11-22.1.jsonl
    if n == 0:
        return path
    return path.with_name(f"{path.name.removesuffix('.jsonl')}.{n}.jsonl")


def _unwritable(path: Path, exc: OSError, doing: str) -> AuditWriteError:
    detail = exc.strerror or str(exc)
    return AuditWriteError(
        f"cannot {doing} audit file {path}: {detail}; check that audit_dir exists, "
        "is writable by the relay's user and has free space"
    )


def _make_private_dirs(directory: Path) -> None:
    # os.makedirs applies ``mode`` only to the last directory (Python 3.7+), so
    # create each missing level ourselves: every directory we make is 0700.
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(level, 0o700)


#: ``fdatasync`` where there is one (Linux): appends need their data and
#: size on disk, which it guarantees, and skip the inode's times.
_datasync = getattr(os, "fdatasync", os.fsync)


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise AuditWriteError(
                f"audit file {path} is locked by another process; two relays must not "
                "share one audit_dir",
                reason="audit_locked",
            ) from exc
        raise


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class AuditWriter:
    """Appends chained records to one audit file.

    Records are encoded and chained at once and written when :meth:`flush`
    runs (or when more than 256 KiB wait).  :meth:`sync` also fsyncs, so the
    relay runs it via ``trio.to_thread.run_sync``; it may run while the event
    loop keeps appending.

    Resource handling: the writer owns an open file descriptor holding an
    exclusive ``flock`` on the file; :meth:`close` (or leaving a ``with``
    block) writes what is pending and releases both.  Call :meth:`sync` first
    when the last records must survive a power cut.

    With a signing key and a ``sign_interval``, a record appended when the
    last signature is ``sign_interval`` seconds old or older is signed
    itself.  So in the file, every unsigned record is less than
    ``sign_interval`` younger than the signature (or header) before it: a
    file cut after its last signature loses at most that much time of
    records, however busy the file.  A quiet file needs :meth:`checkpoint`
    called that often too (the relay's housekeeping does it).

    Use :meth:`create` or :meth:`open_append`; the constructor is internal.
    """

    def __init__(
        self,
        *,
        path: Path,
        fd: int,
        kind: str,
        session_id: str | None,
        signing_key: Ed25519PrivateKey | None,
        clock: Callable[[], datetime],
        seq: int,
        last_record: dict[str, object] | None,
        sign_interval: float | None = None,
    ) -> None:
        self._path = path
        self._fd: int | None = fd
        self._kind = kind
        self._session_id = session_id
        self._signing_key = signing_key
        self._key_id = jwk_thumbprint(signing_key.public_key()) if signing_key else None
        self._clock = clock
        self._seq = seq
        self._last_record = last_record
        self._sign_interval = sign_interval
        # When the last signature (or, before any, the header) was made;
        # None when unknown, so the next record is signed.
        self._last_signed_at: datetime | None = None
        self._ended = False
        self._dir_synced = False
        self._pending = bytearray()
        self._buffer_lock = threading.Lock()  # guards _pending
        self._write_lock = threading.Lock()  # one writer at a time, in order

    # -- opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        kind: str,
        session_id: str | None,
        signing_key: Ed25519PrivateKey | None,
        clock: Callable[[], datetime] | None = None,
        sign_interval: float | None = None,
    ) -> AuditWriter:
        """Create a new audit file and write its header.

        Missing parent directories are created with mode 0700 and the file
        with mode 0600.  An existing file is never overwritten.

        Args:
            path: The file to create (see :func:`session_audit_path`).
            kind: ``"session"``, ``"relay"`` or ``"bytes"``.
            session_id: The session's id (None for the relay file).
            signing_key: Signs ``session.closed``, ``audit.checkpoint`` and
                ``relay.stopped`` records; None writes an unsigned file.
            clock: Returns the current aware time; defaults to UTC now.
            sign_interval: Sign a record appended when the last signature
                is this many seconds old (see the class docstring); None
                signs only the events that are always signed.

        Raises:
            AuditWriteError: The directory or file cannot be created or
                written, or the file already exists (``reason`` says which).
        """
        if kind not in KINDS:
            raise ValueError(f"audit kind must be one of {sorted(KINDS)}, got {kind!r}")
        if kind == "relay":
            if session_id is not None:
                raise ValueError("the relay audit file has no session_id; pass None")
        else:
            _check_session_id(session_id)
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(
                f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}"
            )
        path = Path(path)
        clock = clock or _utcnow
        try:
            _make_private_dirs(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _CLOEXEC, 0o600)
        except FileExistsError as exc:
            raise AuditWriteError(
                f"audit file {path} already exists; audit files are never overwritten"
            ) from exc
        except OSError as exc:
            raise _unwritable(path, exc, "create") from exc
        writer = cls(
            path=path,
            fd=fd,
            kind=kind,
            session_id=session_id,
            signing_key=signing_key,
            clock=clock,
            seq=0,
            last_record=None,
            sign_interval=sign_interval,
        )
        try:
            os.fchmod(fd, 0o600)  # whatever the umask said
            _lock(fd, path)
            created = clock()
            writer._last_signed_at = created
            header = build_header(
                kind=kind,
                session_id=session_id,
                created=format_time(created),
                nonce=secrets.token_hex(16),
                key_id=writer._key_id,
            )
            writer._emit(header)
            writer.flush()
        except BaseException:
            # Leave no empty or half-written file behind: open_append would
            # call it damaged.
            writer._pending.clear()
            writer.close()
            path.unlink(missing_ok=True)
            raise
        return writer

    @classmethod
    def open_append(
        cls,
        path: Path,
        *,
        signing_key: Ed25519PrivateKey | None,
        clock: Callable[[], datetime] | None = None,
        sign_interval: float | None = None,
    ) -> AuditWriter:
        """Continue the relay's audit file for the day, across relay restarts.

        If the file (or, after earlier damage, its latest ``.N`` sibling)
        exists, its header and last line are checked and the chain continues
        from that last line with an ``audit.reopened`` record naming the
        current ``key_id``.  If that file is damaged (empty, a bad header, an
        incomplete or edited last line), it is left untouched and a new file
        ``relay-YYYY-MM-DD.N.jsonl`` is started whose first record,
        ``audit.previous_damaged``, names the damaged file and the problem.
        Otherwise a new file is created as by :meth:`create`.

        Only the tail is checked here, so startup stays fast on a large file;
        :func:`verify_file` checks the whole chain.  ``sign_interval`` is as
        for :meth:`create`.

        Raises:
            AuditWriteError: The file cannot be opened, read or written, or
                another process holds it (``reason="audit_locked"``).
        """
        path = Path(path)
        clock = clock or _utcnow
        latest = 0
        if not path.exists():
            return cls.create(
                path,
                kind="relay",
                session_id=None,
                signing_key=signing_key,
                clock=clock,
                sign_interval=sign_interval,
            )
        while _suffixed(path, latest + 1).exists():
            latest += 1
        current = _suffixed(path, latest)
        try:
            fd = os.open(current, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC)
        except OSError as exc:
            raise _unwritable(current, exc, "open") from exc
        try:
            _lock(fd, current)
            damage, last = _check_continuable(current)
        except BaseException:
            os.close(fd)
            raise
        if damage is None:
            assert last is not None
            writer = cls(
                path=current,
                fd=fd,
                kind="relay",
                session_id=None,
                signing_key=signing_key,
                clock=clock,
                seq=last["seq"],  # type: ignore[arg-type]
                last_record=last,
                sign_interval=sign_interval,
            )
            # A file left by a relay that died may end unsigned: then sign
            # audit.reopened itself (its time since that tail is unknown).
            writer._last_signed_at = parse_time(last.get("time")) if "sig" in last else None
            writer.append("audit.reopened", key_id=writer._key_id)
            writer.flush()
            return writer
        os.close(fd)
        writer = cls.create(
            _suffixed(path, latest + 1),
            kind="relay",
            session_id=None,
            signing_key=signing_key,
            clock=clock,
            sign_interval=sign_interval,
        )
        writer.append("audit.previous_damaged", file=current.name, problem=damage)
        writer.flush()
        return writer

    # -- properties ----------------------------------------------------------

    @property
    def path(self) -> Path:
        """The file being written."""
        return self._path

    @property
    def kind(self) -> str:
        """``"session"``, ``"relay"`` or ``"bytes"``."""
        return self._kind

    @property
    def key_id(self) -> str | None:
        """Thumbprint of the signing key, or None when records are unsigned."""
        return self._key_id

    @property
    def seq(self) -> int:
        """``seq`` of the last record appended (0 right after the header)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """``hash`` of the last record appended (written or still pending)."""
        assert self._last_record is not None
        return self._last_record["hash"]  # type: ignore[return-value]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd is None

    @property
    def ended(self) -> bool:
        """Whether ``session.closed`` is written or the file closed: nothing may follow."""
        return self._ended or self._fd is None

    # -- writing -------------------------------------------------------------

    def _emit(self, record: dict[str, object]) -> None:
        line = encode_line(record)
        with self._buffer_lock:
            self._pending += line
            size = len(self._pending)
        self._seq = record["seq"]  # type: ignore[assignment]
        self._last_record = record
        if size > _AUTO_FLUSH_BYTES and self._write_lock.acquire(blocking=False):
            # If a worker thread is already writing, it will take these too.
            try:
                self._write_pending()
            finally:
                self._write_lock.release()

    def _check_open(self) -> None:
        if self._fd is None:
            raise ValueError(f"audit file {self._path} is closed")
        if self._ended:
            raise ValueError(
                f"audit file {self._path} already ends with session.closed; nothing may follow it"
            )

    def append(self, event: str, /, **fields: object) -> dict[str, object]:
        """Chain one record; it is written by the next :meth:`flush`.

        ``audit.checkpoint`` and ``relay.stopped`` records are signed when the
        writer has a key.  ``session.closed`` is written by
        :meth:`close_session`.

        Args:
            event: Dotted event name, e.g. ``"session.opened"``.
            **fields: The event's fields; JSON-serialisable values only.

        Returns:
            The record as written (a dict; changing it changes nothing).

        Raises:
            TypeError: A field value is not JSON-serialisable.
            ValueError: A reserved field name (``seq``, ``time``, ``event``,
                ``prev``, ``hash``, ``sig``, ``type``), ``session.closed``, or
                the writer is closed.
            AuditWriteError: More than 256 KiB were pending and writing them
                failed.
        """
        if event == "session.closed":
            raise ValueError("write session.closed with close_session(), which signs it")
        return self._append(event, fields, sign=event in SIGNED_EVENTS)

    def _append(self, event: str, fields: dict[str, object], *, sign: bool) -> dict[str, object]:
        self._check_open()
        now = self._clock()
        if (
            not sign
            and self._sign_interval is not None
            and (
                self._last_signed_at is None
                or (now - self._last_signed_at).total_seconds() >= self._sign_interval
            )
        ):
            sign = True
        sign = sign and self._signing_key is not None
        record = build_record(
            seq=self._seq + 1,
            prev=self.last_hash,
            time=format_time(now),
            event=event,
            fields=fields,
            signing_key=self._signing_key if sign else None,
        )
        self._emit(record)
        if sign:
            self._last_signed_at = now
        return record

    def checkpoint(self) -> dict[str, object]:
        """Write a signed ``audit.checkpoint`` record covering the chain so far.

        If the last record is already a checkpoint or a signed record, nothing
        is written and that record is returned, so an idle relay calling this
        every few seconds does not fill its file with checkpoints.

        Returns:
            The record that now ends the chain.
        """
        self._check_open()
        last = self._last_record
        assert last is not None
        if last.get("event") == "audit.checkpoint" or "sig" in last:
            return last
        return self._append("audit.checkpoint", {}, sign=True)

    def close_session(self, **fields: object) -> dict[str, object]:
        """Write the signed ``session.closed`` record that ends a session file.

        With byte recording, pass ``bytes_hash`` and ``bytes_records`` from
        :meth:`ByteRecorder.close` so the signature covers the bytes file.

        Returns:
            The record as written.

        Raises:
            ValueError: This is not a session file, it is already closed, or
                only one of ``bytes_hash``/``bytes_records`` was given.
        """
        if self._kind != "session":
            raise ValueError(f"close_session() is for session files, not {self._kind} files")
        if ("bytes_hash" in fields) != ("bytes_records" in fields):
            raise ValueError("pass both bytes_hash and bytes_records, or neither")
        record = self._append("session.closed", fields, sign=True)
        self._ended = True
        return record

    def _write_pending(self) -> None:
        # Caller holds _write_lock.  Take the pending bytes, write them outside
        # the buffer lock (append keeps working) and put back what failed, so a
        # retry after e.g. ENOSPC continues exactly where the file stopped.
        fd = self._fd
        if fd is None:
            return
        with self._buffer_lock:
            data = bytes(self._pending)
            self._pending.clear()
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            with self._buffer_lock:
                self._pending[:0] = view
            raise _unwritable(self._path, exc, "write") from exc

    def flush(self) -> None:
        """Write pending records to the OS (no fsync).

        Raises:
            AuditWriteError: The write failed; the unwritten records stay
                pending for the next call.
        """
        with self._write_lock:
            self._write_pending()

    def sync(self) -> None:
        """:meth:`flush`, then fdatasync the file (and, once, fsync its directory).

        Blocks on the disk: the relay runs it with ``trio.to_thread.run_sync``.

        Raises:
            AuditWriteError: The write or fsync failed.
        """
        AuditWriter.sync_all([self])

    @staticmethod
    def sync_all(writers: Sequence[AuditWriter]) -> None:
        """:meth:`sync` for several files, each new folder entry in one fsync per folder.

        Blocks on the disk, as :meth:`sync` does.

        Raises:
            AuditWriteError: A write or fsync failed (naming the first file
                it concerns).
        """
        new_in: dict[Path, list[AuditWriter]] = {}
        for writer in writers:
            writer.flush()
            fd = writer._fd
            if fd is None:
                continue
            try:
                # The data and the file size (all a reader needs); not the mtime.
                _datasync(fd)
            except OSError as exc:
                raise _unwritable(writer._path, exc, "fsync") from exc
            if not writer._dir_synced:
                new_in.setdefault(writer._path.parent, []).append(writer)
        for folder, created in new_in.items():
            try:
                # The new directory entries must be durable too, or a crash can
                # lose a whole file even though its data was fsynced.
                _fsync_dir(folder)
            except OSError as exc:
                raise _unwritable(created[0]._path, exc, "fsync") from exc
            for writer in created:
                writer._dir_synced = True

    def close(self) -> None:
        """Write what is pending and close the file; safe to call twice.

        Raises:
            AuditWriteError: The final write failed (the file is closed anyway).
        """
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditWriter(path={str(self._path)!r}, kind={self._kind!r}, seq={self._seq})"


def _fsync_dir(directory: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # pragma: no cover - Windows
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_first_line(fh: BinaryIO, limit: int) -> bytes:
    fh.seek(0)
    return fh.readline(limit)


def _read_last_line(fh: BinaryIO, size: int) -> bytes | None:
    # The file ends with b"\n" (checked by the caller); find the one before it.
    end = size - 1
    start = end
    chunk = 64 * 1024
    while start > 0:
        step = min(chunk, start)
        fh.seek(start - step)
        block = fh.read(step)
        cut = block.rfind(b"\n")
        if cut != -1:
            start = start - step + cut + 1
            break
        start -= step
        if end - start > _MAX_LINE_BYTES:
            return None
    fh.seek(start)
    return fh.read(end - start)


def _check_continuable(path: Path) -> tuple[str | None, dict[str, object] | None]:
    """(problem, None) if ``path`` must not be continued, else (None, last record)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return "file is empty (header never written)", None
            first = _read_first_line(fh, _MAX_LINE_BYTES)
            try:
                header = decode_line(first.rstrip(b"\n"))
            except LineError as exc:
                return f"line 1: {exc}", None
            if (
                header.get("type") != "header"
                or header.get("format") != FORMAT
                or header.get("kind") != "relay"
                or header.get("hash") != compute_hash(header)
            ):
                return f"line 1: not an intact {FORMAT} relay header", None
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                return "last line is incomplete (relay stopped in the middle of a write)", None
            raw = _read_last_line(fh, size)
    except OSError as exc:
        raise _unwritable(path, exc, "read") from exc
    if raw is None:
        return "last line is longer than 16 MiB", None
    try:
        last = decode_line(raw)
    except LineError as exc:
        return f"last line: {exc}", None
    seq = last.get("seq")
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or not isinstance(last.get("hash"), str)
        or last.get("hash") != compute_hash(last)
    ):
        return "last line: hash mismatch or no seq (record edited)", None
    return None, last


class ByteRecorder:
    """Records a tunnel's raw bytes into ``<session-id>.bytes.jsonl``.

    Each :meth:`add` becomes one ``bytes`` record (``dir``, ``t``, base64
    ``data``) in a chained file of kind ``"bytes"``.  Once ``max_bytes`` of
    payload are stored, the rest of that chunk is dropped, one
    ``bytes.truncated`` record is written and later calls store nothing.

    Resource handling: like :class:`AuditWriter`; :meth:`close` returns what
    the session's ``session.closed`` record must carry.
    """

    def __init__(self, writer: AuditWriter, max_bytes: int) -> None:
        self._writer = writer
        self._max_bytes = max_bytes
        self._captured = 0
        self._truncated = False
        self._result: tuple[str, int] | None = None

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        session_id: str,
        max_bytes: int,
        clock: Callable[[], datetime] | None = None,
    ) -> ByteRecorder:
        """Create the bytes file (see :func:`bytes_audit_path`).

        Args:
            path: ``<session-id>.bytes.jsonl`` beside the session file.
            session_id: The session's id.
            max_bytes: Payload cap in bytes (0 records nothing but the marker).

        Raises:
            AuditWriteError: As :meth:`AuditWriter.create`.
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a whole number of bytes >= 0, got {max_bytes!r}")
        writer = AuditWriter.create(
            path, kind="bytes", session_id=session_id, signing_key=None, clock=clock
        )
        return cls(writer, max_bytes)

    @property
    def path(self) -> Path:
        """The bytes file."""
        return self._writer.path

    @property
    def captured(self) -> int:
        """Payload bytes stored so far."""
        return self._captured

    @property
    def truncated(self) -> bool:
        """Whether the cap was reached and bytes were dropped."""
        return self._truncated

    def add(self, direction: str, t: float, data: bytes) -> None:
        """Record one chunk.

        Args:
            direction: ``"c2b"`` (client to backend) or ``"b2c"``.
            t: Seconds since the session started.
            data: The bytes as they crossed the relay.

        Raises:
            ValueError: Bad direction or time, or the recorder is closed.
            AuditWriteError: Writing pending records failed (see ``append``).
        """
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'c2b' or 'b2c', got {direction!r}")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ValueError(f"t must be a finite number of seconds, got {t!r}")
        if self._result is not None:
            raise ValueError(f"byte recorder {self.path} is closed")
        if self._truncated or not data:
            return
        room = self._max_bytes - self._captured
        chunk = bytes(data[:room])
        if chunk:
            self._writer.append(
                "bytes",
                dir=direction,
                t=round(float(t), 6),
                data=base64.b64encode(chunk).decode("ascii"),
            )
            self._captured += len(chunk)
        if len(chunk) < len(data):
            self._truncated = True
            self._writer.append("bytes.truncated", max_bytes=self._max_bytes)

    def flush(self) -> None:
        """Write pending records to the OS."""
        self._writer.flush()

    def sync(self) -> None:
        """Flush and fsync (run it in a worker thread)."""
        self._writer.sync()

    def close(self) -> tuple[str, int]:
        """Write everything, close the file and return ``(last_hash, records)``.

        ``records`` counts the records after the header.  Pass both to
        :meth:`AuditWriter.close_session` as ``bytes_hash`` and
        ``bytes_records``.  Calling it again returns the same pair.

        Raises:
            AuditWriteError: Writing the last records failed.  The file is
                closed anyway, and a second call returns the pair it should
                have ended with (so the end record can name it, and
                ``audit verify`` reports the records that are missing).
        """
        if self._result is None:
            self._result = (self._writer.last_hash, self._writer.seq)
            self._writer.close()
        return self._result


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify_file` found.

    Attributes:
        ok: No problems (notes do not count).
        path: The file checked.
        records: JSON records read, header included.
        problems: One line each, naming the first bad line.
        truncated: The file ends before its end record or mid-line.
        signed: A key was given, every signature verifies, the file ends
            with a signed record and there is no problem: the signatures
            vouch for the whole file.
        notes: What was not or cannot be checked, and, with
            ``allow_unsigned_tail``, the records after the last signature.
        kind: ``"session"``, ``"relay"`` or ``"bytes"`` (None if unknown).
        session_id: From the header.
        last_hash: ``hash`` of the last record.
        signed_through: The last line a valid signature covers (0: none).
        lines: Lines read, header included.
    """

    ok: bool
    path: Path
    records: int
    problems: list[str]
    truncated: bool
    signed: bool
    notes: list[str] = field(default_factory=list)
    kind: str | None = None
    session_id: str | None = None
    last_hash: str | None = None
    signed_through: int = 0
    lines: int = 0


def _kind_from_name(path: Path) -> str:
    if path.name.endswith(".bytes.jsonl"):
        return "bytes"
    if path.name.startswith("relay-"):
        return "relay"
    return "session"


def _iter_lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield line[:-1], False
            else:
                yield line, True


def _run_chain(
    path: Path, pubkey: Ed25519PublicKey | None, *, allow_unsigned_tail: bool = False
) -> ChainResult:
    verifier = ChainVerifier(
        pubkey=pubkey, kind_hint=_kind_from_name(path), allow_unsigned_tail=allow_unsigned_tail
    )
    for raw, incomplete in _iter_lines(path):
        verifier.feed_line(raw, incomplete=incomplete)
    return verifier.finish()


def verify_file(
    path: Path,
    *,
    pubkey: Ed25519PublicKey | None = None,
    allow_unsigned_tail: bool = False,
) -> VerifyReport:
    """Check an audit file's chain, signatures, end record and bytes file.

    Catches edited, deleted, inserted and reordered lines, truncation, lines
    appended after ``session.closed`` and, with ``pubkey``, a file rewritten
    with a freshly computed chain (its signatures fail or are missing) and a
    file cut after a signature (records follow the last signature).  For a
    session file that names a bytes file, that file's chain, last hash and
    record count are checked too.

    Args:
        path: A session, relay or bytes audit file.
        pubkey: The audit public key.  Without it, ``signed`` is False and a
            note says only the chain was checked.
        allow_unsigned_tail: Accept records after the last signature, and a
            session file without its end record, as the live file of a
            running relay (or the files of one that crashed) has them; a note
            names those lines and their times.  Nothing vouches for them.

    Returns:
        The report; ``ok`` is False when there is any problem.

    Raises:
        OSError: ``path`` cannot be read.
    """
    path = Path(path)
    result = _run_chain(path, pubkey, allow_unsigned_tail=allow_unsigned_tail)
    problems = list(result.problems)
    notes = list(result.notes)

    expected_stem = path.name.removesuffix(".jsonl")
    if result.kind == "bytes":
        expected_stem = expected_stem.removesuffix(".bytes")
    if result.kind in ("session", "bytes") and result.session_id not in (None, expected_stem):
        problems.insert(
            0,
            f"line 1: session_id {result.session_id!r} does not match the file name "
            f"{path.name!r} (file renamed or replaced)",
        )

    if result.kind == "session":
        problems.extend(_check_bytes_file(path, result))

    return VerifyReport(
        ok=not problems,
        path=path,
        records=result.records,
        problems=problems,
        truncated=result.truncated,
        signed=result.signed and not problems,
        notes=notes,
        kind=result.kind,
        session_id=result.session_id,
        last_hash=result.last_hash,
        signed_through=result.signed_through,
        lines=result.lines,
    )


def _check_bytes_file(path: Path, result: ChainResult) -> list[str]:
    bpath = bytes_audit_path(path)
    ref = result.bytes_ref
    if ref is None:
        if bpath.exists() and not result.truncated:
            return [
                f"bytes file {bpath.name} exists but session.closed has no bytes_hash "
                "(bytes file not covered by the signature)"
            ]
        return []
    where = f"session.closed at line {ref.line}"
    if not bpath.exists():
        return [f"bytes file {bpath.name} is missing ({where} records bytes_hash)"]
    try:
        inner = _run_chain(bpath, None)
    except OSError as exc:
        return [f"bytes file {bpath.name} cannot be read: {exc.strerror or exc}"]
    problems = [f"bytes file {bpath.name}: {p}" for p in inner.problems]
    if inner.kind != "bytes":
        problems.append(f"bytes file {bpath.name}: header kind is {inner.kind!r}, not 'bytes'")
    if inner.session_id not in (None, result.session_id):
        problems.append(
            f"bytes file {bpath.name}: session_id {inner.session_id!r} is not this session's"
        )
    if inner.last_hash != ref.bytes_hash:
        problems.append(
            f"bytes file {bpath.name}: last hash does not match bytes_hash in {where} "
            "(bytes file edited, truncated or replaced)"
        )
    elif inner.data_records != ref.bytes_records:
        problems.append(
            f"bytes file {bpath.name}: {inner.data_records} records where {where} "
            f"says {ref.bytes_records}"
        )
    return problems


# -- timeline ----------------------------------------------------------------


def _short_time(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _show_value(value: object) -> str:
    if isinstance(value, str) and value and not re.search(r'[\s"=]', value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_HIDDEN = {"seq", "time", "event", "prev", "hash", "sig"}


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, object] | str]]:
    for n, (raw, _incomplete) in enumerate(_iter_lines(path), start=1):
        try:
            yield n, decode_line(raw)
        except LineError as exc:
            yield n, str(exc)


def render_timeline(path: Path, *, show_bytes: bool = False) -> str:
    """A human-readable view of an audit file, one line per record.

    ``2026-11-22T10:00:01.123Z  +0.000s  session.opened  user=alice target=build42``
    where the offset counts from the first record after the header, and signed
    records end with ``[signed]``.  If the chain does not verify, the output
    starts with ``# WARNING`` lines (signatures are not checked here; use
    :func:`verify_file` with the public key for that).  Records hold text
    peers chose (a refused token's claimed ``sub``), so control and format
    characters are escaped (see :func:`relay.printable.escape_text`): every
    output line is one line of the terminal, and nothing in it acts on the
    terminal.

    Args:
        path: A session, relay or bytes audit file.
        show_bytes: For a session file, append a hex dump of its bytes file:
            per chunk a line with time, direction and size, then rows of
            ``<arrow> <stream offset>  <16 hex bytes>  |<ascii>|`` where the
            offset counts bytes in that direction and ``->`` is client to
            backend, ``<-`` backend to client.

    Returns:
        The text, ending with a newline.

    Raises:
        OSError: ``path`` cannot be read.
    """
    path = Path(path)
    report = verify_file(path)
    out: list[str] = [f"# WARNING: {p}" for p in report.problems]
    start: datetime | None = None
    kind = report.kind
    for n, rec in _read_records(path):
        if isinstance(rec, str):
            out.append(f"# line {n}: {rec}")
            continue
        if rec.get("type") == "header":
            out.append(
                f"# {path.name}: {rec.get('kind')} audit file, session_id="
                f"{_show_value(rec.get('session_id'))} created={rec.get('created')} "
                f"key_id={_show_value(rec.get('key_id'))}"
            )
            continue
        if kind == "bytes":
            continue
        moment = parse_time(rec.get("time"))
        if moment is None:
            out.append(f"# line {n}: no valid time: {_show_value(rec)}")
            continue
        if start is None:
            start = moment
        offset = (moment - start).total_seconds()
        fields = " ".join(f"{k}={_show_value(v)}" for k, v in rec.items() if k not in _HIDDEN)
        line = f"{_short_time(moment)}  {offset:+.3f}s  {rec.get('event')}"
        if fields:
            line += f"  {fields}"
        if "sig" in rec:
            line += "  [signed]"
        out.append(line)
    if kind == "bytes":
        out.extend(_hex_dump(path))
    elif show_bytes:
        bpath = bytes_audit_path(path)
        if bpath.exists():
            out.append(f"# bytes recorded in {bpath.name}")
            out.extend(_hex_dump(bpath))
        else:
            out.append(f"# no bytes recorded ({bpath.name} does not exist)")
    return "\n".join(escape_text(line) for line in out) + "\n"


def _hex_dump(path: Path) -> list[str]:
    out: list[str] = []
    offsets = {"c2b": 0, "b2c": 0}
    for n, rec in _read_records(path):
        if isinstance(rec, str) or rec.get("type") == "header":
            continue
        event = rec.get("event")
        if event == "bytes.truncated":
            out.append(f"bytes.truncated: cap of {rec.get('max_bytes')} bytes reached")
            continue
        if event != "bytes":
            continue
        direction = rec.get("dir")
        arrow = _DIRECTIONS.get(direction)  # type: ignore[arg-type]
        t = rec.get("t")
        try:
            data = base64.b64decode(rec.get("data"), validate=True)  # type: ignore[arg-type]
        except (binascii.Error, TypeError, ValueError):
            out.append(f"# line {n}: data is not valid base64")
            continue
        if arrow is None or not isinstance(t, int | float):
            out.append(f"# line {n}: bad dir or t")
            continue
        out.append(f"{t:+.3f}s  {direction} {arrow}  {len(data)} bytes")
        base = offsets[direction]  # type: ignore[index]
        for i in range(0, len(data), 16):
            row = data[i : i + 16]
            hexes = " ".join(f"{b:02x}" for b in row[:8])
            if len(row) > 8:
                hexes += "  " + " ".join(f"{b:02x}" for b in row[8:])
            text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
            out.append(f"  {arrow} {base + i:08x}  {hexes:<48}  |{text}|")
        offsets[direction] += len(data)  # type: ignore[index]
    return out
