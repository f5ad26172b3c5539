"""``dbgrelay serve --workers N``: several relay processes on one port, one supervisor.

Real processes on loopback: the kernel spreads connections over the workers
(``SO_REUSEPORT``), so tests open tunnels until each worker has one, bounded
by a number of attempts that all landing on one worker would make
astronomically unlikely.  Every wait is for an event, bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
from pathlib import Path

import pytest

from relay.workers import reuseport_available

from ..echo import EchoServer
from .support import ProcGroup, config_text, free_port, run_cli
from .test_operations import echo, issue, open_tunnel, target, wait_eof

pytestmark = pytest.mark.skipif(
    not reuseport_available(), reason="this platform has no SO_REUSEPORT"
)

#: Tunnels opened at most to reach a given worker: 2**-63 that all miss it.
ATTEMPTS = 64


def write_config(home: Path, port: int, echo_port: int) -> str:
    text = config_text([target("build42", echo_port)]).replace(
        'listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{port}"]'
    )
    text = text.replace('shutdown_grace = "1s"', 'shutdown_grace = "3s"')
    (home / "dbgrelay.toml").write_text(text)
    return f"127.0.0.1:{port}"


def worker_sessions(home: Path, index: int) -> set[str]:
    """Ids of the sessions worker ``index`` has audited."""
    return {p.stem for p in (home / "state" / "audit" / f"worker-{index}").glob("*/*.jsonl")}


def tunnel_on(home: Path, address: str, token: str, index: int) -> tuple[ssl.SSLSocket, str]:
    """A live tunnel that worker ``index`` holds (others opened on the way are closed)."""
    for _ in range(ATTEMPTS):
        tls, sid = open_tunnel(home, address, "build42", token)
        echo(tls, b"ping")
        if sid in worker_sessions(home, index):
            return tls, sid
        tls.close()
    raise AssertionError(f"no tunnel reached worker {index} in {ATTEMPTS} attempts")


def test_workers_share_the_port_a_killed_one_is_restarted_and_sigterm_drains_all(
    procs: ProcGroup, home: Path, echo_server: EchoServer
) -> None:
    address = write_config(home, free_port(), echo_server.port)
    supervisor = procs.dbgrelay(
        "serve", "--config", "dbgrelay.toml", "--workers", "2", cwd=home, name="supervisor"
    )
    listening = {index: supervisor.wait_event("relay.listening", worker=index) for index in (0, 1)}
    assert listening[0]["pid"] != listening[1]["pid"] != supervisor.popen.pid
    token = issue(home)

    # Both workers accept.
    on_0, sid_0 = tunnel_on(home, address, token, 0)
    on_1, sid_1 = tunnel_on(home, address, token, 1)

    # A worker killed with SIGKILL is restarted; the other's tunnel lives on.
    os.kill(listening[1]["pid"], signal.SIGKILL)
    exited = supervisor.wait_event("worker.exited", worker=1)
    assert exited["returncode"] == -signal.SIGKILL
    restarted = supervisor.wait_line(
        lambda line: (
            '"relay.listening"' in line
            and '"worker": 1' in line
            and f'"pid": {listening[1]["pid"]}' not in line
        )
    )
    on_1.close()
    echo(on_0, b"worker 0 carries on")
    again, sid_again = tunnel_on(home, address, token, 1)
    assert sid_again != sid_1 and restarted

    # SIGTERM: every worker drains its live tunnels, then the supervisor exits 0.
    supervisor.send_signal(signal.SIGTERM)
    for index in (0, 1):
        supervisor.wait_event("relay.draining", worker=index)
    echo(on_0, b"still served during the grace")
    echo(again, b"still served during the grace")
    wait_eof(on_0)
    wait_eof(again)
    assert supervisor.wait(timeout=30) == 0, supervisor.output()
    for index, sid in ((0, sid_0), (1, sid_again)):
        closed = supervisor.wait_event("session.closed", session_id=sid)
        assert closed["reason"] == "shutdown" and closed["worker"] == index
    for index in (0, 1):
        files = sorted((home / "state" / "audit" / f"worker-{index}").glob("relay-*.jsonl"))
        assert files, index
        done = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", *files, cwd=home)
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_bad_worker_start_stops_the_supervisor_with_the_workers_error(
    procs: ProcGroup, home: Path, echo_server: EchoServer
) -> None:
    # The port is taken by something that does not set SO_REUSEPORT.
    import socket

    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        write_config(home, port, echo_server.port)
        supervisor = procs.dbgrelay(
            "serve", "--config", "dbgrelay.toml", "--workers", "2", cwd=home, name="supervisor"
        )
        assert supervisor.wait() == 2, supervisor.output()
    finally:
        holder.close()
    assert any("pick a free port" in line for line in supervisor.lines["stderr"])


def test_workers_refuse_port_0_and_a_bad_count(home: Path, echo_server: EchoServer) -> None:
    (home / "dbgrelay.toml").write_text(config_text([target("build42", echo_server.port)]))
    done = run_cli("serve", "--config", "dbgrelay.toml", "--workers", "2", cwd=home)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "relay.listen has port 0; --workers needs a fixed port that every worker binds"
    )
    done = run_cli("serve", "--config", "dbgrelay.toml", "--workers", "0", cwd=home)
    assert done.returncode == 2 and "expected a number of processes >= 1" in done.stderr


def test_serve_runs_one_worker_per_cpu_by_default_and_the_main_admin_socket_covers_them_all(
    procs: ProcGroup, home: Path, echo_server: EchoServer
) -> None:
    from relay.workers import cpus_available

    cpus = cpus_available()
    if cpus < 2:
        pytest.skip(f"this host gives the tests {cpus} CPU: the default is a single process")
    address = write_config(home, free_port(), echo_server.port)
    supervisor = procs.dbgrelay("serve", "--config", "dbgrelay.toml", cwd=home, name="supervisor")
    for index in range(cpus):
        supervisor.wait_event("relay.listening", worker=index)
    token = issue(home)
    on_0, sid_0 = tunnel_on(home, address, token, 0)
    on_1, sid_1 = tunnel_on(home, address, token, 1)

    # `dbgrelay sessions` asks admin.sock (worker 0), which asks the other workers.
    done = run_cli("sessions", "--json", "--config", "dbgrelay.toml", cwd=home)
    assert done.returncode == 0, done.stderr
    listed = {s["id"]: s["worker"] for s in json.loads(done.stdout)}
    assert listed == {sid_0: 0, sid_1: 1}
    table = run_cli("sessions", "--config", "dbgrelay.toml", cwd=home).stdout
    assert "WORKER" in table.splitlines()[0] and sid_1 in table

    done = run_cli("sessions", "end", sid_1, "--config", "dbgrelay.toml", cwd=home)

    assert done.returncode == 0, done.stderr
    assert f"ended session {sid_1} of alice to build42" in done.stderr
    closed = supervisor.wait_event("session.closed", session_id=sid_1)
    assert (closed["worker"], closed["reason"]) == (1, "ended_by_admin")
    wait_eof(on_1)
    echo(on_0, b"worker 0 carries on")
    unknown = run_cli("sessions", "end", sid_1, "--config", "dbgrelay.toml", cwd=home)
    assert unknown.returncode == 1 and "no live session" in unknown.stderr
    on_0.close()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, supervisor.output()
    # Worker 0's audit trail records who ended the session on worker 1.
    records = [
        json.loads(line)
        for path in (home / "state" / "audit" / "worker-0").glob("relay-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    (ended,) = [r for r in records if r.get("event") == "admin.session_ended"]
    assert (ended["session_id"], ended["worker"]) == (sid_1, 1)


def test_by_default_a_relay_on_port_0_is_one_process_with_the_single_relay_paths(
    procs: ProcGroup, home: Path, echo_server: EchoServer
) -> None:
    (home / "dbgrelay.toml").write_text(config_text([target("build42", echo_server.port)]))
    relay = procs.dbgrelay("serve", "--config", "dbgrelay.toml", cwd=home, name="relay")
    listening = relay.wait_event("relay.listening")
    token = issue(home)
    tls, sid = open_tunnel(home, listening["address"], "build42", token)
    echo(tls, b"one process")

    from relay.workers import cpus_available

    assert "worker" not in listening
    if cpus_available() > 1:
        assert relay.events("workers.single")[0]["reason"].startswith("relay.listen has port 0")
    assert (home / "admin.sock").exists()
    assert not list((home / "state" / "audit").glob("worker-*"))
    done = run_cli("sessions", "--json", "--config", "dbgrelay.toml", cwd=home)
    assert [s["id"] for s in json.loads(done.stdout)] == [sid]
    tls.close()
    relay.stop()
