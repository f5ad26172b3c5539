"""A recorded session on a full audit file system ends cleanly (no crash, no leak).

The relay's audit folder is a real 1 MiB tmpfs.  A tunnel to a ``record =
true`` target opens while there is room; then the file system is filled, the
debugger sends more bytes and hangs up.  Finishing the bytes file, writing
the end record and closing the session file all fail with ENOSPC: the relay
must log that (no ``session.crashed``, no traceback), close every file of the
session, bring ``dbgrelay_sessions_active`` back to 0 and agree with the
admin API, and keep serving.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ProcGroup, config_text, free_port, run_cli, start_relay
from .test_audit_crash import tunnel
from .test_lifecycle import _token_file


@pytest.fixture
def small_audit_fs(home: Path) -> Iterator[Path]:
    """``home/state/audit`` on its own 1 MiB tmpfs, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the audit folder needs root (CI runs as root)")
    mountpoint = home / "state" / "audit"
    mountpoint.mkdir(parents=True, mode=0o700)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(folder: Path) -> None:
    """Write a file in ``folder`` until the file system has no byte left."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def sessions_active(port: int, target: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        body = answer.read().decode()
    match = re.search(rf'^dbgrelay_sessions_active{{target="{target}"}} (\S+)$', body, re.M)
    assert match, body
    return float(match.group(1))


def open_files(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def test_a_recorded_session_on_a_full_audit_disk_ends_without_a_crash_or_a_leak(
    procs: ProcGroup,
    home: Path,
    small_audit_fs: Path,
    echo_port: int,  # noqa: F811 - the fixture
) -> None:
    metrics_port = free_port()
    text = config_text(
        [
            {
                "name": "rec",
                "kind": "tcp",
                "backend": f"tcp://127.0.0.1:{echo_port}",
                "record": True,
            }
        ]
    ).replace('[metrics]\nlisten = ""', f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"')
    # No scheduled checkpoint may meet the full disk first and end the tunnel
    # as audit_failed: this test is about the end the client asks for.
    text = text.replace("[relay]\n", '[relay]\ncheckpoint_interval = "1h"\n', 1)
    (home / "dbgrelay.toml").write_text(text)
    relay, relay_addr = start_relay(procs, home)
    token = _token_file(home, "rec").read_text()

    client = tunnel(home, relay_addr, token, target="rec")
    assert client.status == b"200", relay.output()
    session_id = relay.wait_event("session.opened")["session_id"]
    client.sendall(b"before")
    assert client.recv(6) == b"before"
    assert sessions_active(metrics_port, "rec") == 1

    fill(small_audit_fs)
    # More than the free room left in the files' last pages: the bytes file
    # cannot take these once it must write them out.
    payload = b"$qSupported#37 after the disk filled " * 1000
    client.sendall(payload)
    echoed = b""
    while len(echoed) < len(payload):
        echoed += client.recv(65536)
    # close_notify first: a clean close (a bare close() is audited client_error).
    client.unwrap().close()

    closed = relay.wait_event("session.closed", session_id=session_id)
    assert closed["reason"] == "client_closed"
    failures = [e for e in relay.events("audit.unwritable") if e.get("session_id") == session_id]
    assert "recording_close" in [e.get("step") for e in failures], relay.output()
    assert all("No space left on device" in e["error"] for e in failures)
    assert relay.events("session.crashed") == []
    assert sessions_active(metrics_port, "rec") == 0
    listed = run_cli("sessions", "--config", "dbgrelay.toml", "--json", cwd=home)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    held = [p for p in open_files(relay.popen.pid) if session_id in p]
    assert held == []

    # The relay keeps serving: with room again, the next recorded session works.
    (small_audit_fs / "filler").unlink()
    again = tunnel(home, relay_addr, token, target="rec")
    assert again.status == b"200", relay.output()
    again.close()
    relay.send_signal(signal.SIGTERM)
    assert relay.wait() == 0, relay.output()
    assert "Traceback" not in relay.output()
