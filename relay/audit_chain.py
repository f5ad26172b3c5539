"""Hash chain, signatures and verification for audit files (pure: no I/O, no trio).

An audit file is JSON lines.  Line 1 is a header (``seq`` 0, ``type``
``"header"``); every later record carries ``seq`` (previous + 1), ``time``,
``event``, its own fields, ``prev`` (the ``hash`` of the record before it) and
``hash``::

    hash = sha256(canonical_json(record without "hash" and "sig")).hexdigest()
    canonical_json(x) = json.dumps(x, sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False).encode("utf-8")

Because ``prev`` and ``seq`` are inside the hashed body, editing, deleting,
inserting or reordering a line breaks the chain at that line.  Someone with
write access can still rewrite the whole file with a freshly computed chain;
that is caught by signatures: records whose event is in
:data:`SIGNED_EVENTS` carry ``sig`` (any other record may too, see
``sign_interval`` in :mod:`relay.audit`), the base64 Ed25519 signature over
the ASCII hex ``hash`` (which itself was computed without ``sig``).  The signed
``session.closed`` record ends a session file and so covers every line above
it; ``audit.checkpoint`` and ``relay.stopped`` records cover the relay file,
which has no end.

The writer lives in :mod:`relay.audit`; this module builds records, encodes
lines and checks a file fed to :class:`ChainVerifier` one line at a time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from auth.keys import jwk_thumbprint

__all__ = [
    "FORMAT",
    "KINDS",
    "SIGNED_EVENTS",
    "RESERVED_FIELDS",
    "ChainResult",
    "ChainVerifier",
    "BytesReference",
    "LineError",
    "build_header",
    "build_record",
    "canonical_json",
    "compute_hash",
    "decode_line",
    "encode_line",
    "format_time",
    "parse_time",
    "sign_hash",
    "signature_valid",
]

#: Value of the header's ``format`` field; bump it when the layout changes.
FORMAT = "dbgrelay-audit/1"

#: File kinds: one per tunnel, one per relay and day, and recorded raw bytes.
KINDS = frozenset({"session", "relay", "bytes"})

#: Events whose record is signed when the writer has a key.
SIGNED_EVENTS = frozenset({"session.closed", "audit.checkpoint", "relay.stopped"})

#: Names the chain itself uses; ``append`` refuses them as event fields.
RESERVED_FIELDS = frozenset({"seq", "time", "event", "prev", "hash", "sig", "type"})

_HASH_RE = re.compile(r"[0-9a-f]{64}")


def canonical_json(body: Mapping[str, object]) -> str:
    """The canonical JSON text that a record's hash is computed over."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_hash(record: Mapping[str, object]) -> str:
    """SHA-256 (hex) of ``record`` without its ``hash`` and ``sig`` fields.

    Args:
        record: A header or record, with or without ``hash``/``sig``.

    Returns:
        64 lowercase hex digits.
    """
    body = {k: v for k, v in record.items() if k != "hash" and k != "sig"}
    # surrogatepass: the writer never emits lone surrogates, but a forged line
    # may contain "\udc80" escapes; hashing them must give a mismatch, not crash.
    data = canonical_json(body).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def sign_hash(key: Ed25519PrivateKey, record_hash: str) -> str:
    """Base64 Ed25519 signature over the ASCII hex ``record_hash``."""
    return base64.b64encode(key.sign(record_hash.encode("ascii"))).decode("ascii")


def signature_valid(pubkey: Ed25519PublicKey, record_hash: str, sig: object) -> bool:
    """Whether ``sig`` (base64 text) is ``pubkey``'s signature over ``record_hash``."""
    if not isinstance(sig, str) or not isinstance(record_hash, str):
        return False
    try:
        raw = base64.b64decode(sig, validate=True)
        pubkey.verify(raw, record_hash.encode("ascii"))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds: ``2026-11-22T10:00:01.123456Z``.

    Raises:
        ValueError: ``moment`` is naive (its zone would be a guess).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"audit times must be timezone-aware, got naive {moment!r}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: object) -> datetime | None:
    """Parse an RFC 3339 time with a zone; None if ``text`` is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment


def _normalise_fields(event: str, fields: Mapping[str, object]) -> dict[str, object]:
    # Round-trip every value through JSON so the record we hash is exactly the
    # record a reader parses back (tuples become lists, int dict keys strings).
    out: dict[str, object] = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"audit event {event!r}: field names must be strings, got {name!r}")
        if name in RESERVED_FIELDS:
            raise ValueError(
                f"audit event {event!r}: field {name!r} is reserved for the hash chain; "
                "use another name"
            )
        out[name] = value if _comes_back_as_is(value) else _round_trip(event, name, value)
    return out


def _comes_back_as_is(value: object) -> bool:
    """Whether the JSON round trip would return ``value`` itself: most fields.

    Exact types only: a subclass (an ``IntEnum``, say) comes back as its
    base type, so it takes the round trip.
    """
    if type(value) is str:
        return value.isascii()  # any other text may hold a lone surrogate
    if type(value) is int:
        return value.bit_length() <= 1024  # past Python's digit limit json refuses it
    if type(value) is bool or value is None:
        return True
    return type(value) is float and math.isfinite(value)


def _round_trip(event: str, name: str, value: object) -> object:
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"audit event {event!r}: field {name!r} is not JSON-serialisable "
            f"({type(value).__name__}: {exc}); pass str, int, float, bool, None, "
            "list or dict"
        ) from exc
    return json.loads(text)


def build_header(
    *, kind: str, session_id: str | None, created: str, nonce: str, key_id: str | None
) -> dict[str, object]:
    """The ``seq`` 0 header record, with its hash.

    Args:
        kind: One of :data:`KINDS`.
        session_id: The session's id; None for the relay file.
        created: RFC 3339 UTC time (see :func:`format_time`).
        nonce: Random hex, so no two files share a chain.
        key_id: :func:`auth.keys.jwk_thumbprint` of the audit key, or None when unsigned.
    """
    if kind not in KINDS:
        raise ValueError(f"audit kind must be one of {sorted(KINDS)}, got {kind!r}")
    header: dict[str, object] = {
        "seq": 0,
        "type": "header",
        "format": FORMAT,
        "kind": kind,
        "session_id": session_id,
        "created": created,
        "nonce": nonce,
        "key_id": key_id,
        "prev": None,
    }
    header["hash"] = compute_hash(header)
    return header


def build_record(
    *,
    seq: int,
    prev: str,
    time: str,
    event: str,
    fields: Mapping[str, object],
    signing_key: Ed25519PrivateKey | None = None,
) -> dict[str, object]:
    """One chained record, hashed and (with ``signing_key``) signed.

    Args:
        seq: The previous record's ``seq`` plus one.
        prev: The previous record's ``hash``.
        time: RFC 3339 UTC time (see :func:`format_time`).
        event: Dotted event name, e.g. ``"session.opened"``.
        fields: The event's fields; must be JSON-serialisable.
        signing_key: Sign the record's hash with this key.

    Returns:
        The record as it is written, ``hash`` and optional ``sig`` last.

    Raises:
        TypeError: A field value is not JSON-serialisable.
        ValueError: A field name is one of :data:`RESERVED_FIELDS`, or the
            event name is empty.
    """
    if not isinstance(event, str) or not event:
        raise ValueError(f"audit event name must be a non-empty string, got {event!r}")
    body: dict[str, object] = {"seq": seq, "time": time, "event": event}
    body.update(_normalise_fields(event, fields))
    body["prev"] = prev
    record_hash = compute_hash(body)
    body["hash"] = record_hash
    if signing_key is not None:
        body["sig"] = sign_hash(signing_key, record_hash)
    return body


def encode_line(record: Mapping[str, object]) -> bytes:
    """One JSON line (UTF-8, ending in ``\\n``) for ``record``."""
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n"


class LineError(ValueError):
    """A line is not a JSON object; ``str(exc)`` is the problem without the line number."""


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # A duplicated key would let one value pass the hash check (json keeps the
    # last) while grep and other readers show the first.
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def decode_line(raw: bytes) -> dict[str, object]:
    """Parse one line (without its newline) into a record.

    Raises:
        LineError: Not UTF-8, not JSON, a duplicated key or not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError("not valid UTF-8") from exc
    try:
        obj = json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except _DuplicateKey as exc:
        raise LineError(f"duplicate key {exc.args[0]!r} (line edited)") from exc
    except ValueError as exc:
        raise LineError("not valid JSON") from exc
    if not isinstance(obj, dict):
        raise LineError("not a JSON object")
    return obj


@dataclass(frozen=True, slots=True)
class BytesReference:
    """What a ``session.closed`` record says about the session's bytes file."""

    line: int
    bytes_hash: object
    bytes_records: object


@dataclass(frozen=True, slots=True)
class ChainResult:
    """Outcome of :class:`ChainVerifier`; see :class:`relay.audit.VerifyReport`."""

    ok: bool
    records: int
    problems: list[str]
    notes: list[str]
    truncated: bool
    signed: bool
    kind: str | None
    session_id: str | None
    last_hash: str | None
    data_records: int
    bytes_ref: BytesReference | None
    signed_through: int = 0
    lines: int = 0


@dataclass(slots=True)
class _Link:
    line: int
    seq: int
    hash: str


class ChainVerifier:
    """Check an audit file fed one line at a time, like a sans-IO parser.

    Feed every line (without its ``\\n``) with :meth:`feed_line`, in file
    order; pass ``incomplete=True`` for a last line that had no newline.  Then
    call :meth:`finish`.  Memory stays constant however long the file is.

    Args:
        pubkey: Check signatures with this key.  Without it only the chain is
            checked, which cannot tell a file rewritten with a fresh chain.
        kind_hint: Kind to assume when line 1 is not a header (from the name).
        allow_unsigned_tail: Accept records after the last signature (and a
            session file without its end record) as a live or crashed file
            has them; they become notes instead of problems.  Without it,
            with ``pubkey``, such records are a problem: anyone can cut a
            file there without breaking the chain.
    """

    def __init__(
        self,
        *,
        pubkey: Ed25519PublicKey | None = None,
        kind_hint: str | None = None,
        allow_unsigned_tail: bool = False,
    ) -> None:
        if pubkey is not None and not isinstance(pubkey, Ed25519PublicKey):
            raise TypeError(f"pubkey must be an Ed25519PublicKey, got {type(pubkey).__name__}")
        self.pubkey = pubkey
        self.allow_unsigned_tail = allow_unsigned_tail
        self._given_key_id = jwk_thumbprint(pubkey) if pubkey is not None else None
        self._kind: str | None = kind_hint
        self._line = 0
        self._records = 0
        self._data_records = 0
        self._problems: list[str] = []
        self._notes: list[str] = []
        self._truncated = False
        self._session_id: str | None = None
        self._key_id: str | None = None
        self._prev: _Link | None = None
        self._last_hash: str | None = None
        self._last_line = 0
        self._closed_line: int | None = None
        self._after_closed_reported = False
        self._bytes_ref: BytesReference | None = None
        self._sigs_seen = 0
        self._sigs_good = 0
        self._sigs_bad = 0
        self._unsigned_required = 0
        self._last_signed_line = 0
        self._key_note_given = False
        # Times of the first record after the last signature, and of the last record.
        self._tail_first_time: str | None = None
        self._last_time: str | None = None

    def _problem(self, text: str, line: int | None = None) -> None:
        self._problems.append(f"line {line}: {text}" if line is not None else text)

    def feed_line(self, raw: bytes, *, incomplete: bool = False) -> None:
        """Check the next line.

        Args:
            raw: The line's bytes without the trailing ``\\n``.
            incomplete: The file ended inside this line (no ``\\n``).
        """
        self._line += 1
        n = self._line
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            self._problem("empty line (line inserted or record blanked)", n)
            return
        try:
            rec = decode_line(raw)
        except LineError as exc:
            if incomplete and str(exc) == "not valid JSON":
                self._truncated = True
                self._problem("not valid JSON (incomplete last line: file truncated mid-record)", n)
            else:
                self._problem(str(exc), n)
            self._prev = None
            return
        self._records += 1
        if incomplete:
            self._notes.append(f"line {n} has no newline at its end")
        if n == 1:
            if rec.get("type") == "header":
                self._check_header(rec)
                return
            self._problem("not a header (the file's first line was deleted or replaced)", n)
        elif rec.get("type") == "header":
            self._problem("second header (files concatenated or lines inserted)", n)
            self._prev = None
            return
        self._check_record(n, rec)

    def _check_header(self, rec: dict[str, object]) -> None:
        if rec.get("format") != FORMAT:
            self._problem(f"unknown format {rec.get('format')!r} (this verifier reads {FORMAT})", 1)
        kind = rec.get("kind")
        if kind in KINDS:
            self._kind = kind  # type: ignore[assignment]
        else:
            self._problem(f"unknown kind {kind!r} (expected one of {sorted(KINDS)})", 1)
        session_id = rec.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            self._problem("header session_id is not a string", 1)
        elif self._kind in ("session", "bytes") and session_id is None:
            self._problem(f"a {self._kind} header needs a session_id", 1)
        else:
            self._session_id = session_id
        key_id = rec.get("key_id")
        if key_id is not None and not isinstance(key_id, str):
            self._problem("header key_id is not a string", 1)
        else:
            self._key_id = key_id
        if rec.get("seq") != 0 or rec.get("prev") is not None:
            self._problem("header must have seq 0 and prev null", 1)
        if parse_time(rec.get("created")) is None:
            self._problem("header created is not an RFC 3339 time", 1)
        record_hash = rec.get("hash")
        if record_hash != compute_hash(rec):
            self._problem("hash mismatch (header edited)", 1)
        if isinstance(record_hash, str):
            self._prev = _Link(line=1, seq=0, hash=record_hash)
            self._last_hash = record_hash
            self._last_line = 1

    def _check_record(self, n: int, rec: dict[str, object]) -> None:
        seq = rec.get("seq")
        event = rec.get("event")
        record_hash = rec.get("hash")
        seq_ok = isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0
        hash_ok = isinstance(record_hash, str) and _HASH_RE.fullmatch(record_hash) is not None
        for name, good in (
            ("seq", seq_ok),
            ("event", isinstance(event, str) and bool(event)),
            ("time", parse_time(rec.get("time")) is not None),
            ("prev", isinstance(rec.get("prev"), str)),
            ("hash", hash_ok),
        ):
            if not good:
                self._problem(f"missing or malformed field {name!r}", n)
        content_ok = hash_ok and record_hash == compute_hash(rec)
        if hash_ok and not content_ok:
            self._problem("hash mismatch (record edited)", n)

        prev = self._prev
        if prev is not None and seq_ok:
            expected = prev.seq + 1
            if seq > expected:  # type: ignore[operator]
                self._problem(
                    f"seq {seq} where {expected} expected (line deleted or lines reordered)", n
                )
            elif seq < expected:  # type: ignore[operator]
                self._problem(
                    f"seq {seq} where {expected} expected (line inserted or lines reordered)", n
                )
            elif rec.get("prev") != prev.hash:
                self._problem(
                    f"prev does not match line {prev.line} (lines reordered, deleted or inserted)",
                    n,
                )

        if self._closed_line is not None and not self._after_closed_reported:
            self._after_closed_reported = True
            self._problem(
                f"record after session.closed at line {self._closed_line} "
                "(lines appended after the session ended)",
                n,
            )

        event_name = event if isinstance(event, str) else "record"
        self._check_signature(n, rec, event_name, content_ok)
        time_text = rec.get("time") if isinstance(rec.get("time"), str) else None
        self._last_time = time_text
        if self._last_signed_line != n and self._tail_first_time is None:
            self._tail_first_time = time_text
        elif self._last_signed_line == n:
            self._tail_first_time = None

        if event_name == "audit.reopened":
            key_id = rec.get("key_id")
            self._key_id = key_id if isinstance(key_id, str) else None
        if event_name == "session.closed" and self._closed_line is None:
            self._closed_line = n
            if "bytes_hash" in rec or "bytes_records" in rec:
                self._bytes_ref = BytesReference(
                    line=n,
                    bytes_hash=rec.get("bytes_hash"),
                    bytes_records=rec.get("bytes_records"),
                )
        self._data_records += 1
        if seq_ok and hash_ok:
            self._prev = _Link(line=n, seq=seq, hash=record_hash)  # type: ignore[arg-type]
            self._last_hash = record_hash  # type: ignore[assignment]
        else:
            self._prev = None
            self._last_hash = None
        self._last_line = n

    def _check_signature(
        self, n: int, rec: dict[str, object], event: str, content_ok: bool
    ) -> None:
        sig = rec.get("sig")
        if sig is None:
            if self.pubkey is not None and event in SIGNED_EVENTS:
                self._unsigned_required += 1
                self._problem(
                    f"{event} record is not signed (file rewritten without the key, "
                    "or written by a relay with no audit key)",
                    n,
                )
            return
        self._sigs_seen += 1
        if self.pubkey is None or not content_ok:
            # An edited record is already reported; its signature says nothing more.
            return
        if signature_valid(self.pubkey, rec["hash"], sig):  # type: ignore[arg-type]
            self._sigs_good += 1
            self._last_signed_line = n
            return
        self._sigs_bad += 1
        self._problem(
            f"{event} signature does not verify with the given key (file rewritten or wrong key)",
            n,
        )
        if not self._key_note_given and self._key_id and self._key_id != self._given_key_id:
            self._key_note_given = True
            self._notes.append(
                f"the file names audit key_id {self._key_id}; "
                f"the given key's key_id is {self._given_key_id}"
            )

    def finish(self) -> ChainResult:
        """Checks that need the whole file; returns the result."""
        problems = list(self._problems)
        notes = list(self._notes)
        truncated = self._truncated
        if self._line == 0:
            problems.append("line 1: not a header (file is empty)")
        if self._kind == "session" and self._closed_line is None:
            truncated = True
            if self.allow_unsigned_tail:
                notes.append(
                    "no session.closed record: the session is live, or its relay stopped "
                    "without ending it (accepted: --allow-unsigned-tail)"
                )
            else:
                problems.append("ends without a session.closed record (truncated)")
        signed = False
        if self.pubkey is None:
            notes.append(
                "signatures not checked (no public key given): only the hash chain was "
                "checked, which cannot detect a file rewritten with a freshly computed chain"
            )
        elif self._kind == "bytes":
            notes.append(
                "bytes files carry no signature: the session file's signed session.closed "
                "record covers them (verify the session file)"
            )
        else:
            signed = (
                self._sigs_good > 0
                and self._sigs_bad == 0
                and self._unsigned_required == 0
                and self._sigs_good == self._sigs_seen
            )
            self._check_tail(problems, notes)
        return ChainResult(
            ok=not problems,
            records=self._records,
            problems=problems,
            notes=notes,
            truncated=truncated,
            signed=signed and self._last_signed_line == self._last_line,
            kind=self._kind,
            session_id=self._session_id,
            last_hash=self._last_hash,
            data_records=self._data_records,
            bytes_ref=self._bytes_ref,
            signed_through=self._last_signed_line,
            lines=self._last_line,
        )

    def _check_tail(self, problems: list[str], notes: list[str]) -> None:
        # Records after the last good signature are covered by the hash chain
        # only, and a chain cut at any line is still a valid chain: without
        # this check, cutting a file after a checkpoint went unnoticed.
        if self._sigs_seen == 0 and not self.allow_unsigned_tail:
            problems.append("no signature to check: file has no signed record")
            return
        first, last = self._last_signed_line + 1, self._last_line
        if (
            first > last
            or self._line == 0
            or self._sigs_bad
            or self._unsigned_required
            or self._after_closed_reported
        ):
            # Nothing after the last signature, or a signature problem (or
            # lines after session.closed) is already reported for this file.
            return
        one = first == last
        span = f"line {first}" if one else f"lines {first}-{last}"
        come, are = ("comes", "is") if one else ("come", "are")
        if self._last_signed_line == 0:
            where = "before any signature"
        else:
            where = f"after the last signature (line {self._last_signed_line})"
        if not self.allow_unsigned_tail:
            problems.append(
                f"{span} {come} {where}: the file may have been cut there; "
                "for the live file of a running relay pass --allow-unsigned-tail"
            )
            return
        if self._key_id != self._given_key_id:
            # The flag accepts an unsigned tail of a file the given key signs,
            # not a file that names no key or another one.
            problems.append(
                f"{span} {are} unsigned and the file names audit key_id {self._key_id} "
                f"where the given key's key_id is {self._given_key_id}"
            )
            return
        times = ""
        if self._tail_first_time and self._last_time:
            times = f", written {self._tail_first_time} to {self._last_time}"
        notes.append(
            f"{span} {come} {where}{times}: only the hash chain covers "
            f"{'it' if one else 'them'} "
            "(accepted: --allow-unsigned-tail)"
        )
