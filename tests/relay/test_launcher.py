"""The launcher shim, run as the relay runs it: a real subprocess on a control socket.

Each test waits for the shim's JSON reports (events), bounded by a real
timeout; the only real-time deadline is the shim's own ``--kill-grace``,
kept at a fraction of a second where a test needs it to pass.  Under root
(CI) the shim runs its servers as the target account; otherwise as our own
account in an unprivileged user namespace (development mode).
"""

from __future__ import annotations

import array
import json
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.privsep import LAUNCHER

from .. import accounts
from ..processes import is_gone

WAIT = 10.0  # seconds a test waits for a report before failing


class Shim:
    """``python -I launcher.py ... -- CMD...`` with its control socket in our hands."""

    def __init__(
        self,
        *command: str,
        grace: float = 5.0,
        log: Path,
        run_as: str | None = None,
        listen: str | None = None,
        forbid_uid: int | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.log = log
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = ["--kill-grace", str(grace), "--run-as", run_as or accounts.target_account()]
        args += ["--forbid-uid", str(os.getuid() if forbid_uid is None else forbid_uid)]
        if listen is not None:
            args += ["--listen", listen]
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [*prefix, PY if prefix else sys.executable, "-I", str(LAUNCHER), *args]
                + ["--", *command],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        theirs.close()

    def report(self, sock: socket.socket | None = None) -> dict | None:
        """The next JSON report on the control socket (or ``sock``), or None at EOF."""
        sock = sock or self.control
        ready, _, _ = select.select([sock], [], [], WAIT)
        assert ready, f"no report from the launcher within {WAIT}s; log: {self.log_text()}"
        data = sock.recv(65536)
        return json.loads(data) if data else None

    def started(self) -> int:
        report = self.report()
        assert report is not None and report["event"] == "started", report
        return report["pid"]

    def exited(self) -> dict:
        report = self.report()
        assert report is not None and report["event"] == "exited", report
        assert self.report() is None  # nothing follows the final report
        assert self.proc.wait(WAIT) == 0
        return report

    def send(self, data: bytes) -> None:
        self.control.send(data)

    def connect(self) -> tuple[dict, socket.socket | None]:
        """Ask for a connection to the server (``c``): the answer and the socket, if any."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = array.array("i", [theirs.fileno()])
        self.control.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        theirs.close()
        ready, _, _ = select.select([mine], [], [], WAIT)
        assert ready, f"no answer to 'c' within {WAIT}s; log: {self.log_text()}"
        received = array.array("i")
        data, ancdata, _, _ = mine.recvmsg(4096, socket.CMSG_SPACE(received.itemsize))
        mine.close()
        for _, _, payload in ancdata:
            received.frombytes(payload)
        conn = socket.socket(fileno=received[0]) if received else None
        return json.loads(data), conn

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.control.close()


@pytest.fixture
def shim(tmp_path: Path):
    """Start shims with ``shim(*command, grace=...)``; each is killed after the test."""
    started: list[Shim] = []

    def start(*command: str, grace: float = 5.0, **kw) -> Shim:
        s = Shim(*command, grace=grace, log=tmp_path / f"server{len(started)}.log", **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def wait_for_file(path: Path) -> str:
    """The file's first line once a process has written it (bounded)."""
    deadline = time.monotonic() + WAIT
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was not written within {WAIT}s"
        time.sleep(0.01)
    return path.read_text().splitlines()[0]


# The real interpreter: the venv below the checkout may be private to its owner.
PY = accounts.public_python()


def test_a_server_that_exits_by_itself_is_reported_with_its_status(shim):
    s = shim("sh", "-c", "exit 7")
    pid = s.started()
    report = s.exited()
    assert report == {
        "event": "exited",
        "pid": pid,
        "returncode": 7,
        "signal": None,
        "killed_by": None,
    }


def test_k_from_the_relay_terminates_the_server(shim):
    s = shim("sleep", "1000")
    pid = s.started()
    s.send(b"k")
    report = s.exited()
    assert (report["signal"], report["returncode"], report["killed_by"]) == (
        "SIGTERM",
        -signal.SIGTERM,
        "relay",
    )
    assert is_gone(pid)


def test_eof_on_the_control_socket_means_the_relay_died_and_kills_the_server(shim):
    s = shim("sleep", "1000")
    pid = s.started()
    s.control.shutdown(socket.SHUT_WR)  # what the kernel does when the relay is killed with -9
    report = s.exited()
    assert (report["signal"], report["killed_by"]) == ("SIGTERM", "relay_exited")
    assert is_gone(pid)


def test_sigterm_to_the_launcher_kills_the_server(shim):
    s = shim("sleep", "1000")
    pid = s.started()
    s.proc.send_signal(signal.SIGTERM)
    report = s.exited()
    assert (report["signal"], report["killed_by"]) == ("SIGTERM", "signal")
    assert is_gone(pid)


def test_a_server_that_ignores_sigterm_gets_sigkill_after_the_grace(shim, target_dir):
    ready = target_dir / "ready"
    code = (
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).write_text('x\\n'); time.sleep(1000)"
    )
    s = shim(PY, "-c", code, grace=0.2)
    pid = s.started()
    wait_for_file(ready)
    s.send(b"k")
    report = s.exited()
    assert (report["signal"], report["killed_by"]) == ("SIGKILL", "relay")
    assert is_gone(pid)


def test_a_descendant_that_left_the_server_session_dies_too(shim, target_dir):
    # Like gdbserver's inferior (its own process group), or a daemon (setsid).
    pidfile = target_dir / "grandchild"
    code = (
        "import subprocess, time, pathlib; "
        "p = subprocess.Popen(['sleep', '1000'], start_new_session=True); "
        f"pathlib.Path({str(pidfile)!r}).write_text(f'{{p.pid}}\\n'); time.sleep(1000)"
    )
    s = shim(PY, "-c", code)
    s.started()
    grandchild = int(wait_for_file(pidfile))
    s.send(b"k")
    s.exited()
    assert is_gone(grandchild)


def test_what_a_server_leaves_behind_when_it_exits_is_killed(shim, target_dir):
    pidfile = target_dir / "orphan"
    # The shell starts a detached sleep and exits at once: an orphan.
    s = shim("sh", "-c", f"setsid sleep 1000 & echo $! > {pidfile}")
    s.started()
    report = s.exited()
    assert report["returncode"] == 0 and report["killed_by"] is None
    assert is_gone(int(wait_for_file(pidfile)))


def test_server_output_goes_to_the_log_not_the_report_pipe(shim):
    fake = json.dumps({"event": "exited", "pid": 1, "returncode": 0})
    s = shim("sh", "-c", f"echo '{fake}'; echo 84; echo oops >&2; exit 3")
    s.started()
    report = s.exited()  # the fake report did not end the stream early
    assert report["returncode"] == 3
    assert s.log_text().splitlines() == [fake, "84", "oops"]


def test_a_missing_program_is_reported_as_failed(shim, target_dir):
    s = shim(str(target_dir / "no-such-server"), "--once")
    report = s.report()
    assert report["event"] == "failed"
    assert report["error"].startswith(f"{target_dir / 'no-such-server'}: No such file")
    assert s.report() is None
    assert s.proc.wait(WAIT) == 127


@pytest.mark.parametrize(
    "args",
    [[], ["sleep", "1"], ["--kill-grace", "soon", "--", "sleep", "1"], ["--"]],
    ids=["nothing", "no-separator", "bad-grace", "no-command"],
)
def test_bad_usage_exits_2_with_a_usage_line(args):
    done = subprocess.run(
        [sys.executable, "-I", str(LAUNCHER), *args], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("usage: launcher.py")


# -- the account and the private network -------------------------------------

SERVE = (
    "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); "
    "s.listen(); c, _ = s.accept(); c.sendall(b'hello from ' + sys.argv[1].encode()); "
    "c.recv(1)"
)


def test_the_server_runs_as_the_target_account_with_no_groups_and_no_new_privileges(
    shim, target_dir
):
    out = target_dir / "status"
    s = shim("sh", "-c", f"cat /proc/self/status > {out}; umask >> {out}")
    s.started()
    s.exited()
    status = dict(line.split(":", 1) for line in out.read_text().splitlines() if ":" in line)
    account = pwd.getpwnam(accounts.target_account())
    assert status["Uid"].split() == [str(account.pw_uid)] * 4
    assert status["Gid"].split() == [str(account.pw_gid)] * 4
    if accounts.is_root():
        assert status["Groups"].split() == []
    assert status["NoNewPrivs"].strip() == "1"
    assert out.read_text().splitlines()[-1] == "0077"


def test_c_hands_back_a_connection_to_the_server_made_inside_its_namespace(shim):
    port = 40000 + os.getpid() % 20000
    s = shim(PY, "-c", SERVE, str(port), listen=f"127.0.0.1:{port}")
    s.started()
    assert s.report() == {"event": "listening"}
    answer, conn = s.connect()
    assert answer == {"event": "connected"} and conn is not None
    conn.settimeout(WAIT)
    assert conn.recv(100) == f"hello from {port}".encode()
    conn.close()
    s.exited()


def test_the_server_cannot_be_reached_from_the_host(shim):
    # The host holds the port (bound, not listening) all along: the server
    # listens on the same number in a network namespace of its own.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        s = shim(PY, "-c", SERVE, str(port), listen=f"127.0.0.1:{port}")
        s.started()
        assert s.report() == {"event": "listening"}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.send(b"k")
        s.exited()


def test_c_refuses_a_port_no_process_of_the_tree_listens_on(shim):
    # The server never listens on the port; nothing else can in the shim's namespace.
    s = shim("sleep", "1000", listen="127.0.0.1:9")
    s.started()
    answer, conn = s.connect()
    assert conn is None and answer["event"] == "connect_failed"
    assert "nothing the relay launched listens on port 9" in answer["error"]
    s.send(b"k")
    s.exited()


@pytest.mark.skipif(not accounts.is_root(), reason=accounts.NOT_ROOT)
@pytest.mark.parametrize("who", ["root", "relay"])
def test_the_shim_refuses_root_and_the_relays_own_account(shim, who):
    nobody = pwd.getpwnam("nobody").pw_uid
    if who == "root":
        s = shim("sleep", "1000", run_as="root")
    else:  # as if the relay ran as nobody
        s = shim("sleep", "1000", run_as="nobody", forbid_uid=nobody)
    report = s.report()
    assert report["event"] == "failed"
    assert ("is root" if who == "root" else "is the relay's own account") in report["error"]
    assert s.report() is None
    assert s.proc.wait(WAIT) == 126


def test_an_unknown_account_is_refused_with_what_to_do(shim):
    s = shim("sleep", "1000", run_as="no-such-account-here")
    report = s.report()
    assert report["event"] == "failed"
    assert "does not exist; create it (useradd" in report["error"]


@pytest.mark.skipif(not accounts.is_root(), reason=accounts.NOT_ROOT)
def test_development_mode_a_shim_without_root_runs_the_server_as_itself_in_a_user_namespace(
    shim,
):
    # As a relay not started as root would: its own account, named explicitly.
    port = 40000 + (os.getpid() + 2) % 20000
    nobody = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups")
    s = shim(PY, "-c", SERVE, str(port), listen=f"127.0.0.1:{port}", run_as="nobody", prefix=nobody)
    pid = s.started()
    assert s.report() == {"event": "listening"}
    uid = pwd.getpwnam("nobody").pw_uid
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
    assert "CapEff:\t0000000000000000" in status
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    answer, conn = s.connect()
    assert answer == {"event": "connected"} and conn is not None
    conn.settimeout(WAIT)
    assert conn.recv(100) == f"hello from {port}".encode()
    conn.close()
    s.exited()


@pytest.mark.skipif(not accounts.is_root(), reason=accounts.NOT_ROOT)
def test_a_shim_without_root_refuses_any_account_but_its_own(shim):
    nobody = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups")
    s = shim("sleep", "1000", run_as=accounts.TARGET, prefix=nobody)
    report = s.report()
    assert report["event"] == "failed"
    assert "without root; start 'dbgrelay serve' as root with relay.user set" in report["error"]
