"""``serve --workers N`` with SQLite: caps, watching and the admin API cover every worker.

Real processes on loopback.  Which worker accepts a connection is not left
to the kernel's hash: a worker that holds a tunnel is made to drain (SIGTERM
to it alone: it closes its listener and keeps its tunnels), or is killed
while the supervisor is stopped (SIGSTOP: no restart), so every new
connection goes to the other worker, the only one still listening.  A
worker stopped with SIGSTOP still listens: a connection the kernel queues
for it is found in its accept queue (``/proc/net/tcp``) and replaced by a
new one (:func:`connect_past_stopped`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.workers import reuseport_available

from .. import accounts
from ..echo import EchoServer
from .leases import expire_sqlite_lease
from .support import READY_TIMEOUT, Proc, ProcGroup, config_text, free_port, start_relay
from .test_operations import EOF_TIMEOUT, echo, issue, open_tunnel, refused, target
from .test_several_relays import assert_spell_ran_from, request_tunnel
from .test_workers import ATTEMPTS, worker_sessions

pytestmark = pytest.mark.skipif(
    not reuseport_available(), reason="this platform has no SO_REUSEPORT"
)


def start_workers(
    procs: ProcGroup, home: Path, targets: list[dict], *, relay: str = "", limits: str = ""
) -> tuple[Proc, str, dict[int, int]]:
    """A supervisor with two workers; its address and the workers' pids by index."""
    port = free_port()
    text = config_text(targets).replace(
        'listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{port}"]\n{relay}'
    )
    # Long enough that a worker made to drain keeps its tunnels for the whole test.
    text = text.replace('shutdown_grace = "1s"', 'shutdown_grace = "60s"')
    (home / "dbgrelay.toml").write_text(text + limits)
    supervisor = procs.dbgrelay(
        "serve", "--config", "dbgrelay.toml", "--workers", "2", cwd=home, name="supervisor"
    )
    pids = {i: supervisor.wait_event("relay.listening", worker=i)["pid"] for i in (0, 1)}
    return supervisor, f"127.0.0.1:{port}", pids


@pytest.fixture
def backend(echo_server: EchoServer) -> EchoServer:
    """The targets' backend: an echo server on loopback."""
    return echo_server


@pytest.fixture
def workers(procs: ProcGroup, home: Path) -> Iterator[Callable[..., tuple[Proc, str, dict]]]:
    """:func:`start_workers` in ``home``; a supervisor a failed test left stopped is resumed."""
    started: list[Proc] = []

    def start(targets: list[dict], **config: str) -> tuple[Proc, str, dict[int, int]]:
        supervisor, address, pids = start_workers(procs, home, targets, **config)
        started.append(supervisor)
        return supervisor, address, pids

    yield start
    for supervisor in started:
        supervisor.send_signal(signal.SIGCONT)


def tcp_rows() -> list[list[str]]:
    """The rows of ``/proc/net/tcp``, split into columns.

    Columns: sl, local address (hex ip:port), remote address, state (0A:
    LISTEN), tx_queue:rx_queue (hex), tr:tm->when, retrnsmt, uid, timeout,
    inode.
    """
    return [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]


def listening_rows(address: str) -> list[list[str]]:
    """The ``/proc/net/tcp`` rows of the sockets listening on ``address`` (IPv4 ``host:port``)."""
    port = int(address.rsplit(":", 1)[1])
    return [cols for cols in tcp_rows() if cols[1].endswith(f":{port:04X}") and cols[3] == "0A"]


def listeners(address: str) -> int:
    """How many sockets listen on ``address`` (an IPv4 ``host:port``)."""
    return len(listening_rows(address))


def kill_held(supervisor: Proc, pid: int, address: str) -> None:
    """SIGKILL worker ``pid`` with the supervisor stopped: it is not restarted until resumed.

    Returns once its listening socket is closed (the last of its threads has
    exited), so the other worker takes every new connection.
    """
    supervisor.send_signal(signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + READY_TIMEOUT
    while listeners(address) != 1:
        assert time.monotonic() < deadline, f"worker {pid} still listens"
        time.sleep(0.02)


def resume(supervisor: Proc, index: int, old_pid: int) -> int:
    """Let the supervisor run again; the pid of worker ``index`` once restarted and listening."""
    supervisor.send_signal(signal.SIGCONT)
    line = supervisor.wait_line(
        lambda line: (
            '"relay.listening"' in line
            and f'"worker": {index}' in line
            and f'"pid": {old_pid}' not in line
        )
    )
    return json.loads(line)["pid"]


def tunnel_on_1(
    supervisor: Proc, home: Path, address: str, pids: dict[int, int], token: str, name: str
) -> tuple[ssl.SSLSocket, str]:
    """A tunnel held by worker 1: opened while worker 0 is dead, then worker 0 is restarted."""
    kill_held(supervisor, pids[0], address)
    tls, sid = open_tunnel(home, address, name, token)
    assert sid in worker_sessions(home, 1)
    pids[0] = resume(supervisor, 0, pids[0])
    return tls, sid


def admin_get(home: Path, path: str) -> dict:
    """``GET path`` on ``admin.sock`` (worker 0's admin endpoint)."""
    import trio

    from config import load_config
    from relay.admin_client import AdminEndpoint, admin_request

    endpoint = AdminEndpoint.from_config(load_config(home / "dbgrelay.toml"))
    return trio.run(admin_request, endpoint, "GET", path)


def refused_while_1_drains(supervisor, home, address, pids, target, token, *, event, says):
    """Drain worker 1 (its tunnels stay) and have worker 0 refuse the next tunnel.

    Returns the refusal, once worker 0 logged ``event`` with ``says`` in it
    (the audit record before it has no message).
    """
    os.kill(pids[1], signal.SIGTERM)
    supervisor.wait_event("relay.draining", worker=1)
    answer = refused(home, address, target, token)
    assert supervisor.wait_line(
        lambda line: f'"{event}"' in line and '"worker": 0' in line and says in line
    )
    return answer


def test_a_user_at_the_cap_on_one_worker_is_refused_on_the_other_and_max_sessions_is_per_host(
    workers: Callable, home: Path, backend: EchoServer
) -> None:
    supervisor, address, pids = workers(
        [target("build42", backend.port)],
        relay="max_sessions = 2",
        limits="[limits]\nmax_sessions_per_user = 1\n",
    )
    alice, bob, carol = (issue(home, user) for user in ("alice", "bob", "carol"))
    held, sid = tunnel_on_1(supervisor, home, address, pids, alice, "build42")
    echo(held, b"alice on worker 1")

    # Worker 0's admin endpoint finds the session worker 1 holds.
    shown = admin_get(home, f"/v1/sessions/{sid}")
    assert (shown["id"], shown["user"], shown["worker"]) == (sid, "alice", 1)

    # Worker 1 drains (its tunnel stays): every new connection goes to worker 0.
    answer = refused_while_1_drains(
        supervisor, home, address, pids, "build42", alice,
        event="tunnel.refused", says="already has 1 tunnels open on this host",
    )  # fmt: skip
    assert (answer.status, answer.reason) == (429, "user_sessions")
    # Another user is not held back; the host's second tunnel fills max_sessions = 2.
    on_0, bob_sid = open_tunnel(home, address, "build42", bob)
    assert bob_sid in worker_sessions(home, 0)
    answer = refused(home, address, "build42", carol)
    assert (answer.status, answer.reason) == (503, "relay_full")
    echo(held, b"alice still served during worker 1's drain")

    # Alice's tunnel ends: worker 1 finishes its drain, its row goes, she is admitted.
    held.close()
    supervisor.wait_event("worker.exited", worker=1)
    again = request_tunnel(home, address, alice)
    assert isinstance(again, ssl.SSLSocket), again
    echo(again, b"alice again")
    for tls in (on_0, again):
        tls.close()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, supervisor.output()


#: ``session_lease``, seconds: longer than any test, so a dead worker's rows stay
#: until the supervisor restarts it or the test ends their lease, never before.
LEASE = 3600.0


def held_by_dead_worker_1(
    workers: Callable, home: Path, backend: EchoServer
) -> tuple[Proc, str, dict[int, int], str, str]:
    """Alice (cap 1) had a tunnel on worker 1, killed now with the supervisor stopped.

    Returns the supervisor, its address, the workers' pids, alice's token and
    the session id of her tunnel.
    """
    supervisor, address, pids = workers(
        [target("build42", backend.port)],
        limits=f'[limits]\nmax_sessions_per_user = 1\n[state]\nsession_lease = "{LEASE:g}s"\n',
    )
    alice = issue(home)
    held, sid = tunnel_on_1(supervisor, home, address, pids, alice, "build42")
    kill_held(supervisor, pids[1], address)
    held.close()
    return supervisor, address, pids, alice, sid


def test_a_killed_workers_sessions_stop_counting_once_the_supervisor_restarts_it(
    workers: Callable, home: Path, backend: EchoServer
) -> None:
    supervisor, address, pids, alice, _ = held_by_dead_worker_1(workers, home, backend)
    # Worker 1 is not restarted yet: its row still counts (the lease runs for
    # an hour), on worker 0, the only one listening.
    answer = refused(home, address, "build42", alice)
    assert (answer.status, answer.reason) == (429, "user_sessions")

    # Its successor removes the rows it left before serving: alice gets in.
    resume(supervisor, 1, pids[1])
    cleared = supervisor.wait_event("state.rows_cleared", worker=1)
    assert cleared["sessions"] == 1
    again = request_tunnel(home, address, alice)
    assert isinstance(again, ssl.SSLSocket), again
    echo(again, b"freed")
    again.close()


def test_a_killed_workers_sessions_stop_counting_when_their_lease_expires(
    workers: Callable, home: Path, backend: EchoServer
) -> None:
    supervisor, address, pids, alice, sid = held_by_dead_worker_1(workers, home, backend)
    # Nobody restarts worker 1 and nobody renews its row: it counts until its
    # lease, which ends within LEASE, runs out.  Its end is brought forward
    # rather than waited for.
    answer = refused(home, address, "build42", alice)
    assert (answer.status, answer.reason) == (429, "user_sessions")
    holder = expire_sqlite_lease(home / "state" / "tokens.sqlite", sid, LEASE)
    assert holder.split(":")[1] == str(pids[1])
    # Worker 0 counts the rows at each claim: the next tunnel is admitted at once.
    again = request_tunnel(home, address, alice)
    assert isinstance(again, ssl.SSLSocket), (again.status, again.reason)
    echo(again, b"freed")
    again.close()
    supervisor.send_signal(signal.SIGCONT)


def test_worker_0_watches_for_forgotten_servers_counting_the_tunnels_of_worker_1(
    workers: Callable, home: Path, backend: EchoServer
) -> None:
    watched = {"idle_timeout": "2s", "probe_interval": "0.1s", "on_idle": ["true"]}
    supervisor, address, pids = workers(
        [
            target("build42", backend.port) | watched,
            # Reported forgotten by the same watcher: proves it has been looking.
            target("marker", backend.port) | watched,
        ],
        limits='[state]\nsession_lease = "1.5s"\n',
    )
    token = issue(home)
    # Bytes keep the tunnel within its own idle timeout (the target's, 2 s)
    # from its start, through worker 0's restart.
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(0.2):
            echo(held, b"in use")

    kill_held(supervisor, pids[0], address)
    held, sid = open_tunnel(home, address, "build42", token)
    assert sid in worker_sessions(home, 1)
    alive = threading.Thread(target=keep_alive)
    alive.start()
    try:
        watcher = resume(supervisor, 0, pids[0])  # its idle spells start now
        supervisor.wait_event("state.busy_elsewhere", pid=watcher, targets=["build42"])
        # Past the idle timeout, the unused target is reported; build42 is in use on worker 1.
        supervisor.wait_event("server.forgotten", pid=watcher, target="marker")
    finally:
        stop.set()
        alive.join()
    echo(held, b"still open")
    held.close()
    freed = supervisor.wait_event("state.busy_elsewhere", pid=watcher, targets=[])

    def reports(name: str) -> list[dict]:
        return [
            r
            for event in ("server.forgotten", "on_idle.ran")
            for r in supervisor.events(event)
            if r.get("pid") == watcher and r.get("target") == name
        ]

    # Nothing about build42 while the tunnel on worker 1 was open ...
    assert [r for r in reports("build42") if r["time"] <= freed["time"]] == []
    # ... and its idle spell started when that tunnel closed: on_idle runs after it.
    ran = supervisor.wait_event("on_idle.ran", pid=watcher, target="build42")
    assert ran["time"] > freed["time"]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, supervisor.output()


def listening_socket(address: str, pid: int) -> str:
    """The inode of process ``pid``'s socket listening on ``address`` (an IPv4 ``host:port``)."""
    listening = {cols[9] for cols in listening_rows(address)}
    fds = Path(f"/proc/{pid}/fd")
    held = {os.readlink(fd).removeprefix("socket:[").removesuffix("]") for fd in fds.iterdir()}
    (inode,) = listening & held
    return inode


def accept_backlog(inode: str) -> int:
    """How many connections wait in the accept queue of listening socket ``inode``.

    For a LISTEN socket the rx_queue column of ``/proc/net/tcp`` is that count.
    """
    (cols,) = [cols for cols in tcp_rows() if cols[9] == inode and cols[3] == "0A"]
    return int(cols[4].split(":")[1], 16)


def accepted(port: int, client_port: int) -> bool:
    """Whether the relay's end of the connection from ``client_port`` was accepted.

    A connection still in an accept queue has no socket file yet: its inode
    column is 0 until a process accepts it.
    """
    return any(
        cols[1].endswith(f":{port:04X}")
        and cols[2].endswith(f":{client_port:04X}")
        and cols[9] != "0"
        for cols in tcp_rows()
    )


def stop(pid: int) -> None:
    """SIGSTOP process ``pid``; returns once every one of its threads has stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        states = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue  # a thread that exited meanwhile
        if states <= {"T"}:
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.005)


#: The byte of a WAL database's ``-shm`` file whose exclusive POSIX lock is
#: SQLite's write lock (WALINDEX_LOCK_OFFSET + WAL_WRITE_LOCK in SQLite's wal.c).
WAL_WRITE_LOCK = 120


def writes_sqlite(pid: int, db: Path) -> bool:
    """Whether process ``pid`` holds SQLite's write lock on WAL database ``db`` (/proc/locks)."""
    shm = db.with_name(db.name + "-shm").stat()
    file = f"{os.major(shm.st_dev):02x}:{os.minor(shm.st_dev):02x}:{shm.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        # id: POSIX ADVISORY WRITE|READ pid maj:min:inode start end; "->" marks a waiter.
        cols = line.split()
        if "->" in cols or cols[1] != "POSIX" or cols[3] != "WRITE":
            continue
        end = cols[7]
        if (
            int(cols[4]) == pid
            and cols[5] == file
            and int(cols[6]) <= WAL_WRITE_LOCK
            and (end == "EOF" or WAL_WRITE_LOCK <= int(end))
        ):
            return True
    return False


def stop_between_writes(pid: int, db: Path) -> None:
    """SIGSTOP worker ``pid`` at a moment it holds no write lock on SQLite ``db``.

    Stopped inside a write transaction (a registration round, a look at the
    table), it would keep SQLite's write lock, and the other worker's claims
    would wait for it.  Whether it holds the lock is read from
    ``/proc/locks`` once every thread has stopped; if it does, it runs again
    until it has released the lock, and is stopped anew.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        stop(pid)
        if not writes_sqlite(pid, db):
            return
        os.kill(pid, signal.SIGCONT)
        while writes_sqlite(pid, db):
            assert time.monotonic() < deadline, f"worker {pid} keeps SQLite's write lock"
            time.sleep(0.005)
        assert time.monotonic() < deadline, f"worker {pid} keeps taking SQLite's write lock"


def connect_past_stopped(address: str, pid: int) -> socket.socket:
    """A TCP connection to ``address`` that a running worker accepted, not stopped worker ``pid``.

    With SO_REUSEPORT the kernel queues each new connection on one of the
    sockets listening on the port, by a hash of its addresses and ports; a
    stopped worker's socket still listens, and a connection queued there
    waits until the worker runs again.  Where this one went is read from the
    kernel's tables (``/proc/net/tcp``), no clock involved: either the
    stopped worker's accept queue grew by one (it is queued there: it is
    closed, and a new connection, from a new source port, is hashed anew),
    or the relay's end of it has a socket inode, which only an ``accept()``
    gives it, and the stopped worker accepts nothing.

    Args:
        address: The workers' IPv4 ``host:port``.
        pid: The stopped worker (:func:`stop`), which must stay stopped
            while the connection is used.
    """
    host, port = address.rsplit(":", 1)
    inode = listening_socket(address, pid)
    for _ in range(ATTEMPTS):
        queued = accept_backlog(inode)
        raw = socket.create_connection((host, int(port)), timeout=EOF_TIMEOUT)
        client_port = raw.getsockname()[1]
        deadline = time.monotonic() + READY_TIMEOUT
        while accept_backlog(inode) == queued:
            if accepted(int(port), client_port):
                return raw
            assert time.monotonic() < deadline, f"nobody accepted port {client_port}'s connection"
            time.sleep(0.005)
        raw.close()
    raise AssertionError(f"{ATTEMPTS} connections in a row went to stopped worker {pid}")


def wait_row_deleted(db: Path, session_id: str) -> None:
    """Return once ``session_id`` has no row in the ``live_sessions`` table of SQLite ``db``."""
    # The workers write to the file meanwhile: wait for their lock, bounded.
    conn = sqlite3.connect(db, timeout=READY_TIMEOUT, isolation_level=None)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        sql = "SELECT count(*) FROM live_sessions WHERE id = ?"
        while conn.execute(sql, (session_id,)).fetchone() != (0,):
            assert time.monotonic() < deadline, f"the closed session {session_id} kept its row"
            time.sleep(0.02)
    finally:
        conn.close()


def test_a_tunnel_that_opened_and_closed_on_worker_1_while_worker_0_was_stopped_restarts_its_spell(
    workers: Callable, home: Path, backend: EchoServer
) -> None:
    idle_timeout = 3.0
    watched = {"idle_timeout": f"{idle_timeout:g}s", "probe_interval": "0.1s", "on_idle": ["true"]}
    # Rounds every half second: worker 0 sees worker 1's tunnels open and close soon.
    supervisor, address, pids = workers(
        [target("build42", backend.port) | watched], limits='[state]\nsession_lease = "1.5s"\n'
    )
    db = home / "state" / "tokens.sqlite"
    token = issue(home)

    def on_1() -> tuple[ssl.SSLSocket, str]:
        """A tunnel held by worker 1, opened while worker 0 is stopped."""
        raw = connect_past_stopped(address, pids[0])
        tls, sid = open_tunnel(home, address, "build42", token, raw)
        assert sid in worker_sessions(home, 1)
        return tls, sid

    # A tunnel on worker 1 that worker 0 sees: its close starts an idle spell on worker 0.
    stop_between_writes(pids[0], db)
    try:
        tls, _ = on_1()
    finally:
        os.kill(pids[0], signal.SIGCONT)
    supervisor.wait_event("state.busy_elsewhere", pid=pids[0], targets=["build42"])
    tls.close()
    freed = supervisor.wait_event("state.busy_elsewhere", pid=pids[0], targets=[])
    # The short tunnel stays in use for half the idle timeout: a report timed
    # from the spell above would come that much before one timed from its close.
    in_use_until = time.monotonic() + idle_timeout / 2

    # While worker 0 looks at nothing, a short tunnel on worker 1 opens and
    # closes, and worker 1 deletes its row.
    stop_between_writes(pids[0], db)
    try:
        short, sid = on_1()
        while time.monotonic() < in_use_until:
            echo(short, b"in use")
            time.sleep(0.1)
        short.close()
        closed = supervisor.wait_event("session.closed", session_id=sid)
        wait_row_deleted(db, sid)
    finally:
        os.kill(pids[0], signal.SIGCONT)

    # Worker 0's idle spell runs from the short tunnel's close, which it never saw open.
    assert_spell_ran_from(supervisor, closed, freed, idle_timeout, pid=pids[0])
    # Worker 1 never watched.
    assert [
        r
        for event in ("server.forgotten", "on_idle.ran")
        for r in supervisor.events(event)
        if r.get("worker") == 1
    ] == []
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, supervisor.output()


def test_a_single_relay_counts_in_memory_and_writes_no_session_rows(
    procs: ProcGroup, home: Path, backend: EchoServer
) -> None:
    import sqlite3

    (home / "dbgrelay.toml").write_text(config_text([target("build42", backend.port)]))
    relay, address = start_relay(procs, home)
    tls, _ = open_tunnel(home, address, "build42", issue(home))
    echo(tls, b"one process")
    db = sqlite3.connect(home / "state" / "tokens.sqlite")
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()
    assert "revoked_jtis" in tables and "live_sessions" not in tables
    tls.close()
    relay.stop()


#: A managed debug server stand-in: echoes on 127.0.0.1:PORT, exits when it receives "quit".
QUITTING_SERVER = (
    "import os, socket, sys, threading\n"
    "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
    "def echo(c):\n"
    "    while data := c.recv(65536):\n"
    "        if data == b'quit':\n"
    "            os._exit(0)\n"
    "        c.sendall(data)\n"
    "while True:\n"
    "    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()\n"
)


def managed_servers(marker: str) -> set[int]:
    """Pids of the live (not zombie) launched servers whose command line holds ``marker``.

    The worker's log names the worker's pid on every line, so the server's own
    pid is found here.
    """
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        # The server itself, not the launcher shim whose command line ends with the server's.
        server = argv[2:4] == [b"-c", QUITTING_SERVER.encode()] and marker.encode() in argv
        if server and state != "Z":
            found.add(int(entry.name))
    return found


def wait_exited(pid: int) -> None:
    """Return once process ``pid`` has exited (a zombie or gone): its descriptors are closed."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.02)


def test_one_worker_at_a_time_runs_a_managed_server_and_a_killed_ones_claim_lapses(
    workers: Callable, home: Path, backend: EchoServer
) -> None:
    marker = f"dbgrelay-test-{os.getpid()}-{time.monotonic_ns()}"
    managed = {
        "backend": "tcp://127.0.0.1:{port}",
        # Run as the target account: an interpreter that account can execute.
        "launch": [accounts.public_python(), "-I", "-c", QUITTING_SERVER, "{port}", marker],
        "idle_timeout": "1h",
    }
    supervisor, address, pids = workers(
        [target("build42", backend.port) | managed, target("plain", backend.port)]
    )
    token = issue(home, target_glob="*")

    # Worker 0 is dead: worker 1 launches the server for a tunnel it holds.
    kill_held(supervisor, pids[0], address)
    on_1, sid = open_tunnel(home, address, "build42", token)
    assert sid in worker_sessions(home, 1)
    echo(on_1, b"served by worker 1")
    supervisor.wait_event("server.launched", worker=1, target="build42")
    (first,) = managed_servers(marker)
    # A tunnel to a plain target keeps worker 1 alive through its drain.
    keeper, _ = open_tunnel(home, address, "plain", token)
    pids[0] = resume(supervisor, 0, pids[0])

    # Worker 1 drains (its tunnels and its server stay): new connections go to worker 0,
    # which refuses to launch a second instance of the server.
    answer = refused_while_1_drains(
        supervisor, home, address, pids, "build42", token,
        event="backend.failed", says="its managed server runs on another worker",
    )  # fmt: skip
    assert (answer.status, answer.reason) == (502, "server_elsewhere")
    assert [r for r in supervisor.events("server.launched") if r["worker"] == 0] == []
    assert managed_servers(marker) == {first}

    # The server exits while worker 1 lives on: its claim goes with it, worker 0 launches.
    on_1.sendall(b"quit")
    supervisor.wait_event("server.exited", worker=1, target="build42")
    wait_exited(first)
    on_0, _ = open_tunnel(home, address, "build42", token)
    echo(on_0, b"served by worker 0")
    supervisor.wait_event("server.launched", worker=0, target="build42")
    (second,) = managed_servers(marker)
    assert second != first
    echo(keeper, b"worker 1 still there")

    # Worker 1 finishes its drain; the supervisor starts its successor.
    old_1 = pids[1]
    for tls in (on_1, keeper):
        tls.close()
    supervisor.wait_event("worker.exited", worker=1)
    listening = supervisor.wait_line(
        lambda line: (
            '"relay.listening"' in line and '"worker": 1' in line and f'"pid": {old_1}' not in line
        )
    )
    pids[1] = json.loads(listening)["pid"]
    # While worker 0 runs the server (draining, its tunnel stays), worker 1's successor
    # refuses too.
    os.kill(pids[0], signal.SIGTERM)
    supervisor.wait_event("relay.draining", worker=0, pid=pids[0])
    answer = refused(home, address, "build42", token)
    assert (answer.status, answer.reason) == (502, "server_elsewhere")
    echo(on_0, b"worker 0 still serves")
    kill_held(supervisor, pids[0], address)
    # Killed: its server died with it and the kernel dropped its claim.
    wait_exited(pids[0])
    wait_exited(second)
    on_1, _ = open_tunnel(home, address, "build42", token)
    echo(on_1, b"served by worker 1 again")
    supervisor.wait_event("server.launched", worker=1, target="build42")
    (third,) = managed_servers(marker)
    assert third not in (first, second)
    on_0.close()
    on_1.close()
    supervisor.send_signal(signal.SIGCONT)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, supervisor.output()
