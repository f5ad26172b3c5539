"""Several ``dbgrelay serve`` processes sharing one real PostgreSQL server.

Each relay has its own folder (audit trail, admin socket) and the same keys;
they share revocations through the database.  Tunnels are opened from the
test with the standard library's ``ssl``; every wait is for an event (a log
line, EOF) bounded by a generous timeout, never a sleep.
"""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from auth import peek_unverified
from auth.revocation_pg import PG_SCHEMA_VERSION
from relay.audit_pool import POOL_SIZE

from .. import accounts
from ..echo import EchoServer
from ..postgres import PgServer
from .leases import expire_pg_lease
from .support import (
    READY_TIMEOUT,
    Proc,
    ProcGroup,
    config_text,
    copy_materials,
    run_cli,
    start_relay,
)
from .test_operations import (
    echo,
    issue,
    open_tunnel,
    refused,
    relay_audit,
    request,
    target,
    tls_connect,
    wait_eof,
)

#: Far beyond any test's length: only a notification can deliver a revocation in time.
NEVER = "1h"

#: ``session_lease``, seconds: longer than any test, so a dead relay's rows stay
#: until the test ends their lease (:func:`expire_pg_lease`), never before.
LEASE = 3600.0


def relay_home(
    base: Path,
    name: str,
    materials: Path,
    dsn: str,
    echo_port: int,
    target_keys: dict | None = None,
    **state: str,
) -> Path:
    """A relay folder whose config uses the postgres backend with ``[state]`` overrides."""
    home = base / name
    home.mkdir()
    copy_materials(materials, home)
    (home / "dsn").write_text(dsn + "\n")
    (home / "dsn").chmod(0o600)
    text = config_text([target("build42", echo_port) | (target_keys or {})])
    text += '[state]\nbackend = "postgres"\ndsn_file = "dsn"\n'
    text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in state.items())
    (home / "dbgrelay.toml").write_text(text)
    return home


def migrate(home: Path) -> str:
    done = run_cli("state", "migrate", "--config", "dbgrelay.toml", cwd=home)
    assert done.returncode == 0, done.stderr
    return done.stderr.strip()


def health(home: Path) -> dict:
    """The relay's ``/v1/health`` answer, through its admin socket."""
    import trio

    from config import load_config
    from relay.admin_client import AdminClient, AdminEndpoint

    config = load_config(home / "dbgrelay.toml")
    return trio.run(AdminClient(AdminEndpoint.from_config(config)).health)


def verify_audit(home: Path) -> list[dict]:
    """Every audit file of a stopped relay verifies; returns the session records."""
    paths = sorted((home / "state" / "audit").rglob("*.jsonl"))
    assert paths
    done = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", *paths, cwd=home)
    assert done.returncode == 0, done.stdout + done.stderr
    records = []
    for path in paths:
        if not path.name.startswith("relay-"):
            records.append([json.loads(line) for line in path.read_text().splitlines()])
    return records


def test_state_migrate_then_a_relay_refuses_an_unknown_schema_with_what_to_run(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    home = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port)

    relay = procs.dbgrelay("serve", "--config", "dbgrelay.toml", cwd=home, name="relay")
    assert relay.wait() != 0
    assert relay.lines["stderr"][-1].endswith(
        "has no dbgrelay schema yet; run `dbgrelay state migrate --config FILE`"
    ), relay.output()

    assert migrate(home) == f"state schema migrated from version 0 to {PG_SCHEMA_VERSION}"
    assert migrate(home) == f"state schema is at version {PG_SCHEMA_VERSION}; nothing to do"
    start_relay(procs, home)


def test_a_revoke_on_relay_a_ends_a_tunnel_on_relay_b_through_notify(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    # resync_interval is an hour: without LISTEN/NOTIFY relay B would not learn in time.
    state = {"resync_interval": NEVER}
    home_a = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port, **state)
    home_b = relay_home(tmp_path, "b", materials, pg_dsn, echo_server.port, **state)
    migrate(home_a)
    relay_a, address_a = start_relay(procs, home_a)
    relay_b, address_b = start_relay(procs, home_b)
    token = issue(home_a)
    jti = peek_unverified(token)["jti"]
    tls, sid = open_tunnel(home_b, address_b, "build42", token)
    echo(tls, b"before")

    done = run_cli("token", "revoke", jti, "--config", "dbgrelay.toml", cwd=home_a)

    assert done.returncode == 0, done.stderr
    assert "through the running relay; 0 live tunnel(s) ended" in done.stderr
    relay_b.wait_event("session.revoked", session_id=sid)
    wait_eof(tls)
    assert refused(home_a, address_a, "build42", token).reason == "revoked"
    assert refused(home_b, address_b, "build42", token).reason == "revoked"
    relay_a.stop()
    relay_b.stop()
    (session,) = verify_audit(home_b)
    assert session[-1]["event"] == "session.closed" and session[-1]["reason"] == "revoked"


def test_a_revocation_missed_while_disconnected_arrives_with_the_resync(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    # A row written without NOTIFY stands for a notification lost in a disconnect.
    import psycopg

    home = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port, resync_interval="1s")
    migrate(home)
    relay, address = start_relay(procs, home)
    token = issue(home)
    tls, sid = open_tunnel(home, address, "build42", token)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dbgrelay_revoked_jtis (jti, revoked_at) VALUES (%s, 0)",
            (peek_unverified(token)["jti"],),
        )

    relay.wait_event("session.revoked", session_id=sid)
    wait_eof(tls)


def test_postgres_stopped_mid_run_live_tunnels_go_on_new_ones_get_503_after_the_grace(
    procs: ProcGroup,
    tmp_path: Path,
    materials: Path,
    pg_server: PgServer,
    pg_dsn: str,
    echo_server: EchoServer,
) -> None:
    # Relay A's grace outlasts the test, relay B has none: both sides of the grace,
    # without waiting for a clock.
    home_a = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port, unavailable_grace=NEVER)
    home_b = relay_home(tmp_path, "b", materials, pg_dsn, echo_server.port, unavailable_grace="0")
    migrate(home_a)
    relay_a, address_a = start_relay(procs, home_a)
    relay_b, address_b = start_relay(procs, home_b)
    token = issue(home_a)
    live_a, _ = open_tunnel(home_a, address_a, "build42", token)
    live_b, _ = open_tunnel(home_b, address_b, "build42", token)

    pg_server.stop()
    try:
        relay_a.wait_event("state.unavailable")
        relay_b.wait_event("state.unavailable")
        echo(live_a, b"still here")
        echo(live_b, b"still here")
        within_grace, _ = open_tunnel(home_a, address_a, "build42", token)
        echo(within_grace, b"admitted")
        answer = refused(home_b, address_b, "build42", token)
        assert (answer.status, answer.reason) == (503, "state_unavailable")
        state_a, state_b = health(home_a)["state"], health(home_b)["state"]
        assert (state_a["available"], state_a["admitting"]) == (False, True)
        assert (state_b["available"], state_b["admitting"]) == (False, False)
        assert "check state.dsn_file" in state_b["error"]
    finally:
        pg_server.start()

    relay_a.wait_event("state.recovered")
    relay_b.wait_event("state.recovered")
    assert health(home_b)["state"] | {"unavailable_for": None} == {
        "backend": "postgres",
        "available": True,
        "admitting": True,
        "unavailable_for": None,
        "error": None,
    }
    again, _ = open_tunnel(home_b, address_b, "build42", token)
    echo(again, b"back")
    echo(live_b, b"still here")
    for tls in (live_a, live_b, within_grace, again):
        tls.close()
    relay_a.stop()
    relay_b.stop()
    # One line per outage, not one per retry.
    assert len(relay_a.events("state.unavailable")) == 1
    assert len(relay_b.events("state.unavailable")) == 1
    for home, count in ((home_a, 2), (home_b, 2)):
        sessions = verify_audit(home)
        assert len(sessions) == count
        for records in sessions:
            events = [r.get("event") for r in records]
            assert events[1] == "session.opened" and events[-1] == "session.closed", events


def cluster_sessions(home: Path) -> list[dict]:
    done = run_cli("sessions", "--json", "--config", "dbgrelay.toml", cwd=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sessions_are_listed_and_ended_across_relays(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    # Renewals an hour apart: the listing and the end request ride on registration
    # at open and on the end notification, not on the periodic renewal.
    state = {"session_lease": "3h", "resync_interval": NEVER}
    home_a = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port, **state)
    home_b = relay_home(tmp_path, "b", materials, pg_dsn, echo_server.port, **state)
    migrate(home_a)
    relay_a, address_a = start_relay(procs, home_a)
    relay_b, address_b = start_relay(procs, home_b)
    token = issue(home_a)
    on_a, sid_a = open_tunnel(home_a, address_a, "build42", token)
    on_b, sid_b = open_tunnel(home_b, address_b, "build42", token)
    echo(on_b, b"x" * 1000)

    # Registration follows the open at once, but in its own task: wait for it.
    deadline = time.monotonic() + READY_TIMEOUT
    while {s["id"] for s in cluster_sessions(home_a)} != {sid_a, sid_b}:
        assert time.monotonic() < deadline, cluster_sessions(home_a)
        time.sleep(0.05)
    listed = {s["id"]: s for s in cluster_sessions(home_a)}
    assert listed[sid_b]["user"] == "alice" and listed[sid_b]["target"] == "build42"
    assert listed[sid_a]["relay"] != listed[sid_b]["relay"]
    table = run_cli("sessions", "--config", "dbgrelay.toml", cwd=home_b).stdout
    assert sid_a in table and sid_b in table and "RELAY" in table.splitlines()[0]

    done = run_cli("sessions", "end", sid_b, "--config", "dbgrelay.toml", cwd=home_a)

    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (
        f"ended session {sid_b} of alice to build42 (reason ended_by_admin, closed)"
    )
    relay_b.wait_event("session.closed", session_id=sid_b, reason="ended_by_admin")
    wait_eof(on_b)
    assert [s["id"] for s in cluster_sessions(home_b)] == [sid_a]
    unknown = run_cli("sessions", "end", sid_b, "--config", "dbgrelay.toml", cwd=home_a)
    assert unknown.returncode == 1 and "no live session" in unknown.stderr
    on_a.close()
    relay_a.stop()
    relay_b.stop()
    (ended,) = [r for r in relay_audit(home_a) if r.get("event") == "admin.session_ended"]
    assert ended["session_id"] == sid_b and ended["relay"] == listed[sid_b]["relay"]


def test_the_sessions_of_a_relay_killed_with_sigkill_expire_with_its_lease(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    state = {"session_lease": f"{LEASE:g}s"}
    home_a = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port, **state)
    home_b = relay_home(tmp_path, "b", materials, pg_dsn, echo_server.port, **state)
    migrate(home_a)
    relay_a, _ = start_relay(procs, home_a)
    relay_b, address_b = start_relay(procs, home_b)
    token = issue(home_a)
    on_b, sid_b = open_tunnel(home_b, address_b, "build42", token)
    deadline = time.monotonic() + READY_TIMEOUT
    while [s["id"] for s in cluster_sessions(home_a)] != [sid_b]:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    relay_b.send_signal(signal.SIGKILL)
    relay_b.wait()

    # Nobody renews B's row now: it is listed until its lease, which ends within
    # LEASE, runs out.  Its end is brought forward rather than waited for.
    assert [s["id"] for s in cluster_sessions(home_a)] == [sid_b]
    holder = expire_pg_lease(pg_dsn, sid_b, LEASE)
    assert holder.split(":")[1] == str(relay_b.popen.pid)
    assert cluster_sessions(home_a) == []
    on_b.close()


def watching_pair(
    procs: ProcGroup,
    tmp_path: Path,
    materials: Path,
    pg_dsn: str,
    echo_server: EchoServer,
    watched: dict,
) -> tuple[Path, Path, Proc, Proc, str]:
    """Relays A and B with a watched target; A holds the watcher lock once this returns."""
    home_a, home_b = (
        relay_home(tmp_path, name, materials, pg_dsn, echo_server.port, target_keys=watched)
        for name in ("a", "b")
    )
    migrate(home_a)
    relay_a, _ = start_relay(procs, home_a)
    relay_a.wait_event("state.watch_leader")
    relay_b, address_b = start_relay(procs, home_b)
    return home_a, home_b, relay_a, relay_b, address_b


def test_one_relay_watches_for_forgotten_servers_and_counts_tunnels_on_the_others(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    watched = {
        "idle_timeout": "1s",
        "probe_interval": "0.1s",
        "on_idle": ["sh", "-c", "echo stop it"],
    }
    home_a, home_b, relay_a, relay_b, address_b = watching_pair(
        procs, tmp_path, materials, pg_dsn, echo_server, watched
    )
    # Nobody uses the target: the watching relay reports it once.
    first = relay_a.wait_event("on_idle.ran", trigger="forgotten")
    token = issue(home_a)

    tls, sid = open_tunnel(home_b, address_b, "build42", token)
    relay_a.wait_event("state.busy_elsewhere", targets=["build42"])
    echo(tls, b"in use")
    tls.close()
    relay_b.wait_event("session.closed", session_id=sid)
    relay_a.wait_event("state.busy_elsewhere", targets=[])

    # The tunnel on B started a new idle spell on A, which runs on_idle when it ends
    # (through the idle trigger or the probe, whichever looks first).
    relay_a.wait_line(
        lambda line: '"on_idle.ran"' in line and json.loads(line)["time"] > first["time"]
    )
    # B never watched while A held the lock.
    assert relay_b.events("state.watch_leader") == []
    assert relay_b.events("on_idle.ran") == [] and relay_b.events("server.forgotten") == []

    relay_a.send_signal(signal.SIGKILL)
    relay_a.wait()
    # PostgreSQL releases the dead relay's lock with its connection: B takes over.
    relay_b.wait_event("state.watch_leader")


def assert_spell_ran_from(
    proc: Proc, closed: dict, freed: dict, idle_timeout: float, **match: object
) -> None:
    """The watcher's ``server.forgotten`` and ``on_idle.ran`` for build42 came late enough.

    Of the records logged after ``freed`` (and matching ``match``), each
    comes ``idle_timeout`` or more after ``closed``: the idle spell ran
    from that tunnel's close.
    """

    def at(record: dict) -> float:
        return datetime.fromisoformat(record["time"]).timestamp()

    for event in ("server.forgotten", "on_idle.ran"):
        line = proc.wait_line(
            lambda line, event=event: (
                f'"{event}"' in line
                and (record := json.loads(line))["event"] == event
                and record.get("target") == "build42"
                and record["time"] > freed["time"]
                and all(record.get(key) == value for key, value in match.items())
            )
        )
        record = json.loads(line)
        assert at(record) >= at(closed) + idle_timeout, (closed, record)


def test_a_tunnel_that_opened_and_closed_elsewhere_between_the_watchers_looks_restarts_its_spell(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    import psycopg

    idle_timeout = 3.0
    watched = {"idle_timeout": f"{idle_timeout:g}s", "probe_interval": "0.1s", "on_idle": ["true"]}
    home_a, home_b, relay_a, relay_b, address_b = watching_pair(
        procs, tmp_path, materials, pg_dsn, echo_server, watched
    )
    token = issue(home_a)
    # A tunnel on B that A sees: its close starts an idle spell on A.
    tls, _ = open_tunnel(home_b, address_b, "build42", token)
    relay_a.wait_event("state.busy_elsewhere", targets=["build42"])
    tls.close()
    freed = relay_a.wait_event("state.busy_elsewhere", targets=[])
    # The short tunnel stays in use for half the idle timeout: a report timed
    # from the spell above would come that much before one timed from its close.
    in_use_until = time.monotonic() + idle_timeout / 2

    # While A looks at nothing, a short tunnel on B opens and closes, and B deletes its row.
    relay_a.send_signal(signal.SIGSTOP)
    try:
        short, sid = open_tunnel(home_b, address_b, "build42", token)
        while time.monotonic() < in_use_until:
            echo(short, b"in use")
            time.sleep(0.1)
        short.close()
        closed = relay_b.wait_event("session.closed", session_id=sid)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            deadline = time.monotonic() + READY_TIMEOUT
            sql = "SELECT count(*) FROM dbgrelay_sessions WHERE id = %s"
            while conn.execute(sql, (sid,)).fetchone() != (0,):
                assert time.monotonic() < deadline, "B kept the closed session's row"
                time.sleep(0.02)
    finally:
        relay_a.send_signal(signal.SIGCONT)

    # A's idle spell runs from the short tunnel's close, which it never saw open.
    assert_spell_ran_from(relay_a, closed, freed, idle_timeout)
    relay_a.stop()
    relay_b.stop()


#: A managed debug server stand-in: echoes on 127.0.0.1:PORT until killed.
ECHO_SERVER = (
    "import socket, sys, threading\n"
    "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
    "def echo(c):\n"
    "    while data := c.recv(65536):\n"
    "        c.sendall(data)\n"
    "while True:\n"
    "    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()\n"
)


def request_tunnel(home: Path, address: str, token: str) -> Any:
    """A tunnel, or the refusal's answer when the relay refused it."""
    tls = tls_connect(address, home / "pki" / "ca.pem")
    answer = request(tls, "build42", token)
    if answer.status == 200:
        return tls
    tls.close()
    return answer


def test_one_relay_at_a_time_runs_a_managed_server_and_a_dead_ones_claim_lapses(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    managed = {
        "backend": "tcp://127.0.0.1:{port}",
        # Run as the target account: an interpreter that account can execute.
        "launch": [accounts.public_python(), "-I", "-c", ECHO_SERVER, "{port}"],
        "idle_timeout": "1h",
    }
    home_a, home_b = (
        relay_home(tmp_path, name, materials, pg_dsn, echo_server.port, target_keys=managed)
        for name in ("a", "b")
    )
    migrate(home_a)
    relay_a, address_a = start_relay(procs, home_a)
    relay_b, address_b = start_relay(procs, home_b)
    token = issue(home_a)

    on_a, _ = open_tunnel(home_a, address_a, "build42", token)
    echo(on_a, b"served by a")
    launched = relay_a.wait_event("server.launched", target="build42")
    answer = refused(home_b, address_b, "build42", token)
    assert (answer.status, answer.reason) == (502, "server_elsewhere")
    assert relay_b.events("server.launched") == []

    relay_a.send_signal(signal.SIGKILL)
    relay_a.wait()
    # The launcher shim takes the server with the relay; PostgreSQL drops A's claim
    # once its backend process sees the connection gone (milliseconds): poll for it.
    deadline = time.monotonic() + READY_TIMEOUT
    while not isinstance(on_b := request_tunnel(home_b, address_b, token), ssl.SSLSocket):
        assert on_b.reason == "server_elsewhere", (on_b.status, on_b.reason)
        assert time.monotonic() < deadline, "relay A's claim did not lapse"
        time.sleep(0.05)
    echo(on_b, b"served by b")
    assert relay_b.wait_event("server.launched", target="build42")["pid"] != launched["pid"]
    # Relay A's server died with it.
    deadline = time.monotonic() + READY_TIMEOUT
    while Path(f"/proc/{launched['pid']}").exists():
        assert time.monotonic() < deadline, "relay A's managed server outlived it"
        time.sleep(0.05)
    on_a.close()
    on_b.close()


def with_user_cap(home: Path, cap: int) -> Path:
    """``home`` with ``[limits] max_sessions_per_user = cap``."""
    config = home / "dbgrelay.toml"
    config.write_text(config.read_text() + f"[limits]\nmax_sessions_per_user = {cap}\n")
    return home


def test_a_per_user_cap_holds_across_relays_and_a_killed_relays_slots_expire_with_its_lease(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    state = {"session_lease": f"{LEASE:g}s"}
    home_a, home_b = (
        with_user_cap(relay_home(tmp_path, name, materials, pg_dsn, echo_server.port, **state), 2)
        for name in ("a", "b")
    )
    migrate(home_a)
    relay_a, address_a = start_relay(procs, home_a)
    relay_b, address_b = start_relay(procs, home_b)
    alice, bob = issue(home_a), issue(home_a, "bob")
    first, _ = open_tunnel(home_a, address_a, "build42", alice)
    second, second_sid = open_tunnel(home_a, address_a, "build42", alice)

    # Alice is at her cap on A: B refuses her, without waiting for A's renewal.
    answer = refused(home_b, address_b, "build42", alice)
    assert (answer.status, answer.reason) == (429, "user_sessions")
    # The log line that says why (the audit record before it has no message).
    assert relay_b.wait_line(lambda line: '"tunnel.refused"' in line and "in the cluster" in line)
    # Each refusal came after B took a session file made ahead of time; none is
    # left behind (open, or as a file with nothing of its session in it).
    for _ in range(POOL_SIZE + 1):
        assert refused(home_b, address_b, "build42", alice).reason == "user_sessions"
    header_only = [
        path
        for path in (home_b / "state" / "audit").rglob("*.jsonl")
        if not path.name.startswith("relay-") and len(path.read_text().splitlines()) == 1
    ]
    assert len(header_only) <= POOL_SIZE, header_only
    # Another user is not held back by her.
    other, _ = open_tunnel(home_b, address_b, "build42", bob)
    echo(other, b"bob")
    # One of hers ends on A: B admits her again.
    first.close()
    relay_a.wait_event("session.closed")
    deadline = time.monotonic() + READY_TIMEOUT
    while not isinstance(on_b := request_tunnel(home_b, address_b, alice), ssl.SSLSocket):
        assert on_b.reason == "user_sessions", (on_b.status, on_b.reason)
        assert time.monotonic() < deadline, "the closed session still counted"
        time.sleep(0.05)
    echo(on_b, b"alice on b")
    assert refused(home_a, address_a, "build42", alice).reason == "user_sessions"

    relay_a.send_signal(signal.SIGKILL)
    relay_a.wait()
    # Nobody renews A's row now: it counts until its lease, which ends within
    # LEASE, runs out.  Its end is brought forward rather than waited for.
    assert refused(home_b, address_b, "build42", alice).reason == "user_sessions"
    holder = expire_pg_lease(pg_dsn, second_sid, LEASE)
    assert holder.split(":")[1] == str(relay_a.popen.pid)
    # B counts the rows at each claim: the next tunnel is admitted at once.
    again = request_tunnel(home_b, address_b, alice)
    assert isinstance(again, ssl.SSLSocket), (again.status, again.reason)
    echo(again, b"freed")
    assert refused(home_b, address_b, "build42", alice).reason == "user_sessions"
    for tls in (second, other, on_b, again):
        tls.close()


def test_relays_admitting_one_user_at_once_never_exceed_the_cap(
    procs: ProcGroup, tmp_path: Path, materials: Path, pg_dsn: str, echo_server: EchoServer
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    homes = [
        with_user_cap(relay_home(tmp_path, name, materials, pg_dsn, echo_server.port), 3)
        for name in ("a", "b", "c")
    ]
    migrate(homes[0])
    addresses = [start_relay(procs, home)[1] for home in homes]
    token = issue(homes[0])
    barrier = threading.Barrier(12)

    def attempt(index: int) -> Any:
        home, address = homes[index % 3], addresses[index % 3]
        tls = tls_connect(address, home / "pki" / "ca.pem")
        barrier.wait()
        answer = request(tls, "build42", token)
        if answer.status == 200:
            return tls
        tls.close()
        return answer

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(attempt, range(12)))

    admitted = [r for r in results if isinstance(r, ssl.SSLSocket)]
    refusals = [(r.status, r.reason) for r in results if not isinstance(r, ssl.SSLSocket)]
    assert len(admitted) == 3, refusals
    assert refusals == [(429, "user_sessions")] * 9
    for tls in admitted:
        echo(tls, b"one of three")
        tls.close()


def probe(address: str, path: str) -> tuple[int, bytes]:
    """``GET path`` on the ops (metrics) endpoint, as a Kubernetes probe does."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_readiness_turns_503_when_the_state_is_down_past_the_grace_and_liveness_stays_ok(
    procs: ProcGroup,
    tmp_path: Path,
    materials: Path,
    pg_server: PgServer,
    pg_dsn: str,
    echo_server: EchoServer,
) -> None:
    home = relay_home(tmp_path, "a", materials, pg_dsn, echo_server.port, unavailable_grace="0")
    config = home / "dbgrelay.toml"
    config.write_text(
        config.read_text().replace('[metrics]\nlisten = ""', '[metrics]\nlisten = "127.0.0.1:0"')
    )
    migrate(home)
    relay, address = start_relay(procs, home)
    ops = relay.wait_event("metrics.listening")["address"]
    token = issue(home)
    assert probe(ops, "/readyz") == (200, b"ready\n")

    pg_server.stop()
    try:
        relay.wait_event("state.unavailable")
        # The relay would refuse new tunnels, so the load balancer must stop sending them.
        assert probe(ops, "/readyz") == (503, b"unready: state_unavailable\n")
        assert refused(home, address, "build42", token).reason == "state_unavailable"
        assert probe(ops, "/healthz") == (200, b"ok\n")
    finally:
        pg_server.start()

    relay.wait_event("state.recovered")
    assert probe(ops, "/readyz") == (200, b"ready\n")
    tls, _ = open_tunnel(home, address, "build42", token)
    echo(tls, b"ready again")
    tls.close()
