"""``record = true``: the raw tunnel bytes, size-capped, covered by the signed chain.

A real relay on loopback tunnels to a real echo server; the checks go
through the ``dbgrelay audit`` commands as the CLI parses them.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import trio

from relay.cli import build_parser
from relay.connector import open_tunnel

from .conftest import start_echo, start_relay

SENT = b"$qSupported:multiprocess+#c6\x00\x01\xfe\xffhello relay"


def target(port: int, **extra) -> dict:
    return {
        "name": "build42",
        "kind": "gdbserver",
        "backend": f"tcp://127.0.0.1:{port}",
        "probe_interval": "0",
        "record": True,
    } | extra


def audit_cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``dbgrelay audit ARGS...`` in-process; return its exit code and stdout."""
    parsed = build_parser().parse_args(["audit", *args])
    code = parsed.func(parsed)
    return code, capsys.readouterr().out


async def recorded_session(nursery, make_config, token_for, pki, payload: bytes, **extra) -> Path:
    """Tunnel ``payload`` to an echo server and back; return the session's audit file."""
    backend = await start_echo(nursery)
    config = make_config([target(backend.port, **extra)])
    running = await start_relay(nursery, config, pki)
    tls, session_id, _ = await open_tunnel(running.settings(token_for()))
    await tls.send_all(payload)
    echoed = b""
    with trio.fail_after(10):
        while len(echoed) < len(payload):
            echoed += await tls.receive_some(65536)
    assert echoed == payload
    await tls.aclose()
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    running.stop.set()
    (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    return path


def bytes_file(session: Path) -> Path:
    return session.with_name(session.name.removesuffix(".jsonl") + ".bytes.jsonl")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_recorded_bytes_sit_beside_the_audit_file_owner_only(
    nursery, make_config, token_for, pki
):
    session = await recorded_session(nursery, make_config, token_for, pki, SENT)

    recorded = bytes_file(session)
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    chunks = [r for r in records(recorded) if r.get("event") == "bytes"]
    c2b = b"".join(base64.b64decode(r["data"]) for r in chunks if r["dir"] == "c2b")
    b2c = b"".join(base64.b64decode(r["data"]) for r in chunks if r["dir"] == "b2c")
    assert c2b == SENT and b2c == SENT  # what the client sent, and the echo
    assert all(isinstance(r["t"], float) and r["t"] >= 0 for r in chunks)
    closed = records(session)[-1]
    assert closed["event"] == "session.closed" and "sig" in closed
    assert closed["bytes_records"] == len(chunks)
    assert closed["bytes_hash"] == records(recorded)[-1]["hash"]


async def test_audit_verify_with_the_pubkey_accepts_a_recorded_session(
    nursery, make_config, token_for, pki, keydir, capsys
):
    session = await recorded_session(nursery, make_config, token_for, pki, SENT)

    code, out = audit_cli(capsys, "verify", "--pubkey", str(keydir / "audit.pub"), str(session))

    assert code == 0, out
    assert out.strip().endswith("signature ok")


async def test_editing_a_recorded_byte_fails_verify(
    nursery, make_config, token_for, pki, keydir, capsys
):
    session = await recorded_session(nursery, make_config, token_for, pki, SENT)
    recorded = bytes_file(session)
    lines = recorded.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if '"c2b"' in line)
    record = json.loads(lines[n])
    data = bytearray(base64.b64decode(record["data"]))
    data[0] ^= 0x01  # one bit of what the debugger sent
    record["data"] = base64.b64encode(bytes(data)).decode()
    lines[n] = json.dumps(record, separators=(",", ":"))
    recorded.write_text("\n".join(lines) + "\n")

    code, out = audit_cli(capsys, "verify", "--pubkey", str(keydir / "audit.pub"), str(session))

    assert code == 1
    assert f"bytes file {recorded.name}: line {n + 1}: hash mismatch (record edited)" in out


async def test_deleting_the_bytes_file_fails_verify(
    nursery, make_config, token_for, pki, keydir, capsys
):
    session = await recorded_session(nursery, make_config, token_for, pki, SENT)
    bytes_file(session).unlink()

    code, out = audit_cli(capsys, "verify", "--pubkey", str(keydir / "audit.pub"), str(session))

    assert code == 1
    assert f"bytes file {bytes_file(session).name} is missing" in out


async def test_audit_show_bytes_prints_a_hex_dump_of_what_was_sent(
    nursery, make_config, token_for, pki, capsys
):
    session = await recorded_session(nursery, make_config, token_for, pki, SENT)

    code, out = audit_cli(capsys, "show", "--bytes", str(session))

    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("  -> ")]
    # "$qSupported:mult" "iprocess+#c6\0\1\xfe\xff" "hello relay"
    assert rows[0] == (
        "  -> 00000000  24 71 53 75 70 70 6f 72  74 65 64 3a 6d 75 6c 74  |$qSupported:mult|"
    )
    hexed = " ".join(f"{b:02x}" for b in SENT)
    dumped = " ".join(line[14:63].replace("  ", " ").strip() for line in rows)
    assert dumped.split() == hexed.split()
    assert any(line.startswith("  <- 00000000  24 71 53 75") for line in out.splitlines())
    assert "session.closed" in out and "[signed]" in out


async def test_recording_stops_at_record_max_bytes_and_still_verifies(
    nursery, make_config, token_for, pki, keydir, capsys
):
    cap = 10
    session = await recorded_session(
        nursery, make_config, token_for, pki, SENT, record_max_bytes=cap
    )
    recorded = records(bytes_file(session))

    chunks = [r for r in recorded if r.get("event") == "bytes"]
    assert sum(len(base64.b64decode(r["data"])) for r in chunks) == cap
    assert b"".join(base64.b64decode(r["data"]) for r in chunks) == SENT[:cap]
    assert [r["max_bytes"] for r in recorded if r.get("event") == "bytes.truncated"] == [cap]
    code, out = audit_cli(capsys, "verify", "--pubkey", str(keydir / "audit.pub"), str(session))
    assert code == 0, out
