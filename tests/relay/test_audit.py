"""Audit files: every tamper kind is caught and named by line, on real files."""

from __future__ import annotations

import base64
import enum
import json
import os
import re
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
)

from auth import jwk_thumbprint
from relay.audit import (
    AuditWriteError,
    AuditWriter,
    ByteRecorder,
    bytes_audit_path,
    relay_audit_path,
    render_timeline,
    session_audit_path,
    verify_file,
)
from relay.audit_chain import build_record, compute_hash, encode_line, sign_hash
from relay.cli import build_parser
from relay.errors import RelayError

SID = "s-4f2a9c"
T0 = datetime(2026, 11, 22, 10, 0, 1, 123456, tzinfo=UTC)


class StepClock:
    """Wall clock for the writer: starts at T0, each reading 1.25 s later."""

    def __init__(self) -> None:
        self.now = T0 - timedelta(seconds=1.25)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1.25)
        return self.now


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_session(
    audit_dir: Path, key: Ed25519PrivateKey | None, *, record_bytes: bool = False
) -> Path:
    """A complete session file: 7 lines, header plus seq 1-6, signed end record."""
    path = session_audit_path(audit_dir, SID, T0)
    clock = StepClock()
    writer = AuditWriter.create(path, kind="session", session_id=SID, signing_key=key, clock=clock)
    writer.append("session.opened", user="alice", target="build42", peer="127.0.0.1:50000")
    writer.append("token.accepted", jti="tok-1", subject="alice")
    writer.append("backend.connected", backend="127.0.0.1:5005")
    writer.append("pump.stats", c2b=120, b2c=4096)
    writer.append("session.idle", seconds=30)
    extra: dict[str, object] = {}
    if record_bytes:
        recorder = ByteRecorder.create(
            bytes_audit_path(path), session_id=SID, max_bytes=1024, clock=clock
        )
        recorder.add("c2b", 0.5, b"$qSupported:multiprocess+#c9")
        recorder.add("b2c", 0.75, b"+$PacketSize=47ff;QStartNoAckMode+#8a")
        recorder.add("c2b", 1.0, b"$g#67")
        bytes_hash, bytes_records = recorder.close()
        extra = {"bytes_hash": bytes_hash, "bytes_records": bytes_records}
    writer.close_session(reason="eof", c2b=120, b2c=4096, **extra)
    writer.sync()
    writer.close()
    return path


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def put_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def rechain(lines: list[str], signing_key: Ed25519PrivateKey | None) -> list[str]:
    """What an attacker with write access but no audit key can do: recompute it all."""
    out: list[str] = []
    prev = None
    for line in lines:
        rec = json.loads(line)
        rec.pop("hash")
        had_sig = rec.pop("sig", None) is not None
        if rec.get("type") == "header":
            rec["key_id"] = jwk_thumbprint(signing_key.public_key()) if signing_key else None
        else:
            rec["prev"] = prev
        rec["hash"] = compute_hash(rec)
        if had_sig and signing_key is not None:
            rec["sig"] = sign_hash(signing_key, rec["hash"])
        prev = rec["hash"]
        out.append(json.dumps(rec, separators=(",", ":")))
    return out


# -- intact files ----------------------------------------------------------------------


def test_intact_session_file_verifies_with_and_without_pubkey(tmp_path, key):
    path = write_session(tmp_path, key)

    without = verify_file(path)
    assert without.ok and without.problems == []
    assert without.records == 7
    assert not without.signed and not without.truncated
    assert any("only the hash chain was checked" in n for n in without.notes)

    with_key = verify_file(path, pubkey=key.public_key())
    assert with_key.ok and with_key.signed
    assert with_key.problems == []
    assert with_key.kind == "session" and with_key.session_id == SID


def test_layout_header_and_record_fields(tmp_path, key):
    path = write_session(tmp_path, key)
    assert path == tmp_path / "2026-11-22" / f"{SID}.jsonl"
    header, first, *_, last = (json.loads(line) for line in lines_of(path))
    assert header["type"] == "header" and header["format"] == "dbgrelay-audit/1"
    assert header["kind"] == "session" and header["session_id"] == SID
    assert header["key_id"] == jwk_thumbprint(key.public_key())
    assert re.fullmatch(r"[0-9a-f]{32}", header["nonce"])
    assert header["seq"] == 0 and header["prev"] is None
    assert first["time"] == "2026-11-22T10:00:02.373456Z"
    assert (first["seq"], first["event"], first["prev"]) == (1, "session.opened", header["hash"])
    # The end record's signature is over its own hash, computed without "sig".
    assert last["event"] == "session.closed"
    assert last["hash"] == compute_hash({k: v for k, v in last.items() if k != "sig"})
    key.public_key().verify(base64.b64decode(last["sig"]), last["hash"].encode("ascii"))


def test_files_are_0600_and_new_dirs_0700(tmp_path, key):
    audit_dir = tmp_path / "audit"
    path = write_session(audit_dir, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(audit_dir).st_mode) == 0o700


# -- tampering --------------------------------------------------------------------------


def test_edited_field_is_caught_at_its_line(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    lines[1] = lines[1].replace('"user":"alice"', '"user":"mallory"')
    put_lines(path, lines)

    report = verify_file(path)
    assert not report.ok
    assert report.problems == ["line 2: hash mismatch (record edited)"]


def test_edited_line_with_its_hash_recomputed_breaks_the_next_link(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    rec = json.loads(lines[2])
    rec["subject"] = "root"
    rec["hash"] = compute_hash(rec)
    lines[2] = json.dumps(rec)
    put_lines(path, lines)

    assert verify_file(path).problems == [
        "line 4: prev does not match line 3 (lines reordered, deleted or inserted)"
    ]


def test_deleted_line_is_caught(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    del lines[3]  # seq 3
    put_lines(path, lines)

    report = verify_file(path, pubkey=key.public_key())
    assert not report.ok and not report.signed
    assert report.problems[0].startswith("line 4: seq 4 where 3 expected")
    assert "deleted" in report.problems[0]


def test_reordered_lines_are_caught(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    lines[2], lines[3] = lines[3], lines[2]
    put_lines(path, lines)

    report = verify_file(path)
    assert not report.ok
    assert report.problems[0] == (
        "line 3: seq 3 where 2 expected (line deleted or lines reordered)"
    )


def test_forged_line_inserted_is_caught(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    # A record that is valid on its own: right seq, prev and hash for line 3.
    before = json.loads(lines[2])
    forged = {
        "seq": before["seq"] + 1,
        "time": "2026-11-22T10:00:04.900000Z",
        "event": "token.accepted",
        "subject": "root",
        "prev": before["hash"],
    }
    forged["hash"] = compute_hash(forged)
    lines.insert(3, json.dumps(forged))
    put_lines(path, lines)

    report = verify_file(path)
    assert not report.ok
    # Line 4 (the forgery) chains onto line 3; the original line 5 no longer fits.
    assert report.problems == [
        "line 5: seq 3 where 4 expected (line inserted or lines reordered)",
    ]


def test_end_record_dropped_is_reported_truncated(tmp_path, key):
    path = write_session(tmp_path, key)
    put_lines(path, lines_of(path)[:-1])

    report = verify_file(path, pubkey=key.public_key())
    assert not report.ok and report.truncated
    assert "ends without a session.closed record (truncated)" in report.problems


def test_file_cut_mid_record_is_truncated(tmp_path, key):
    path = write_session(tmp_path, key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])

    report = verify_file(path)
    assert report.truncated and not report.ok
    assert report.problems[0] == (
        "line 7: not valid JSON (incomplete last line: file truncated mid-record)"
    )


def test_rewrite_with_fresh_chain_fails_only_with_pubkey(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    lines[1] = lines[1].replace('"user":"alice"', '"user":"mallory"')
    attacker = Ed25519PrivateKey.generate()
    put_lines(path, rechain(lines, attacker))

    assert verify_file(path).ok  # the chain alone cannot tell

    report = verify_file(path, pubkey=key.public_key())
    assert not report.ok and not report.signed
    assert report.problems == [
        "line 7: session.closed signature does not verify with the given key "
        "(file rewritten or wrong key)"
    ]
    assert any(jwk_thumbprint(attacker.public_key()) in note for note in report.notes)


def test_rewrite_that_drops_signatures_fails_with_pubkey(tmp_path, key):
    path = write_session(tmp_path, key)
    put_lines(path, rechain(lines_of(path), None))

    assert verify_file(path).ok

    report = verify_file(path, pubkey=key.public_key())
    assert not report.ok and not report.signed
    assert report.problems[0].startswith("line 7: session.closed record is not signed")
    assert "no signature to check: file has no signed record" in report.problems


def test_lines_appended_after_session_closed(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    last = json.loads(lines[-1])
    extra = {
        "seq": last["seq"] + 1,
        "time": "2026-11-22T11:00:00.000000Z",
        "event": "session.opened",
        "prev": last["hash"],
    }
    extra["hash"] = compute_hash(extra)
    put_lines(path, [*lines, json.dumps(extra)])

    report = verify_file(path, pubkey=key.public_key())
    assert report.problems == [
        "line 8: record after session.closed at line 7 (lines appended after the session ended)"
    ]


def test_duplicate_key_and_garbage_lines_are_named(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    lines[1] = lines[1].replace('"user":"alice"', '"user":"mallory","user":"alice"')
    lines[4] = "not json at all"
    put_lines(path, lines)

    problems = verify_file(path).problems
    assert problems[0] == "line 2: duplicate key 'user' (line edited)"
    assert "line 5: not valid JSON" in problems


def test_missing_header_and_renamed_file(tmp_path, key):
    path = write_session(tmp_path, key)
    renamed = path.with_name("other-session.jsonl")
    renamed.write_bytes(path.read_bytes())
    assert verify_file(renamed).problems == [
        "line 1: session_id 's-4f2a9c' does not match the file name 'other-session.jsonl' "
        "(file renamed or replaced)"
    ]

    put_lines(path, lines_of(path)[1:])
    assert verify_file(path).problems[0].startswith("line 1: not a header")


# -- signatures on checkpoints and the relay file ---------------------------------------


def test_relay_file_checkpoints_are_signed_and_verified(tmp_path, key):
    path = relay_audit_path(tmp_path, T0)
    assert path.name == "relay-2026-11-22.jsonl"
    writer = AuditWriter.open_append(path, signing_key=key, clock=StepClock())
    writer.append("relay.started", listen="127.0.0.1:8443")
    first = writer.checkpoint()
    # Nothing new since: no second checkpoint record.
    assert writer.checkpoint() == first
    writer.append("auth.rejected", peer="127.0.0.1:40000", reason="expired")
    writer.checkpoint()
    writer.append("relay.stopped", reason="sigterm")
    writer.close()

    records = [json.loads(line) for line in lines_of(path)]
    assert [r.get("event") for r in records] == [
        None,
        "relay.started",
        "audit.checkpoint",
        "auth.rejected",
        "audit.checkpoint",
        "relay.stopped",
    ]
    assert [("sig" in r) for r in records] == [False, False, True, False, True, True]
    report = verify_file(path, pubkey=key.public_key())
    assert report.ok and report.signed

    # Swap one checkpoint's signature for someone else's: the hash still matches
    # (it excludes "sig"), only the key check can tell.
    lines = lines_of(path)
    forged = json.loads(lines[2])
    forged["sig"] = sign_hash(Ed25519PrivateKey.generate(), forged["hash"])
    lines[2] = json.dumps(forged)
    put_lines(path, lines)
    assert verify_file(path).ok
    report = verify_file(path, pubkey=key.public_key())
    assert report.problems == [
        "line 3: audit.checkpoint signature does not verify with the given key "
        "(file rewritten or wrong key)"
    ]


def test_wrong_key_is_reported_with_both_key_ids(tmp_path, key):
    path = write_session(tmp_path, key)
    other = Ed25519PrivateKey.generate()
    report = verify_file(path, pubkey=other.public_key())
    assert not report.ok
    assert report.problems[0].startswith("line 7: session.closed signature does not verify")
    assert any(
        jwk_thumbprint(key.public_key()) in n and jwk_thumbprint(other.public_key()) in n
        for n in report.notes
    )


def test_unsigned_file_with_pubkey_has_no_signature_to_check(tmp_path, key):
    path = write_session(tmp_path, None)
    assert verify_file(path).ok
    report = verify_file(path, pubkey=key.public_key())
    assert "no signature to check: file has no signed record" in report.problems
    assert not report.signed


# -- the unsigned tail --------------------------------------------------------------------


def write_relay_file(audit_dir: Path, key: Ed25519PrivateKey) -> Path:
    """A relay file: 2 records, a checkpoint (line 4), then 5 unsigned records (lines 5-9)."""
    path = relay_audit_path(audit_dir, T0)
    writer = AuditWriter.open_append(path, signing_key=key, clock=StepClock())
    writer.append("relay.started", listen="127.0.0.1:8443")
    writer.append("token.accepted", sub="alice")
    writer.checkpoint()
    for n in range(5):
        writer.append("token.rejected", claimed_sub=f"user{n}", reason="expired")
    writer.close()
    return path


def test_relay_file_cut_after_a_checkpoint_fails_verify(tmp_path, key):
    # The attack: keep everything up to a signature plus a few lines, drop the rest.
    # The chain of what is left is intact; only the missing signature can tell.
    path = write_relay_file(tmp_path, key)
    put_lines(path, lines_of(path)[:6])

    report = verify_file(path, pubkey=key.public_key())

    assert not report.ok and not report.signed
    assert report.problems == [
        "lines 5-6 come after the last signature (line 4): the file may have been cut "
        "there; for the live file of a running relay pass --allow-unsigned-tail"
    ]
    assert report.signed_through == 4 and report.lines == 6


def test_unsigned_tail_is_accepted_only_when_asked_and_named_in_a_note(tmp_path, key):
    path = write_relay_file(tmp_path, key)

    report = verify_file(path, pubkey=key.public_key(), allow_unsigned_tail=True)

    assert report.ok and not report.signed and report.problems == []
    records = [json.loads(line) for line in lines_of(path)]
    assert report.notes == [
        f"lines 5-9 come after the last signature (line 4), written {records[4]['time']} "
        f"to {records[8]['time']}: only the hash chain covers them "
        "(accepted: --allow-unsigned-tail)"
    ]


def test_a_file_ending_in_a_signature_needs_no_flag(tmp_path, key):
    path = write_relay_file(tmp_path, key)
    put_lines(path, lines_of(path)[:4])

    report = verify_file(path, pubkey=key.public_key())

    assert report.ok and report.signed and report.notes == []


def test_live_session_file_passes_only_with_the_flag(tmp_path, key):
    path = write_session(tmp_path, key)
    put_lines(path, lines_of(path)[:-1])  # no session.closed yet

    assert not verify_file(path, pubkey=key.public_key()).ok
    report = verify_file(path, pubkey=key.public_key(), allow_unsigned_tail=True)

    assert report.ok and report.truncated
    assert any("no session.closed record" in n for n in report.notes)
    assert any(n.startswith("lines 1-6 come before any signature") for n in report.notes)


def test_the_flag_does_not_accept_a_file_naming_another_key(tmp_path, key):
    # Rewritten without the key, all unsigned, as if it were a live file.
    path = write_session(tmp_path, key)
    lines = rechain(lines_of(path)[:-1], None)
    put_lines(path, lines)

    report = verify_file(path, pubkey=key.public_key(), allow_unsigned_tail=True)

    assert not report.ok
    assert report.problems == [
        f"lines 1-6 are unsigned and the file names audit key_id None where the given "
        f"key's key_id is {jwk_thumbprint(key.public_key())}"
    ]


def test_sign_interval_signs_a_record_once_the_last_signature_is_that_old(tmp_path, key):
    # StepClock: 1.25 s between readings; header at T0.  With a 3 s interval the
    # record read at T0+3.75 s is the first due a signature, then T0+7.5 s.
    path = relay_audit_path(tmp_path, T0)
    writer = AuditWriter.create(
        path, kind="relay", session_id=None, signing_key=key, clock=StepClock(), sign_interval=3
    )
    for n in range(8):
        writer.append("token.rejected", n=n)
    writer.close()

    records = [json.loads(line) for line in lines_of(path)]
    assert [("sig" in r) for r in records[1:]] == [False, False, True, False, False, True] + [
        False,
        False,
    ]
    # Every unsigned record is less than 3 s younger than the signature before it.
    last_signed = datetime.fromisoformat(records[0]["created"])
    for record in records[1:]:
        moment = datetime.fromisoformat(record["time"])
        if "sig" in record:
            last_signed = moment
        else:
            assert (moment - last_signed).total_seconds() < 3
    report = verify_file(path, pubkey=key.public_key(), allow_unsigned_tail=True)
    assert report.ok and report.signed_through == 7


# -- open_append ------------------------------------------------------------------------


def test_open_append_continues_a_chain_that_verifies(tmp_path, key):
    path = relay_audit_path(tmp_path, T0)
    for run in range(3):
        writer = AuditWriter.open_append(path, signing_key=key)
        writer.append("relay.started", run=run)
        writer.append("relay.stopped", run=run)
        writer.close()

    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == list(range(9))
    assert [r.get("event") for r in records].count("audit.reopened") == 2
    assert verify_file(path, pubkey=key.public_key()).ok
    assert not list(tmp_path.glob("relay-2026-11-22.*.jsonl"))


def test_open_append_starts_a_new_file_after_damage(tmp_path, key):
    path = relay_audit_path(tmp_path, T0)
    writer = AuditWriter.open_append(path, signing_key=key)
    writer.append("relay.started")
    writer.close()
    damaged = path.read_bytes() + b'{"seq":2,"time":"2026-11-22T1'
    path.write_bytes(damaged)  # relay killed mid-write

    writer = AuditWriter.open_append(path, signing_key=key)
    writer.append("relay.started")
    writer.close()

    assert path.read_bytes() == damaged  # never touched again
    new = tmp_path / "relay-2026-11-22.1.jsonl"
    note = json.loads(lines_of(new)[1])
    assert note["event"] == "audit.previous_damaged"
    assert note["file"] == path.name and "incomplete" in note["problem"]

    # The next restart continues the new file rather than starting a third.
    writer = AuditWriter.open_append(path, signing_key=key)
    writer.append("relay.stopped")
    writer.close()
    assert not (tmp_path / "relay-2026-11-22.2.jsonl").exists()
    assert verify_file(new, pubkey=key.public_key()).ok


def test_open_append_refuses_to_continue_an_edited_tail(tmp_path, key):
    path = relay_audit_path(tmp_path, T0)
    writer = AuditWriter.open_append(path, signing_key=key)
    writer.append("auth.rejected", peer="127.0.0.1:1")
    writer.close()
    put_lines(path, [line.replace("127.0.0.1:1", "127.0.0.1:2") for line in lines_of(path)])

    AuditWriter.open_append(path, signing_key=key).close()
    note = json.loads(lines_of(tmp_path / "relay-2026-11-22.1.jsonl")[1])
    assert note["event"] == "audit.previous_damaged"
    assert "hash mismatch" in note["problem"]


def test_second_writer_on_the_same_file_is_refused(tmp_path, key):
    path = relay_audit_path(tmp_path, T0)
    writer = AuditWriter.open_append(path, signing_key=key)
    with pytest.raises(AuditWriteError) as info:
        AuditWriter.open_append(path, signing_key=key)
    assert info.value.reason == "audit_locked"
    assert str(path) in str(info.value)
    writer.close()


# -- byte recording ---------------------------------------------------------------------


def test_bytes_round_trip_and_are_covered_by_the_session_signature(tmp_path, key):
    path = write_session(tmp_path, key, record_bytes=True)
    bpath = bytes_audit_path(path)
    assert bpath.name == f"{SID}.bytes.jsonl"
    records = [json.loads(line) for line in lines_of(bpath)]
    assert records[0]["kind"] == "bytes" and records[0]["session_id"] == SID
    assert [(r["dir"], r["t"], base64.b64decode(r["data"])) for r in records[1:]] == [
        ("c2b", 0.5, b"$qSupported:multiprocess+#c9"),
        ("b2c", 0.75, b"+$PacketSize=47ff;QStartNoAckMode+#8a"),
        ("c2b", 1.0, b"$g#67"),
    ]
    end = json.loads(lines_of(path)[-1])
    assert end["bytes_hash"] == records[-1]["hash"] and end["bytes_records"] == 3
    assert stat.S_IMODE(os.stat(bpath).st_mode) == 0o600
    assert verify_file(path, pubkey=key.public_key()).signed


def test_bytes_cap_stores_up_to_max_then_one_marker(tmp_path):
    bpath = tmp_path / f"{SID}.bytes.jsonl"
    recorder = ByteRecorder.create(bpath, session_id=SID, max_bytes=10)
    recorder.add("c2b", 0.0, b"0123456")
    recorder.add("b2c", 0.1, b"abcdefgh")  # only "abc" fits
    recorder.add("c2b", 0.2, b"dropped")
    recorder.add("b2c", 0.3, b"dropped too")
    last_hash, count = recorder.close()

    records = [json.loads(line) for line in lines_of(bpath)][1:]
    assert [r["event"] for r in records] == ["bytes", "bytes", "bytes.truncated"]
    payload = b"".join(base64.b64decode(r["data"]) for r in records[:2])
    assert payload == b"0123456abc"
    assert recorder.captured == 10 and recorder.truncated
    assert (last_hash, count) == (records[-1]["hash"], 3)
    assert verify_file(bpath).ok


def test_edited_bytes_file_is_caught_from_the_session_file(tmp_path, key):
    path = write_session(tmp_path, key, record_bytes=True)
    bpath = bytes_audit_path(path)
    lines = lines_of(bpath)
    rec = json.loads(lines[3])
    rec["data"] = base64.b64encode(b"$G00ff#00").decode()
    lines[3] = json.dumps(rec)
    put_lines(bpath, lines)

    report = verify_file(path, pubkey=key.public_key())
    assert not report.ok and not report.signed
    assert report.problems == [f"bytes file {bpath.name}: line 4: hash mismatch (record edited)"]


def test_bytes_file_rechained_truncated_or_missing_is_caught(tmp_path, key):
    path = write_session(tmp_path, key, record_bytes=True)
    bpath = bytes_audit_path(path)
    original = lines_of(bpath)

    put_lines(bpath, rechain(original[:-1], None))  # last chunk removed, chain redone
    assert verify_file(bpath).ok
    assert verify_file(path).problems == [
        f"bytes file {bpath.name}: last hash does not match bytes_hash in session.closed "
        "at line 7 (bytes file edited, truncated or replaced)"
    ]

    bpath.unlink()
    assert verify_file(path).problems == [
        f"bytes file {bpath.name} is missing (session.closed at line 7 records bytes_hash)"
    ]


# -- reading back -----------------------------------------------------------------------


def test_render_timeline_lists_events_in_order(tmp_path, key):
    path = write_session(tmp_path, key)
    text = render_timeline(path)
    lines = text.splitlines()
    assert lines[0].startswith(f"# {SID}.jsonl: session audit file")
    assert lines[1] == (
        "2026-11-22T10:00:02.373Z  +0.000s  session.opened  "
        "user=alice target=build42 peer=127.0.0.1:50000"
    )
    events = [line.split("  ")[2] for line in lines[1:]]
    assert events == [
        "session.opened",
        "token.accepted",
        "backend.connected",
        "pump.stats",
        "session.idle",
        "session.closed",
    ]
    assert lines[-1].startswith("2026-11-22T10:00:08.623Z  +6.250s  session.closed  reason=eof")
    assert lines[-1].endswith("[signed]")
    assert "WARNING" not in text


def test_render_timeline_warns_about_a_broken_chain(tmp_path, key):
    path = write_session(tmp_path, key)
    lines = lines_of(path)
    lines[2] = lines[2].replace("tok-1", "tok-2")
    put_lines(path, lines)
    assert render_timeline(path).splitlines()[0] == (
        "# WARNING: line 3: hash mismatch (record edited)"
    )


def test_render_timeline_hex_dump(tmp_path, key):
    path = write_session(tmp_path, key, record_bytes=True)
    text = render_timeline(path, show_bytes=True)
    dump = text.split(f"# bytes recorded in {SID}.bytes.jsonl\n", 1)[1].splitlines()
    assert dump == [
        "+0.500s  c2b ->  28 bytes",
        "  -> 00000000  24 71 53 75 70 70 6f 72  74 65 64 3a 6d 75 6c 74  |$qSupported:mult|",
        "  -> 00000010  69 70 72 6f 63 65 73 73  2b 23 63 39              |iprocess+#c9|",
        "+0.750s  b2c <-  37 bytes",
        "  <- 00000000  2b 24 50 61 63 6b 65 74  53 69 7a 65 3d 34 37 66  |+$PacketSize=47f|",
        "  <- 00000010  66 3b 51 53 74 61 72 74  4e 6f 41 63 6b 4d 6f 64  |f;QStartNoAckMod|",
        "  <- 00000020  65 2b 23 38 61                                    |e+#8a|",
        "+1.000s  c2b ->  5 bytes",
        # The offset continues the client-to-backend stream after its 28 bytes.
        "  -> 0000001c  24 67 23 36 37                                    |$g#67|",
    ]
    # The ASCII column lines up whatever the row length.
    assert len({row.index("|") for row in dump if row.startswith("  ")}) == 1
    assert "# no bytes recorded" in render_timeline(
        write_session(tmp_path / "b", key), show_bytes=True
    )


# -- writer errors and edge cases -------------------------------------------------------


def test_unwritable_directory_raises_audit_write_error(tmp_path, key):
    blocker = tmp_path / "audit"
    blocker.write_text("a file where audit_dir should be\n")
    path = session_audit_path(blocker, SID, T0)
    with pytest.raises(AuditWriteError) as info:
        AuditWriter.create(path, kind="session", session_id=SID, signing_key=key)
    err = info.value
    assert isinstance(err, RelayError) and err.reason == "audit_unwritable"
    message = str(err)
    assert "\n" not in message
    assert str(path) in message and "Not a directory" in message


def test_existing_file_is_never_overwritten(tmp_path, key):
    path = write_session(tmp_path, key)
    before = path.read_bytes()
    with pytest.raises(AuditWriteError, match="already exists"):
        AuditWriter.create(path, kind="session", session_id=SID, signing_key=key)
    assert path.read_bytes() == before


def test_append_rejects_unserialisable_and_reserved_fields(tmp_path, key):
    path = session_audit_path(tmp_path, SID, T0)
    with AuditWriter.create(path, kind="session", session_id=SID, signing_key=key) as writer:
        with pytest.raises(TypeError, match="field 'peer' is not JSON-serialisable"):
            writer.append("session.opened", peer=object())
        with pytest.raises(TypeError, match="field 'ratio'"):
            writer.append("pump.stats", ratio=float("nan"))
        with pytest.raises(ValueError, match="field 'seq' is reserved"):
            writer.append("session.opened", seq=5)
        with pytest.raises(ValueError, match="close_session"):
            writer.append("session.closed")
        # Nothing half-written: the chain is intact after the refusals.
        rec = writer.append("session.opened", ports=(1, 2), counts={1: "a"})
        assert rec["ports"] == [1, 2] and rec["counts"] == {"1": "a"}
        writer.close_session(reason="eof")
        with pytest.raises(ValueError, match="already ends with session.closed"):
            writer.append("pump.stats")
    assert verify_file(path, pubkey=key.public_key()).ok


class _Level(enum.IntEnum):
    HIGH = 2


def test_every_field_is_recorded_as_a_reader_parses_it_back():
    values = [
        "plain", "ünïcode ✓", "", 0, -7, 2**70, True, False, None, 1.5, -0.0, 1e300,
        (1, "a"), [1, [2, 3]], {"b": 1, "a": (2,)}, {1: "one"}, _Level.HIGH,
    ]  # fmt: skip
    fields = {f"f{i}": value for i, value in enumerate(values)}
    record = build_record(seq=1, prev="0" * 64, time="t", event="e", fields=fields)
    for name, value in fields.items():
        expected = json.loads(json.dumps(value, sort_keys=True, ensure_ascii=False))
        assert record[name] == expected and type(record[name]) is type(expected), name
    # What is written is what a reader finds, and what the hash covers.
    line = json.loads(encode_line(record))
    assert line == record and compute_hash(line) == record["hash"]


def test_text_that_is_not_unicode_and_numbers_json_refuses_are_refused_by_name():
    with pytest.raises(TypeError, match="field 'who' is not JSON-serialisable"):
        build_record(seq=1, prev="0" * 64, time="t", event="e", fields={"who": "a\udc80"})
    with pytest.raises(TypeError, match="field 'n' is not JSON-serialisable"):
        build_record(seq=1, prev="0" * 64, time="t", event="e", fields={"n": 10**5000})


def test_sync_in_a_thread_while_appending_keeps_the_chain(tmp_path, key):
    path = session_audit_path(tmp_path, SID, T0)
    writer = AuditWriter.create(path, kind="session", session_id=SID, signing_key=key)
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            writer.sync()

    thread = threading.Thread(target=syncer)
    thread.start()
    try:
        for i in range(3000):
            writer.append("pump.stats", i=i, pad="x" * 200)
    finally:
        stop.set()
        thread.join()
    writer.close_session(reason="eof")
    writer.close()
    report = verify_file(path, pubkey=key.public_key())
    assert report.ok and report.records == 3002


def test_paths_reject_unsafe_session_ids_and_naive_times(tmp_path):
    with pytest.raises(ValueError, match="session id"):
        session_audit_path(tmp_path, "../etc/passwd", T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        relay_audit_path(tmp_path, datetime(2026, 11, 22))
    assert (
        session_audit_path(
            tmp_path, SID, datetime(2026, 11, 22, 23, 30, tzinfo=UTC) + timedelta(hours=1)
        ).parent.name
        == "2026-11-23"
    )


def test_reopening_a_file_a_dead_relay_left_unsigned_signs_at_once(tmp_path, key):
    path = relay_audit_path(tmp_path, T0)
    writer = AuditWriter.open_append(path, signing_key=key, clock=StepClock(), sign_interval=3600)
    writer.append("token.rejected", n=0)
    writer.close()  # the relay died: no checkpoint, no relay.stopped

    writer = AuditWriter.open_append(path, signing_key=key, clock=StepClock(), sign_interval=3600)
    writer.append("relay.started")
    writer.close()

    records = [json.loads(line) for line in lines_of(path)]
    assert [(r.get("event"), "sig" in r) for r in records[1:]] == [
        ("token.rejected", False),
        ("audit.reopened", True),
        ("relay.started", False),
    ]


def test_verify_cli_on_a_new_live_file_with_no_signature_yet(tmp_path, key, capsys):
    path = relay_audit_path(tmp_path, T0)
    writer = AuditWriter.open_append(path, signing_key=key, clock=StepClock())
    writer.append("relay.started")
    writer.close()
    pub = tmp_path / "audit.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))

    for flag, code in (([], 1), (["--allow-unsigned-tail"], 0)):
        args = build_parser().parse_args(
            ["audit", "verify", "--pubkey", str(pub), *flag, str(path)]
        )
        assert args.func(args) == code
        out = capsys.readouterr().out.splitlines()
        if code:
            assert out == [f"{path}: no signature to check: file has no signed record"]
        else:
            assert out[0] == (
                f"{path}: ok, 2 records, no signature yet; 2 unsigned line(s) accepted "
                "(--allow-unsigned-tail)"
            )
            assert out[1].startswith(f"{path}: note: lines 1-2 come before any signature")
