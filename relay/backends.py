"""Connections to debug servers, and the servers the relay launches itself.

The relay connects only to the backend configured for the named target: the
address comes from the config, never from the client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from config import NpipeBackend, TargetConfig, TcpBackend, UnixBackend

from .errors import RelayError

__all__ = [
    "BackendError",
    "open_backend",
    "probe_backend",
    "ManagedServer",
    "ServerExit",
    "pick_free_port",
    "LAUNCHER",
]

log = logging.getLogger("dbgrelay.backend")

LAUNCHER = Path(__file__).with_name("launcher.py")


class BackendError(RelayError):
    """The backend could not be reached or started (answered with 502)."""


async def open_backend(
    backend: TcpBackend | UnixBackend | NpipeBackend, *, connect_timeout: float
) -> trio.abc.Stream:
    """Connect to a configured backend.

    TCP streams get ``TCP_NODELAY`` (trio sets it on every TCP
    :class:`trio.SocketStream`): debuggers send small requests and wait for
    the reply, so Nagle's algorithm would add a delayed-ACK wait to each.
    Named pipes (Windows only) are retried while every instance is busy, up
    to ``connect_timeout``; see :mod:`relay.npipe`.

    Raises:
        BackendError: refused, unreachable, or not within ``connect_timeout``.
    """
    if isinstance(backend, NpipeBackend) and sys.platform != "win32":
        raise BackendError(
            "npipe:// backends need the relay to run on Windows", reason="backend_unsupported"
        )
    try:
        with trio.fail_after(connect_timeout):
            if isinstance(backend, NpipeBackend):
                from .npipe import open_pipe_stream

                return await open_pipe_stream(backend.path)
            if isinstance(backend, TcpBackend):
                if backend.port is None:
                    raise BackendError("managed backend has no port yet", reason="launch_failed")
                stream = await trio.open_tcp_stream(backend.host, backend.port)
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return stream
            return await trio.open_unix_socket(str(backend.path))
    except trio.TooSlowError as exc:
        raise BackendError(
            f"backend {_describe(backend)} did not accept within {connect_timeout:g}s",
            reason="backend_timeout",
        ) from exc
    except OSError as exc:
        raise BackendError(
            f"backend {_describe(backend)}: {exc.strerror or exc}", reason="backend_unreachable"
        ) from exc


def _describe(backend: Any) -> str:
    if isinstance(backend, TcpBackend):
        return f"tcp://{backend.host}:{backend.port}"
    if isinstance(backend, UnixBackend):
        return f"unix://{backend.path}"
    return str(backend)


async def probe_backend(
    backend: TcpBackend | UnixBackend | NpipeBackend,
    *,
    connect_timeout: float,
    opener: Callable[..., Awaitable[trio.abc.Stream]] | None = None,
) -> bool:
    """Whether the backend accepts a connection now (the connection is closed at once).

    Args:
        backend: Where to connect.
        connect_timeout: Seconds to wait for the connection.
        opener: How to connect, with :func:`open_backend`'s signature
            (the relay passes its own, which tests can replace).
    """
    opener = opener or open_backend
    try:
        stream = await opener(backend, connect_timeout=connect_timeout)
    except BackendError:
        return False
    await stream.aclose()
    return True


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now, for a server we are about to launch."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening_ports() -> set[int] | None:
    """Ports in LISTEN state on this host (Linux /proc), or None if unknown."""
    ports: set[int] = set()
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports if found else None


@dataclass(frozen=True, slots=True)
class ServerExit:
    """How a managed server ended.

    Attributes:
        pid: The server's pid (None if it never started).
        returncode: Its exit status; negative for a signal, None if unknown.
        signal: The signal's name (``"SIGTERM"``) when a signal ended it.
        reason: Why it ended: ``"exited"`` (by itself), ``"idle"``,
            ``"max_session"``, ``"shutdown"`` or ``"launch_failed"``.
    """

    pid: int | None
    returncode: int | None
    signal: str | None
    reason: str


class ManagedServer:
    """One launched debug server for one target, and its process tree.

    Started on the first authorised tunnel, reused by later ones while it
    runs, and killed when it has had no tunnel for the target's
    ``idle_timeout``, when it has run for ``max_session``, on shutdown, or
    when the relay dies (see :mod:`relay.launcher`).

    Args:
        target: The target whose ``launch`` command this runs.
        log_dir: Where the server's output goes (``<target>.log``).
        on_event: Called with ``(event, fields)`` for ``server.launched`` and
            ``server.exited``, so the relay can audit, log and count them.

    Resource handling:
        :meth:`run` owns the process: start it with ``nursery.start`` (which
        returns once the server listens, or raises :class:`BackendError`).
        When :meth:`run` ends, for whatever reason, the tree is dead and the
        launcher reaped.
    """

    def __init__(
        self, target: TargetConfig, *, log_dir: Path, on_event: Callable[[str, dict], None]
    ) -> None:
        if not target.managed or not isinstance(target.backend, TcpBackend):
            raise ValueError(f"target {target.name!r} has no launch command and tcp:// backend")
        self.target = target
        self.log_dir = log_dir
        self.on_event = on_event
        self.port: int | None = None
        self.pid: int | None = None
        self.tunnels = 0
        self.exit: ServerExit | None = None
        self.kill_reason: str | None = None
        self._idle: trio.CancelScope | None = None
        self._lifetime: trio.CancelScope | None = None
        self._started = False
        self._done = trio.Event()

    @property
    def log_path(self) -> Path:
        """The file the server's standard output and error go to."""
        return self.log_dir / f"{self.target.name}.log"

    @property
    def running(self) -> bool:
        """Whether a new tunnel may use this server.

        False once it has exited, once a kill was asked for, and once its
        idle or lifetime deadline has passed (even if the kill has not run
        yet), so a tunnel never attaches to a server about to be killed.
        """
        if not self._started or self.exit is not None or self.kill_reason is not None:
            return False
        now = trio.current_time()
        return all(
            scope is not None and not scope.cancel_called and scope.deadline > now
            for scope in (self._idle, self._lifetime)
        )

    @property
    def backend(self) -> TcpBackend:
        """Where the launched server listens."""
        assert isinstance(self.target.backend, TcpBackend) and self.port is not None
        return self.target.backend.with_port(self.port)

    def tunnel_opened(self) -> None:
        """A tunnel uses the server: it is not idle until the last one closes."""
        self.tunnels += 1
        if self._idle is not None:
            self._idle.deadline = math.inf

    def tunnel_closed(self) -> None:
        """A tunnel ended; with none left, the idle countdown starts."""
        self.tunnels -= 1
        if self.tunnels == 0 and self._idle is not None:
            self._idle.deadline = trio.current_time() + self.target.idle_timeout

    def kill(self, reason: str) -> None:
        """Kill the tree soon; :meth:`run` records ``reason`` with the exit."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if self._idle is not None:
            self._idle.cancel()

    async def wait_done(self) -> None:
        """Wait until the tree is dead and :attr:`exit` is set."""
        await self._done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Launch the server, report once it listens, hold it until it ends.

        Raises:
            BackendError: before ``task_status.started()``, if the server
                cannot be started or does not listen within
                ``launch_timeout`` (``reason="launch_failed"``).

        Cancellation:
            Cancelling kills the process tree (SIGTERM, SIGKILL after
            ``kill_grace``) under a shield bounded by that grace.
        """
        target = self.target
        assert isinstance(target.backend, TcpBackend)
        self.port = pick_free_port(target.backend.host)
        argv = list(target.launch_command(self.port))
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The server's own output goes to a log file the operator can read.
            log_fd = os.open(
                self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            self._done.set()
            raise BackendError(
                f"cannot open the server log {self.log_path}: {exc.strerror or exc}",
                reason="launch_failed",
            ) from exc
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", str(LAUNCHER), "--kill-grace", str(target.kill_grace)]
                + ["--", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
            )
        except OSError as exc:
            self._done.set()
            raise BackendError(
                f"cannot start {sys.executable} {LAUNCHER}: {exc.strerror or exc}",
                reason="launch_failed",
            ) from exc
        finally:
            os.close(log_fd)
        lines = _JsonLines(process.stdout)
        try:
            await self._launch(process, lines, argv, task_status)
        finally:
            with trio.CancelScope(shield=True):
                if self.exit is None:
                    self.kill_reason = self.kill_reason or (
                        "shutdown" if self._started else "launch_failed"
                    )
                    await self._kill(process, lines)
                await _reap(process)
            self._done.set()

    async def _launch(
        self,
        process: trio.Process,
        lines: _JsonLines,
        argv: list[str],
        task_status: trio.TaskStatus[None],
    ) -> None:
        target = self.target
        # One deadline covers the launcher starting and the server listening.
        with trio.move_on_after(target.launch_timeout) as launching:
            first = await lines.next()
            if first is None or first.get("event") != "started":
                error = (first or {}).get("error", "the launcher exited at once")
                raise BackendError(
                    f"cannot launch {argv[0]}: {error}; see {self.log_path}",
                    reason="launch_failed",
                )
            self.pid = first.get("pid")
            self.on_event("server.launched", {"pid": self.pid, "port": self.port, "argv": argv})
            await self._wait_listening(process, argv[0])
        if launching.cancelled_caught:
            raise BackendError(
                f"{argv[0]} did not listen on port {self.port} within "
                f"{target.launch_timeout:g}s; see its log in {self.log_path}",
                reason="launch_failed",
            )
        now = trio.current_time()
        self._lifetime = trio.CancelScope(
            deadline=now + target.max_session if target.max_session else math.inf
        )
        self._idle = trio.CancelScope(deadline=now + target.idle_timeout)
        if self.kill_reason is not None:
            self._idle.cancel()  # kill() came while the server was starting
        self._started = True
        task_status.started()
        with self._lifetime:
            with self._idle:
                # The server runs until it exits by itself or a scope fires.
                self._record_exit(await lines.next("exited"), "exited")
                return
            self.kill_reason = self.kill_reason or "idle"
        self.kill_reason = self.kill_reason or "max_session"
        await self._kill(process, lines)

    async def _wait_listening(self, process: trio.Process, program: str) -> None:
        """Wait until the port listens, without connecting to it on Linux.

        A probe connection would be taken for the debugger's: ``gdbserver
        --once`` exits after its first client.  On Linux we read the kernel's
        listen table instead; elsewhere we fall back to a connect probe.
        The caller bounds the wait.  Polls quickly at first (gdbserver
        listens within milliseconds), then backs off to 4 polls a second.
        """
        delay = 0.01
        while True:
            if process.poll() is not None:
                raise BackendError(
                    f"{program} exited before listening on port {self.port}; "
                    f"see its log in {self.log_path}",
                    reason="launch_failed",
                )
            ports = _listening_ports()
            if ports is None:
                if await probe_backend(self.backend, connect_timeout=1.0):
                    return
            elif self.port in ports:
                return
            await trio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def _kill(self, process: trio.Process, lines: _JsonLines) -> None:
        """Ask the launcher to kill the tree and wait, bounded, for its report."""
        reason = self.kill_reason or "killed"
        with trio.move_on_after(self.target.kill_grace + 5):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await process.stdin.send_all(b"k")
            self._record_exit(await lines.next("exited"), reason)
            return
        # The launcher is stuck: take down what we know of the tree from here.
        for group in (process.pid, self.pid):
            if group is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
        self._record_exit(None, reason)

    def _record_exit(self, final: dict | None, reason: str) -> None:
        if self.exit is not None:
            return
        if final is None and self.pid is not None:
            # The launcher vanished without a report (killed itself?): the
            # server may still run, orphaned.  Its group is its pid.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        final = final or {}
        self.exit = ServerExit(
            pid=self.pid,
            returncode=final.get("returncode"),
            signal=final.get("signal"),
            reason=reason,
        )
        if self.pid is None:
            return  # nothing was started; the tunnel reports the launch failure
        self.on_event(
            "server.exited",
            {
                "pid": self.pid,
                "port": self.port,
                "returncode": self.exit.returncode,
                "signal": self.exit.signal,
                "reason": reason,
            },
        )


async def _reap(process: trio.Process) -> None:
    """Wait for the launcher to exit and close our ends of its pipes (bounded)."""
    with trio.move_on_after(5):
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(5):
            await process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()


class _JsonLines:
    """Reads the launcher's JSON objects, one per line, from its stdout pipe.

    Lines that are not JSON objects are skipped: the launcher writes only
    objects, so anything else is noise, never a report.
    """

    _MAX_LINE = 64 * 1024

    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        self._stream = stream
        self._buf = b""

    async def next(self, event: str | None = None) -> dict | None:
        """The next object (whose ``event`` is ``event``, if given), or None at EOF."""
        while True:
            line = await self._line()
            if line is None:
                return None
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and (event is None or obj.get("event") == event):
                return obj

    async def _line(self) -> bytes | None:
        if self._stream is None:
            return None
        while b"\n" not in self._buf:
            if len(self._buf) > self._MAX_LINE:
                self._buf = b""  # a runaway line: drop it
            try:
                data = await self._stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line
