"""``dbgrelay audit verify`` and ``audit show`` on the files a real session wrote.

One real session (``dbgrelay serve`` launching gdbserver, ``dbgrelay
connect``, a debugger speaking the GDB remote protocol) writes the audit
files once per module; each test tampers with its own copy and runs the CLI
as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.audit_chain import compute_hash

from .support import ProcGroup, config_text, copy_materials, run_cli, start_relay
from .test_audit_crash import tunnel
from .test_lifecycle import GDBSERVER, SLEEP, _connector, _debugger

pytestmark = pytest.mark.skipif(GDBSERVER is None, reason="needs gdbserver installed")


@dataclass(frozen=True, slots=True)
class Written:
    """What the module's one real session left behind."""

    home: Path
    session: Path
    relay: Path
    session_id: str

    @property
    def pubkey(self) -> Path:
        return self.home / "keys" / "audit.pub"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, materials: Path) -> Written:
    home = tmp_path_factory.mktemp("relay")
    copy_materials(materials, home)
    text = config_text(
        [
            {
                "name": "build42",
                "kind": "gdbserver",
                "backend": "tcp://127.0.0.1:{port}",
                "launch": [GDBSERVER, "--once", "127.0.0.1:{port}", SLEEP, "1000"],
            }
        ]
    )
    # No scheduled signature within the run: which records are signed (the
    # session's end, the session end's relay checkpoint, relay.stopped) does
    # not depend on how fast this machine is.
    text = text.replace("[relay]\n", '[relay]\ncheckpoint_interval = "1h"\n', 1)
    (home / "dbgrelay.toml").write_text(text)
    procs = ProcGroup()
    try:
        relay, relay_addr = start_relay(procs, home)
        _debugger(_connector(procs, home, relay_addr)).close()
        closed = relay.wait_event("session.closed", target="build42")
        relay.wait_event("server.exited", target="build42")
        for n in range(3):  # unsigned relay records until relay.stopped signs them
            refused = tunnel(home, relay_addr, f"not-a-token-{n}", target="build42")
            assert refused.status == b"401"
            refused.close()
        relay.send_signal(signal.SIGTERM)
        assert relay.wait() == 0, relay.output()
    finally:
        procs.close()
    session_id = closed["session_id"]
    (session,) = (home / "state" / "audit").glob(f"*/{session_id}.jsonl")
    (relay_file,) = (home / "state" / "audit").glob("relay-*.jsonl")
    return Written(home=home, session=session, relay=relay_file, session_id=session_id)


@pytest.fixture
def copy(written: Written, tmp_path: Path) -> Callable[[], Path]:
    """A private copy of the session file, under its own name (verify checks the name)."""

    def make() -> Path:
        path = tmp_path / written.session.name
        shutil.copyfile(written.session, path)
        return path

    return make


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def verify(written: Written, *paths: Path, pubkey: bool = True):
    args = ["audit", "verify", *map(str, paths)]
    if pubkey:
        args += ["--pubkey", str(written.pubkey)]
    return run_cli(*args, cwd=written.home)


def test_a_full_session_records_its_events_in_order(written: Written) -> None:
    records = [json.loads(line) for line in lines_of(written.session)]
    # A session longer than checkpoint_interval also holds signed checkpoints.
    records = [r for r in records if r.get("event") != "audit.checkpoint"]

    assert records[0]["type"] == "header" and records[0]["session_id"] == written.session_id
    assert [r["event"] for r in records[1:]] == [
        "session.opened",
        "backend.launched",
        "backend.connected",
        "session.closed",
    ]
    opened, launched, connected, closed = records[1:]
    assert opened["user"] == "alice" and opened["target"] == "build42"
    assert connected["backend"] == f"tcp://127.0.0.1:{launched['port']}"
    assert closed["bytes_to_backend"] > 0 and closed["bytes_to_client"] > 0
    relay_events = [json.loads(line).get("event") for line in lines_of(written.relay)]
    for before, after in [
        ("relay.started", "token.accepted"),
        ("token.accepted", "server.launched"),
        ("server.launched", "server.exited"),
        ("server.exited", "relay.stopped"),
    ]:
        assert relay_events.index(before) < relay_events.index(after), relay_events


def test_intact_files_verify_with_the_pubkey(written: Written) -> None:
    done = verify(written, written.session, written.relay)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"{written.session}: ok, {len(lines_of(written.session))} records, signature ok",
        f"{written.relay}: ok, {len(lines_of(written.relay))} records, signature ok",
    ]


def test_audit_show_prints_a_readable_timeline(written: Written) -> None:
    done = run_cli("audit", "show", written.session, cwd=written.home)

    assert done.returncode == 0, done.stderr
    header, *timeline = done.stdout.splitlines()
    timeline = [line for line in timeline if " audit.checkpoint " not in line]
    assert header.startswith(f"# {written.session.name}: session audit file")
    assert [line.split()[2] for line in timeline] == [
        "session.opened",
        "backend.launched",
        "backend.connected",
        "session.closed",
    ]
    assert timeline[0].split()[1] == "+0.000s"
    assert "user=alice" in timeline[0] and "target=build42" in timeline[0]
    assert timeline[-1].endswith("[signed]")


def test_an_edited_line_fails_verify_naming_it(written: Written, copy) -> None:
    path = copy()
    lines = lines_of(path)
    lines[2] = lines[2].replace('"pid":', '"pid":1', 1)  # backend.launched, another pid
    write_lines(path, lines)

    done = verify(written, path)

    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == f"{path}: line 3: hash mismatch (record edited)"


def test_a_deleted_line_fails_verify_naming_where(written: Written, copy) -> None:
    path = copy()
    lines = lines_of(path)
    del lines[2]
    write_lines(path, lines)

    done = verify(written, path)

    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == (
        f"{path}: line 3: seq 3 where 2 expected (line deleted or lines reordered)"
    )


def test_reordered_lines_fail_verify_naming_where(written: Written, copy) -> None:
    path = copy()
    lines = lines_of(path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(path, lines)

    done = verify(written, path)

    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == (
        f"{path}: line 3: seq 3 where 2 expected (line deleted or lines reordered)"
    )


def test_an_inserted_line_fails_verify_naming_it(written: Written, copy) -> None:
    path = copy()
    lines = lines_of(path)
    forged = json.loads(lines[3]) | {"backend": "tcp://10.0.0.66:1234"}
    lines.insert(2, json.dumps(forged, separators=(",", ":")))
    write_lines(path, lines)

    done = verify(written, path)

    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith(f"{path}: line 3: ")


def test_a_file_without_its_end_record_is_reported_truncated(written: Written, copy) -> None:
    path = copy()
    write_lines(path, lines_of(path)[:-1])

    done = verify(written, path)

    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == (
        f"{path}: ends without a session.closed record (truncated)"
    )


def test_a_file_cut_mid_line_is_reported_truncated(written: Written, copy) -> None:
    path = copy()
    text = path.read_text()
    path.write_text(text[: len(text) - 40])

    done = verify(written, path)

    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == (
        f"{path}: line 5: not valid JSON (incomplete last line: file truncated mid-record)"
    )


@pytest.mark.parametrize("signature", ["kept", "dropped"])
def test_a_file_rewritten_with_a_fresh_chain_fails_only_with_the_pubkey(
    written: Written, copy, signature: str
) -> None:
    # Someone with write access changes the user and recomputes every hash.
    path = copy()
    records = [json.loads(line) for line in lines_of(path)]
    records[1]["user"] = "mallory"
    prev = None
    for record in records:
        if prev is not None:
            record["prev"] = prev
        if signature == "dropped":
            record.pop("sig", None)
        record["hash"] = compute_hash(record)
        prev = record["hash"]
    write_lines(path, [json.dumps(r, separators=(",", ":")) for r in records])

    chain_only = verify(written, path, pubkey=False)
    signed = verify(written, path)

    assert chain_only.returncode == 0, chain_only.stdout
    assert "chain ok (no --pubkey: signatures not checked)" in chain_only.stdout
    assert signed.returncode == 1
    problem = {
        "kept": "line 5: session.closed signature does not verify with the given key",
        "dropped": "line 5: session.closed record is not signed",
    }[signature]
    assert signed.stdout.splitlines()[0].startswith(f"{path}: {problem}")


def test_only_the_tampered_file_of_several_is_named(written: Written, copy) -> None:
    path = copy()
    lines = lines_of(path)
    del lines[1]
    write_lines(path, lines)

    done = verify(written, written.relay, path)

    assert done.returncode == 1
    out = done.stdout.splitlines()
    assert out[0].startswith(f"{written.relay}: ok,")
    assert all(line.startswith(f"{path}: ") for line in out[1:]) and len(out) > 1


@pytest.mark.parametrize("command", ["verify", "show"])
def test_a_missing_file_is_a_one_line_error(written: Written, tmp_path: Path, command) -> None:
    missing = tmp_path / "2026-11-22" / "nosuchsession.jsonl"

    done = run_cli("audit", command, missing, cwd=written.home)

    assert done.returncode == 2
    assert (
        done.stderr
        == f"dbgrelay: audit {command}: cannot read {missing}: No such file or directory\n"
    )
    assert done.stdout == ""


def _cut_after_a_signature(source: Path, dest: Path) -> tuple[int, int]:
    """Copy ``source`` up to its first signed record plus the unsigned lines after it.

    In the module's relay file that is the checkpoint at the session's end,
    then (server.exited and) the three refused tunnels; relay.stopped goes.

    Returns:
        The signed line's number and the number of lines kept.
    """
    lines = lines_of(source)
    signed = [i for i, line in enumerate(lines) if "sig" in json.loads(line)]
    first = signed[0]
    end = first + 1
    while end < len(lines) and "sig" not in json.loads(lines[end]):
        end += 1
    assert end >= first + 4 and end < len(lines), lines
    write_lines(dest, lines[:end])
    return first + 1, end


def test_a_relay_file_cut_after_a_signature_fails_verify_in_one_line(
    written: Written, tmp_path: Path
) -> None:
    # Everything after the lines kept is gone, and the chain of what is left is
    # intact: only the missing signature at the end can tell.
    path = tmp_path / written.relay.name
    signed, kept = _cut_after_a_signature(written.relay, path)

    done = verify(written, path)

    assert done.returncode == 1
    span = f"line {kept}" if kept == signed + 1 else f"lines {signed + 1}-{kept}"
    verb = "comes" if kept == signed + 1 else "come"
    assert done.stdout.splitlines() == [
        f"{path}: {span} {verb} after the last signature (line {signed}): the file may have "
        "been cut there; for the live file of a running relay pass --allow-unsigned-tail"
    ]


def test_allow_unsigned_tail_accepts_the_tail_and_prints_the_notes(
    written: Written, tmp_path: Path
) -> None:
    path = tmp_path / written.relay.name
    signed, kept = _cut_after_a_signature(written.relay, path)

    done = run_cli(
        "audit",
        "verify",
        "--pubkey",
        written.pubkey,
        "--allow-unsigned-tail",
        path,
        cwd=written.home,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[0] == (
        f"{path}: ok, {kept} records, signature ok through line {signed}; "
        f"{kept - signed} unsigned line(s) after it accepted (--allow-unsigned-tail)"
    )
    assert len(out) == 2 and out[1].startswith(f"{path}: note: ")
    assert "after the last signature" in out[1] and "(accepted: --allow-unsigned-tail)" in out[1]


def test_every_note_is_printed(written: Written) -> None:
    done = verify(written, written.session, pubkey=False)

    assert done.returncode == 0
    assert done.stdout.splitlines()[1] == (
        f"{written.session}: note: signatures not checked (no public key given): only the hash "
        "chain was checked, which cannot detect a file rewritten with a freshly computed chain"
    )
