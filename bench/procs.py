"""Starting, watching and always stopping the processes of a benchmark run.

Every process the bench starts goes through one :class:`Supervisor`. Each child
runs in its own session (so its own process group): stopping it signals the
whole group, which also reaches anything the child forked (stunnel's helpers,
the program gdbserver runs). :func:`install_signal_handlers` turns SIGTERM and
SIGHUP into :class:`Interrupted` so the ``finally`` that calls
:meth:`Supervisor.stop_all` runs on every way out; an ``atexit`` hook and the
kernel's parent-death signal are the last nets.

Readiness is read from ``/proc/net/tcp`` rather than by connecting: a probe
connection would use up ``gdbserver --once`` and open a real tunnel through
``dbgrelay connect``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BenchError",
    "Interrupted",
    "Child",
    "Supervisor",
    "install_signal_handlers",
    "free_port",
    "is_listening",
    "group_pids",
    "read_rss",
    "accepted_connections",
    "raise_nofile_limit",
]

_PR_SET_PDEATHSIG = 1
_TCP_LISTEN = "0A"
#: /proc/net/tcp states of a socket on the server's port that is no open
#: connection: LISTEN, TIME_WAIT, CLOSE.
_NOT_OPEN = (_TCP_LISTEN, "06", "07")
# Seconds stop() waits for SIGKILLed processes to be gone.
_KILL_WAIT = 10.0


class BenchError(Exception):
    """A benchmark step failed; the message says which and why.

    Args:
        message: One line for the operator.
        reason: A short machine-readable code (``"not_ready"``, ``"client_failed"``).
    """

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived; unwinds like KeyboardInterrupt does for SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Interrupted`, SIGINT KeyboardInterrupt.

    SIGINT is set explicitly: a shell starts background jobs with SIGINT
    ignored, Python keeps an inherited "ignore", and a bench started from a
    script and then sent ``kill -INT`` would otherwise run on with every
    process it started.
    """

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the bench is killed with
    # SIGKILL (no finally, no atexit), the kernel still kills its children.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True, slots=True)
class Child:
    """A process started by the supervisor.

    Attributes:
        name: Label used in messages and log file names.
        popen: The process; its pid is also its process group id.
        log: File receiving its stderr (and stdout unless captured).
    """

    name: str
    popen: subprocess.Popen
    log: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the child's log, joined with `` | `` for one-line errors."""
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])


class Supervisor:
    """Owns every child process of a run and stops them all on the way out.

    Args:
        log_dir: Folder for the children's log files.
        pin_command: Prefix that pins a command to one CPU (``["taskset", "-c", "0"]``),
            or ``None`` when pinning is unavailable.
        env: Environment for every child.

    Resource handling:
        Children are stopped by :meth:`stop` or, at the latest, :meth:`stop_all`,
        which is also registered with :mod:`atexit`.
    """

    def __init__(
        self, log_dir: Path, *, pin_command: Sequence[str] | None, env: dict[str, str]
    ) -> None:
        self.log_dir = log_dir
        self.pin_command = list(pin_command) if pin_command else None
        self.env = env
        self.started: list[int] = []
        self._children: list[Child] = []
        self._counter = 0
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pinned: bool = False,
        capture_stdout: bool = False,
        cwd: Path | None = None,
    ) -> Child:
        """Start ``argv`` in its own process group.

        Args:
            name: Label for messages and the log file.
            argv: The command.
            pinned: Prefix the pin command (latency workloads).
            capture_stdout: Give the child a stdout pipe (for JSON results).
            cwd: Working directory.

        Returns:
            The started :class:`Child`.

        Raises:
            BenchError: the program cannot be started.
        """
        self._counter += 1
        log = self.log_dir / f"{self._counter:03d}-{name}.log"
        command = list(argv)
        if pinned and self.pin_command:
            command = self.pin_command + command
        with open(log, "wb") as log_file:
            try:
                popen = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if capture_stdout else log_file,
                    stderr=log_file,
                    cwd=cwd,
                    env=self.env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise BenchError(
                    f"cannot start {name} ({command[0]}): {exc}", reason="start_failed"
                ) from exc
        child = Child(name=name, popen=popen, log=log)
        self._children.append(child)
        self.started.append(popen.pid)
        return child

    def run(self, name: str, argv: Sequence[str], *, timeout: float, pinned: bool = False) -> str:
        """Run a command to completion and return its stdout.

        Raises:
            BenchError: it exited non-zero or ran past ``timeout`` seconds.
        """
        child = self.start(name, argv, pinned=pinned, capture_stdout=True)
        try:
            out, _ = child.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{name} did not finish within {timeout:.0f} s; last output: {child.log_tail()}",
                reason="timeout",
            ) from None
        finally:
            self.stop(child)
        if child.popen.returncode != 0:
            raise BenchError(
                f"{name} exited with status {child.popen.returncode}: {child.log_tail()}",
                reason="client_failed",
            )
        return out.decode()

    def wait_listening(self, child: Child, port: int, *, timeout: float = 30.0) -> None:
        """Wait until ``child`` listens on 127.0.0.1:``port``.

        Raises:
            BenchError: the child exited or did not listen within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not is_listening(port):
            if child.popen.poll() is not None:
                raise BenchError(
                    f"{child.name} exited with status {child.popen.returncode} before "
                    f"listening on 127.0.0.1:{port}: {child.log_tail()}",
                    reason="not_ready",
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{child.name} is not listening on 127.0.0.1:{port} after {timeout:.0f} s: "
                    f"{child.log_tail()}",
                    reason="not_ready",
                )
            time.sleep(0.02)

    def stop(self, child: Child, *, grace: float = 3.0) -> None:
        """Stop ``child`` and everything in its process group: SIGTERM, then SIGKILL."""
        pgid = child.popen.pid
        if child.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                child.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever survived the leader (or ignored SIGTERM) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        # SIGKILL cannot be refused, but a busy machine may take a while to
        # schedule the dying processes: wait until the whole group is gone
        # (bounded), not for a fixed moment after which some may still run.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=_KILL_WAIT)
        deadline = time.monotonic() + _KILL_WAIT
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if child.popen.stdout is not None:
            child.popen.stdout.close()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """Stop every child still running, newest first."""
        while self._children:
            self.stop(self._children[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tcp_sockets() -> Iterator[tuple[str, str]]:
    """``(local address, state)`` of every IPv4 TCP socket, as /proc/net/tcp writes them."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            yield fields[1], fields[3]


def is_listening(port: int) -> bool:
    """Whether some socket listens on 127.0.0.1:``port`` or 0.0.0.0:``port``."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    return any(local in wanted and state == _TCP_LISTEN for local, state in _tcp_sockets())


def accepted_connections(port: int) -> int:
    """Connections a server on 127.0.0.1:``port`` accepted that are not over yet.

    One is over once its socket is gone, in TIME_WAIT or CLOSE.
    """
    local = f"0100007F:{port:04X}"
    return sum(
        1 for address, state in _tcp_sockets() if address == local and state not in _NOT_OPEN
    )


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 5 is the process group; the command name (field 2) may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def read_rss(pids: Sequence[int]) -> tuple[int, int]:
    """Summed (VmRSS, VmHWM) in KiB of ``pids``; processes that are gone count 0."""
    rss = hwm = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss, hwm


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (children inherit it); return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft
