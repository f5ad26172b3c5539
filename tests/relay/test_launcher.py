"""The launcher shim, run as the relay runs it: a real subprocess with pipes.

Each test waits for the shim's JSON reports (events), bounded by a real
timeout; the only real-time deadline is the shim's own ``--kill-grace``,
kept at a fraction of a second where a test needs it to pass.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.backends import LAUNCHER

WAIT = 10.0  # seconds a test waits for a report before failing


class Shim:
    """``python -I launcher.py --kill-grace G -- CMD...`` with its reports readable."""

    def __init__(self, *command: str, grace: float = 5.0, log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(LAUNCHER), "--kill-grace", str(grace), "--", *command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self._buf = b""

    def report(self) -> dict | None:
        """The next JSON line on the shim's stdout, or None at EOF."""
        deadline = time.monotonic() + WAIT
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no report from the launcher within {WAIT}s; log: {self.log_text()}"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 4096)
                if not data:
                    return None
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

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
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


@pytest.fixture
def shim(tmp_path: Path):
    """Start shims with ``shim(*command, grace=...)``; each is killed after the test."""
    started: list[Shim] = []

    def start(*command: str, grace: float = 5.0) -> Shim:
        s = Shim(*command, grace=grace, log=tmp_path / f"server{len(started)}.log")
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def is_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def wait_for_file(path: Path) -> str:
    """The file's first line once a process has written it (bounded)."""
    deadline = time.monotonic() + WAIT
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was not written within {WAIT}s"
        time.sleep(0.01)
    return path.read_text().splitlines()[0]


PY = sys.executable


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


def test_eof_on_stdin_means_the_relay_died_and_kills_the_server(shim):
    s = shim("sleep", "1000")
    pid = s.started()
    s.proc.stdin.close()  # what the kernel does when the relay is killed with -9
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


def test_a_server_that_ignores_sigterm_gets_sigkill_after_the_grace(shim, tmp_path):
    ready = tmp_path / "ready"
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


def test_a_descendant_that_left_the_server_session_dies_too(shim, tmp_path):
    # Like gdbserver's inferior (its own process group), or a daemon (setsid).
    pidfile = tmp_path / "grandchild"
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


def test_what_a_server_leaves_behind_when_it_exits_is_killed(shim, tmp_path):
    pidfile = tmp_path / "orphan"
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


def test_a_missing_program_is_reported_as_failed(shim, tmp_path):
    s = shim(str(tmp_path / "no-such-server"), "--once")
    report = s.report()
    assert report["event"] == "failed"
    assert report["error"].startswith(f"{tmp_path / 'no-such-server'}: No such file")
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
