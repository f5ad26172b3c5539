"""Managed servers and idle targets with ``dbgrelay serve`` as a real subprocess.

A tunnel is opened the way a developer opens one: ``dbgrelay connect`` plus a
debugger speaking the GDB remote protocol to its local port.  The tests wait
for events (a log line, a process exit) with real bounds and never sleep out a
deadline; the deadline behaviour itself (idle_timeout, max_session,
on_idle_timeout at production sizes) is covered on trio's mock clock in
``tests/relay/test_managed.py`` and ``tests/relay/test_watch.py``.  The one
test here that needs a target to go idle uses a one-second ``idle_timeout``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from auth import issue_token, load_signing_key

from ..processes import is_gone as _is_gone
from .support import Proc, ProcGroup, config_text, run_cli, start_relay

GDBSERVER = shutil.which("gdbserver")
SLEEP = shutil.which("sleep")
WAIT = 20.0


def _wait_gone(*pids: int) -> None:
    """Wait (bounded) for processes to exit: an event, not a timeout."""
    deadline = time.monotonic() + WAIT
    while not all(_is_gone(pid) for pid in pids):
        alive = [pid for pid in pids if not _is_gone(pid)]
        assert time.monotonic() < deadline, f"still running after {WAIT}s: {alive}"
        time.sleep(0.02)


def _token_file(home: Path, target: str) -> Path:
    token = issue_token(
        load_signing_key(home / "keys" / "signing.key"),
        user="alice",
        targets=[target],
        ttl=3600,
        issuer="dbgrelay",
        audience="dbgrelay",
        now=time.time(),
    )
    path = home / "alice.jwt"
    path.write_text(token)
    return path


def _connector(procs: ProcGroup, home: Path, relay_addr: str) -> tuple[str, int]:
    """Start ``dbgrelay connect`` for target build42; return its loopback address."""
    connect = procs.dbgrelay(
        "connect", "--relay", relay_addr, "--ca", "pki/ca.pem", "--target", "build42",
        "--token-file", _token_file(home, "build42"), "--listen", "127.0.0.1:0",
        cwd=home, name="connect",
    )  # fmt: skip
    line = connect.wait_line("listening on 127.0.0.1:")
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))
    return "127.0.0.1", port


def _debugger(address: tuple[str, int]) -> socket.socket:
    """Connect like gdb does and ask why the target stopped; the reply proves the path."""
    sock = socket.create_connection(address, timeout=WAIT)
    sock.sendall(b"$?#3f")
    reply = b""
    while not re.search(rb"\$[^#]*#[0-9a-f]{2}", reply):
        data = sock.recv(4096)
        assert data, f"tunnel closed after {reply!r}"
        reply += data
    assert re.match(rb"\+\$[TS]05", reply), reply
    return sock


def _inferior_pid(home: Path) -> int:
    log = (home / "state" / "servers" / "build42.log").read_text()
    return int(re.findall(r"Process .* created; pid = (\d+)", log)[-1])


def _managed_relay(procs: ProcGroup, home: Path) -> tuple[Proc, str]:
    (home / "dbgrelay.toml").write_text(
        config_text(
            [
                {
                    "name": "build42",
                    "kind": "gdbserver",
                    "backend": "tcp://127.0.0.1:{port}",
                    # Without --once: the server outlives its tunnel.
                    "launch": [GDBSERVER, "127.0.0.1:{port}", SLEEP, "1000"],
                }
            ]
        )
    )
    return start_relay(procs, home)


needs_gdbserver = pytest.mark.skipif(GDBSERVER is None, reason="needs gdbserver installed")


@needs_gdbserver
def test_relay_killed_with_sigkill_takes_its_managed_server_and_inferior_with_it(
    procs: ProcGroup, home: Path
) -> None:
    relay, relay_addr = _managed_relay(procs, home)
    debugger = _debugger(_connector(procs, home, relay_addr))
    server = relay.wait_event("server.launched", target="build42")["pid"]
    inferior = _inferior_pid(home)
    assert not _is_gone(server) and not _is_gone(inferior)

    relay.popen.send_signal(signal.SIGKILL)  # no cleanup code runs in the relay
    assert relay.wait() == -signal.SIGKILL

    # The launcher sees its control socket from the relay close and kills the tree.
    _wait_gone(server, inferior)
    debugger.close()


@needs_gdbserver
def test_sigterm_shutdown_kills_the_managed_server_and_records_why(
    procs: ProcGroup, home: Path
) -> None:
    relay, relay_addr = _managed_relay(procs, home)
    debugger = _debugger(_connector(procs, home, relay_addr))
    server = relay.wait_event("server.launched", target="build42")["pid"]
    inferior = _inferior_pid(home)
    debugger.close()
    relay.wait_event("session.closed", target="build42")

    relay.send_signal(signal.SIGTERM)
    assert relay.wait() == 0, relay.output()

    exited = relay.wait_event("server.exited", target="build42")
    assert (exited["reason"], exited["signal"], exited["pid"]) == ("shutdown", "SIGTERM", server)
    assert _is_gone(server) and _is_gone(inferior)
    (relay_file,) = (home / "state" / "audit").glob("relay-*.jsonl")
    records = [json.loads(line) for line in relay_file.read_text().splitlines()]
    recorded = [r for r in records if r.get("event") == "server.exited"]
    assert [(r["reason"], r["signal"]) for r in recorded] == [("shutdown", "SIGTERM")]
    verify = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", relay_file, cwd=home)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_forgotten_server_is_reported_and_on_idle_runs(procs: ProcGroup, home: Path) -> None:
    # A debug server someone started by hand and left listening.
    forgotten = socket.create_server(("127.0.0.1", 0))
    port = forgotten.getsockname()[1]
    (home / "dbgrelay.toml").write_text(
        config_text(
            [
                {
                    "name": "build42",
                    "kind": "dbgsrv",
                    "backend": f"tcp://127.0.0.1:{port}",
                    "idle_timeout": "1s",
                    "probe_interval": "0.1s",
                    "on_idle": ["sh", "-c", 'echo "asked the owner of $0 to stop it"', "build42"],
                }
            ]
        )
    )
    try:
        relay, _ = start_relay(procs, home)

        reported = relay.wait_event("server.forgotten", timeout=WAIT)
        ran = relay.wait_event("on_idle.ran", timeout=WAIT)
        assert reported["target"] == "build42" and reported["idle_seconds"] >= 1
        assert reported["backend"] == f"tcp://127.0.0.1:{port}"
        assert ran["trigger"] == "forgotten" and ran["returncode"] == 0
        assert ran["output"] == "asked the owner of build42 to stop it\n"
        relay.send_signal(signal.SIGTERM)
        assert relay.wait() == 0, relay.output()
    finally:
        forgotten.close()
    (relay_file,) = (home / "state" / "audit").glob("relay-*.jsonl")
    records = [json.loads(line) for line in relay_file.read_text().splitlines()]
    events = [r.get("event") for r in records]
    # Reported once, though probed ten times a second.
    assert events.count("server.forgotten") == 1 and events.count("on_idle.ran") == 1
    shown = run_cli("audit", "show", relay_file, cwd=home)
    assert shown.returncode == 0, shown.stderr
    forgotten_at = shown.stdout.index("server.forgotten")
    assert shown.stdout.index("on_idle.ran", forgotten_at) > forgotten_at
    assert 'output="asked the owner of build42 to stop it\\n"' in shown.stdout
    verify = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", relay_file, cwd=home)
    assert verify.returncode == 0, verify.stdout + verify.stderr
