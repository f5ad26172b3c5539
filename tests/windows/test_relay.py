"""``dbgrelay serve`` on Windows (the official CPython under Wine) with native Linux clients.

The relay runs as Windows runs it, with its defaults (the admin API on the
named pipe ``\\\\.\\pipe\\dbgrelay-admin``, owner-only state and audit
folders); its tunnel clients are native Linux TLS sockets on 127.0.0.1, and
its named-pipe backends are pipe servers in another Windows process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e.support import Proc, ProcGroup, free_port
from ..e2e.test_operations import echo, issue, open_tunnel, refused, tls_connect, wait_eof
from .conftest import WineTier

CHECKS = Path(__file__).with_name("relay_checks.py")
EVERYONE, SYSTEM, ADMINS = "S-1-1-0", "S-1-5-18", "S-1-5-32-544"
ACCESS_ALLOWED = 0
INHERIT = 0x1 | 0x2  # OBJECT_INHERIT_ACE | CONTAINER_INHERIT_ACE
# A Windows Python start under Wine imports trio and cryptography.
START_TIMEOUT = 90.0


def _config(home: Path, tcp_port: int, metrics_port: int, prefix: str) -> None:
    """Only what has no usable default: certificates, keys, a free port, the targets."""
    targets = {
        "build-tcp": f"tcp://127.0.0.1:{tcp_port}",
        "build-pipe": f"npipe:pipe={prefix}-echo",
        "build-busy": f"npipe:pipe={prefix}-busy",
        "build-reset": f"npipe:pipe={prefix}-reset",
        "build-absent": f"npipe:pipe={prefix}-absent",
    }
    lines = [
        "[relay]",
        'listen = ["127.0.0.1:0"]',
        "[tls]",
        'cert = "pki/server.pem"',
        'key = "pki/server.key"',
        "[auth]",
        'jwks = "keys/jwks.json"',
        'audit_key = "keys/audit.key"',
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
    ]
    for name, backend in targets.items():
        lines += ["[[targets]]", f'name = "{name}"', 'kind = "tcp"', f'backend = "{backend}"']
        lines.append('probe_interval = "0"')
    (home / "dbgrelay.toml").write_text("\n".join(lines) + "\n")


class WindowsRelay:
    def __init__(self, proc: Proc, address: str, metrics_port: int) -> None:
        self.proc = proc
        self.address = address
        self.metrics_port = metrics_port


@pytest.fixture
def windows_relay(
    wine_tier: WineTier,
    procs: ProcGroup,
    home: Path,
    echo_port: int,
) -> Iterator[WindowsRelay]:
    """The Windows relay with its pipe stand-ins; stopped (Ctrl-C) at the end if still running."""
    prefix = f"dbgrelay-t{os.urandom(4).hex()}"
    pipes = wine_tier.start(procs, CHECKS, "pipes", prefix, cwd=home, name="pipe servers")
    pipes.wait_line("ready", stream="stdout", timeout=START_TIMEOUT)
    metrics_port = free_port()
    _config(home, echo_port, metrics_port, prefix)
    relay = wine_tier.dbgrelay(procs, "serve", "--config", "dbgrelay.toml", cwd=home, name="relay")
    listening = relay.wait_event("relay.listening", timeout=START_TIMEOUT)
    yield WindowsRelay(relay, listening["address"], metrics_port)


def _windows_cli(wine_tier: WineTier, home: Path, *args: str) -> str:
    done = wine_tier.run("-m", "relay", *args, cwd=home, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def test_windows_relay_with_defaults_serves_healthz_tunnels_and_admin_over_the_pipe(
    wine_tier: WineTier, windows_relay: WindowsRelay, home: Path
) -> None:
    relay = windows_relay.proc
    admin = relay.wait_event("admin.listening")
    assert admin["address"] == "\\\\.\\pipe\\dbgrelay-admin", admin
    url = f"http://127.0.0.1:{windows_relay.metrics_port}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as answer:
        assert answer.status == 200
    # A second scrape: the first one did not end the relay.
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        assert b"dbgrelay_" in answer.read()

    token = issue(home)
    tls, session_id = open_tunnel(home, windows_relay.address, "build-tcp", token)
    echo(tls, os.urandom(300_000))

    listed = json.loads(
        _windows_cli(wine_tier, home, "sessions", "--config", "dbgrelay.toml", "--json")
    )
    assert [(s["id"], s["target"], s["user"]) for s in listed] == [
        (session_id, "build-tcp", "alice")
    ], listed
    _windows_cli(wine_tier, home, "sessions", "end", session_id, "--config", "dbgrelay.toml")
    wait_eof(tls)
    tls.close()
    closed = relay.wait_event("session.closed", session_id=session_id)
    assert closed["reason"] == "ended_by_admin", closed
    ended = relay.wait_event("admin.session_ended")
    # The audit trail names the caller by process and account.
    assert ended["actor"].startswith("npipe:pid="), ended
    assert ",sid=S-1-5-" in ended["actor"], ended


def test_named_pipe_backends_through_the_windows_relay(
    windows_relay: WindowsRelay, home: Path
) -> None:
    relay, address = windows_relay.proc, windows_relay.address
    token = issue(home)

    tls, _ = open_tunnel(home, address, "build-pipe", token)
    echo(tls, os.urandom(1024 * 1024 + 5))
    tls.close()

    answer = refused(home, address, "build-absent", token)
    assert answer.status == 502, answer
    failed = relay.wait_event("backend.failed", target="build-absent")
    assert failed["reason"] == "backend_unreachable", failed

    # The busy pipe has one instance: the second tunnel waits for it.
    first, _ = open_tunnel(home, address, "build-busy", token)
    echo(first, b"first")
    second: dict = {}

    def open_second() -> None:
        second["tunnel"] = open_tunnel(home, address, "build-busy", token)[0]

    opener = threading.Thread(target=open_second, daemon=True)
    opener.start()
    opener.join(2)  # not a bound: only gives the request time to reach the busy pipe
    assert opener.is_alive(), "the second tunnel opened while the pipe was busy"
    first.close()
    opener.join(60)
    assert "tunnel" in second, relay.output()
    echo(second["tunnel"], b"second")
    second["tunnel"].close()

    # A server that drops its client: the client gets what was sent, then the end.
    tls, reset_id = open_tunnel(home, address, "build-reset", token)
    tls.settimeout(30)
    got = b""
    while len(got) < 3 and (data := tls.recv(10)):
        got += data
    assert got == b"bye"
    wait_eof(tls)
    tls.close()
    relay.wait_event("session.closed", session_id=reset_id)
    # The relay goes on.
    tls, _ = open_tunnel(home, address, "build-pipe", token)
    echo(tls, b"still serving")
    tls.close()


def test_ctrl_c_drains_a_live_tunnel_then_the_windows_relay_exits(
    windows_relay: WindowsRelay, home: Path
) -> None:
    relay = windows_relay.proc
    token = issue(home)
    tls, session_id = open_tunnel(home, windows_relay.address, "build-tcp", token)
    echo(tls, b"before")

    # Wine turns SIGINT into the console's Ctrl-C event, as a keypress would be.
    relay.send_signal(signal.SIGINT)
    draining = relay.wait_event("relay.draining")
    assert draining["sessions"] == 1, draining
    # New tunnels are refused; the live one still carries bytes.
    with pytest.raises(OSError):
        tls_connect(windows_relay.address, home / "pki" / "ca.pem").recv(1)
    echo(tls, b"during the drain")
    tls.close()

    assert relay.wait(START_TIMEOUT) == 0, relay.output()
    closed = relay.wait_event("session.closed", session_id=session_id)
    assert closed["reason"] != "shutdown", closed  # the client ended it, not the drain's end
    relay.wait_event("relay.stopped")
    assert "Traceback" not in relay.output()


def test_reload_by_named_event_and_by_dbgrelay_reload_over_the_pipe(
    wine_tier: WineTier, windows_relay: WindowsRelay, home: Path
) -> None:
    relay = windows_relay.proc
    trigger = relay.wait_event("reload.trigger")
    name = trigger["event_name"]
    assert name.startswith("Global\\dbgrelay-reload-"), trigger

    done = wine_tier.run(CHECKS, "set-event", name, cwd=home, timeout=120)
    assert done.stdout.strip() == "set", done.stdout + done.stderr
    by_event = relay.wait_event("reload.ok", logger="audit")
    assert by_event["actor"] == f"event:{name}", by_event

    _windows_cli(wine_tier, home, "reload", "--config", "dbgrelay.toml")
    relay.wait_event("admin.reload", logger="audit")
    actors = [r["actor"] for r in relay.events("reload.ok") if r.get("logger") == "audit"]
    assert actors[0] == f"event:{name}" and actors[1].startswith("npipe:pid="), actors


def test_admin_pipe_state_and_audit_folders_admit_only_the_relay_and_admins(
    wine_tier: WineTier, windows_relay: WindowsRelay, home: Path
) -> None:
    windows_relay.proc.wait_event("admin.listening")
    paths = ["\\\\.\\pipe\\dbgrelay-admin", "state", "state\\audit"]

    done = wine_tier.run(CHECKS, "acl", *paths, cwd=home, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    me, found = answer["me"], answer["paths"]
    pipe = {sid for kind, _flags, sid, _mask in found[paths[0]] if kind == ACCESS_ALLOWED}
    assert pipe == {ADMINS, SYSTEM, me}, found[paths[0]]
    for folder in paths[1:]:
        allowed = [(sid, flags) for kind, flags, sid, _mask in found[folder] if kind == 0]
        # Wine keeps a DACL as Unix mode bits and reads SYSTEM back beside the
        # owner; on Windows the owner's entry is the only one.
        assert {sid for sid, _ in allowed} <= {me, SYSTEM}, (folder, found[folder])
        assert any(sid == me and flags & INHERIT == INHERIT for sid, flags in allowed), (
            folder,
            found[folder],
        )
        assert EVERYONE not in {sid for sid, _ in allowed}, (folder, found[folder])


def _service(wine_tier: WineTier, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return wine_tier.run("-m", "relay", "service", *args, cwd=home, timeout=180)


def _log_events(path: Path, name: str) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == name]


def test_relay_as_a_windows_service_installed_started_stopped_removed(
    wine_tier: WineTier,
    home: Path,
    echo_port: int,
) -> None:
    _config(home, echo_port, free_port(), f"dbgrelay-t{os.urandom(4).hex()}")
    name = f"dbgrelay-test-{os.urandom(3).hex()}"
    log = home / "state" / "dbgrelay.log"

    done = _service(wine_tier, home, "install", "--config", "dbgrelay.toml", "--name", name)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        done = _service(wine_tier, home, "start", "--name", name)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _service(wine_tier, home, "status", "--name", name).stdout.strip() == "running"
        # "running" is reported once the relay listens; its log file says where.
        listening = _log_events(log, "relay.listening")
        assert listening, log.read_text()
        token = issue(home)
        tls, _ = open_tunnel(home, listening[0]["address"], "build-tcp", token)
        echo(tls, b"through the service")
        tls.close()

        done = _service(wine_tier, home, "stop", "--name", name)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _service(wine_tier, home, "status", "--name", name).stdout.strip() == "stopped"
        # The stop was a drain, not a kill.
        assert _log_events(log, "relay.stopping")[0]["signal"] == "service_stop"
        assert _log_events(log, "relay.draining")
        assert _log_events(log, "relay.stopped")
    finally:
        removed = _service(wine_tier, home, "remove", "--name", name)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    gone = _service(wine_tier, home, "status", "--name", name)
    assert gone.returncode == 1
    assert gone.stderr.strip() == (
        f"dbgrelay: service status {name}: Service does not exist.; install it first with "
        "'dbgrelay service install --config PATH'"
    ), gone.stderr


def _base_config(home: Path, target: str) -> None:
    (home / "dbgrelay.toml").write_text(
        '[tls]\ncert = "pki/server.pem"\nkey = "pki/server.key"\n'
        '[auth]\njwks = "keys/jwks.json"\n[[targets]]\nname = "build42"\nkind = "tcp"\n' + target
    )


def test_windows_refuses_unresolved_pipe_ids_in_one_line(wine_tier: WineTier, home: Path) -> None:
    _base_config(home, 'backend = "npipe:pipe=dbg%d"\n')
    done = wine_tier.run("-m", "relay", "check-config", "--config", "dbgrelay.toml", cwd=home)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert 'the pipe name in "npipe:pipe=dbg%d" has %d or %x' in line, line
