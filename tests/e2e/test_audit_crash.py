"""A relay killed with SIGKILL mid-run leaves audit files whose unsigned tail is bounded.

The relay signs every audit file at most ``checkpoint_interval`` after a
record, and signs a record itself once the last signature is that old.  A
real ``dbgrelay serve`` with a live tunnel and a stream of refused tunnels is
killed; its files verify with ``--allow-unsigned-tail`` (and the notes name
the unsigned lines), and the times in the files show that no unsigned record
is ``checkpoint_interval`` or more younger than the signature before it.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from datetime import datetime
from pathlib import Path

from .support import READY_TIMEOUT, ProcGroup, config_text, run_cli, start_relay
from .test_lifecycle import _token_file

INTERVAL = 1.0


def open_tls(home: Path, relay_addr: str) -> ssl.SSLSocket:
    host, port = relay_addr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(home / "pki" / "ca.pem"))
    raw = socket.create_connection((host, int(port)), timeout=READY_TIMEOUT)
    return context.wrap_socket(raw, server_hostname=host)


def tunnel(home: Path, relay_addr: str, token: str, target: str = "echo") -> ssl.SSLSocket:
    """Send CONNECT with ``token``; return the socket once the status line is read."""
    tls = open_tls(home, relay_addr)
    tls.sendall(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = tls.recv(4096)
        if not data:
            break
        head += data
    tls.status = head.split(b" ", 2)[1] if head else b""  # type: ignore[attr-defined]
    return tls


def records_of(path: Path) -> list[dict]:
    # The last line may be cut by the kill: only complete lines are records.
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n")[:-1]]


def moment(record: dict) -> datetime:
    return datetime.fromisoformat(record.get("time") or record["created"])


def checkpoints(path: Path) -> int:
    return sum(r.get("event") == "audit.checkpoint" and "sig" in r for r in records_of(path))


def test_sigkill_mid_run_leaves_files_that_verify_with_a_bounded_unsigned_tail(
    procs: ProcGroup, home: Path, echo_port: int
) -> None:
    text = config_text([{"name": "echo", "kind": "tcp", "backend": f"tcp://127.0.0.1:{echo_port}"}])
    text = text.replace("[relay]\n", f'[relay]\ncheckpoint_interval = "{INTERVAL}s"\n', 1)
    # The refused tunnels below are the audit load, not an attack to throttle.
    text += "\n[limits]\nauth_failure_burst = 100000\nhandshake_burst = 100000\n"
    (home / "dbgrelay.toml").write_text(text)
    relay, relay_addr = start_relay(procs, home)
    token = _token_file(home, "echo").read_text()

    live = tunnel(home, relay_addr, token)
    assert live.status == b"200", relay.output()
    session_id = relay.wait_event("session.opened")["session_id"]
    live.sendall(b"ping")
    assert live.recv(4) == b"ping"
    (relay_file,) = (home / "state" / "audit").glob("relay-*.jsonl")
    (session_file,) = (home / "state" / "audit").glob(f"*/{session_id}.jsonl")

    # Refused tunnels keep the relay file growing until the relay has signed it
    # on its own, twice, and the live session's file once.
    deadline = time.monotonic() + 10 * READY_TIMEOUT
    n = 0
    while checkpoints(relay_file) < 2 or checkpoints(session_file) < 1:
        assert time.monotonic() < deadline, relay.output()
        refused = tunnel(home, relay_addr, f"not-a-token-{n}")
        assert refused.status == b"401"
        refused.close()
        n += 1
    for n in range(3):  # and a few more records after that
        tunnel(home, relay_addr, f"late-{n}").close()

    relay.popen.kill()
    relay.wait()

    for path in (relay_file, session_file):
        records = records_of(path)
        # No unsigned record is INTERVAL or more younger than the signature (or
        # header) before it: the relay signs a record itself once the last
        # signature is that old.
        last_signed = moment(records[0])
        for record in records[1:]:
            if "sig" in record:
                last_signed = moment(record)
            else:
                assert (moment(record) - last_signed).total_seconds() < INTERVAL, record

        done = run_cli(
            "audit",
            "verify",
            "--pubkey",
            "keys/audit.pub",
            "--allow-unsigned-tail",
            path,
            cwd=home,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout.splitlines()
        assert out[0].startswith(f"{path}: ok, {len(records)} records, signature ok")
        if "sig" not in records[-1]:
            assert any("(accepted: --allow-unsigned-tail)" in line for line in out[1:]), out
            strict = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", path, cwd=home)
            assert strict.returncode == 1
            assert any("after the last signature" in line for line in strict.stdout.splitlines())

    # The session never ended: only the flag accepts its file, and says why.
    done = run_cli(
        "audit", "verify", "--pubkey", "keys/audit.pub", "--allow-unsigned-tail", session_file,
        cwd=home,
    )  # fmt: skip
    assert f"{session_file}: note: no session.closed record" in done.stdout
    strict = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", session_file, cwd=home)
    assert strict.returncode == 1
    assert f"{session_file}: ends without a session.closed record (truncated)" in strict.stdout
    live.close()
