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
from collections.abc import Callable
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
) -> trio.SocketStream:
    """Connect to a configured backend.

    TCP streams get ``TCP_NODELAY`` (trio sets it on every TCP
    :class:`trio.SocketStream`): debuggers send small requests and wait for
    the reply, so Nagle's algorithm would add a delayed-ACK wait to each.

    Raises:
        BackendError: refused, unreachable, or not within ``connect_timeout``.
    """
    if isinstance(backend, NpipeBackend):
        raise BackendError(
            "npipe:// backends need the relay to run on Windows", reason="backend_unsupported"
        )
    try:
        with trio.fail_after(connect_timeout):
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
    return repr(backend)


async def probe_backend(
    backend: TcpBackend | UnixBackend | NpipeBackend, *, connect_timeout: float
) -> bool:
    """Whether the backend accepts a connection now (the connection is closed at once)."""
    try:
        stream = await open_backend(backend, connect_timeout=connect_timeout)
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
    """How a managed server ended."""

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
        When :meth:`run` ends, for whatever reason, the tree is dead.
    """

    def __init__(
        self, target: TargetConfig, *, log_dir: Path, on_event: Callable[[str, dict], None]
    ) -> None:
        self.target = target
        self.log_dir = log_dir
        self.on_event = on_event
        self.port: int | None = None
        self.pid: int | None = None
        self.tunnels = 0
        self.exit: ServerExit | None = None
        self.kill_reason: str | None = None
        self._idle: trio.CancelScope | None = None
        self._started = False
        self._done = trio.Event()

    @property
    def running(self) -> bool:
        return self._started and not self._done.is_set()

    @property
    def backend(self) -> TcpBackend:
        assert isinstance(self.target.backend, TcpBackend)
        return self.target.backend.with_port(self.port)

    def tunnel_opened(self) -> None:
        self.tunnels += 1
        if self._idle is not None:
            self._idle.deadline = math.inf

    def tunnel_closed(self) -> None:
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
        await self._done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Launch the server, report once it listens, hold it until it ends.

        Raises:
            BackendError: before ``task_status.started()``, if the server
                cannot be started or does not listen within
                ``launch_timeout``.

        Cancellation:
            Cancelling kills the process tree (SIGTERM, SIGKILL after
            ``kill_grace``) under a shield bounded by that grace.
        """
        target = self.target
        assert isinstance(target.backend, TcpBackend) and target.launch
        self.port = pick_free_port(target.backend.host)
        argv = [a.replace("{port}", str(self.port)) for a in target.launch]
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(os.environ, DBGRELAY_KILL_GRACE=str(target.kill_grace))
        # The server's own output goes to a log file the operator can read.
        log_fd = os.open(
            self.log_dir / f"{target.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", str(LAUNCHER), *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            self._done.set()
            raise BackendError(f"cannot start {LAUNCHER}: {exc}", reason="launch_failed") from exc
        finally:
            os.close(log_fd)
        lines = _JsonLines(process.stdout)
        try:
            with trio.fail_after(target.launch_timeout):
                first = await lines.next()
            if first is None or first.get("event") != "started":
                error = (first or {}).get("error", "the launcher exited at once")
                raise BackendError(f"cannot launch {argv[0]}: {error}", reason="launch_failed")
            self.pid = first["pid"]
            self.on_event("server.launched", {"pid": self.pid, "port": self.port, "argv": argv})
            await self._wait_listening(process, argv[0], target.launch_timeout)
            now = trio.current_time()
            lifetime = trio.CancelScope(
                deadline=now + target.max_session if target.max_session else math.inf
            )
            self._idle = trio.CancelScope(deadline=now + target.idle_timeout)
            self._started = True
            task_status.started()
            with lifetime:
                with self._idle:
                    # The server runs until it exits by itself or a scope fires.
                    self._record_exit(await lines.next(), "exited")
                    return
                self.kill_reason = self.kill_reason or "idle"
            self.kill_reason = self.kill_reason or "max_session"
            await self._kill(process, lines)
        except trio.TooSlowError as exc:
            raise BackendError(
                f"{argv[0]} did not start within {target.launch_timeout:g}s", reason="launch_failed"
            ) from exc
        finally:
            if self.exit is None:
                with trio.CancelScope(shield=True):
                    self.kill_reason = self.kill_reason or (
                        "shutdown" if self._started else "launch_failed"
                    )
                    await self._kill(process, lines)
            self._done.set()

    async def _wait_listening(
        self, process: trio.Process, program: str, launch_timeout: float
    ) -> None:
        """Wait until the port listens, without connecting to it on Linux.

        A probe connection would be taken for the debugger's: ``gdbserver
        --once`` exits after its first client.  On Linux we read the kernel's
        listen table instead; elsewhere we fall back to a connect probe.
        """
        with trio.move_on_after(launch_timeout):
            while True:
                if process.poll() is not None:
                    raise BackendError(
                        f"{program} exited before listening on port {self.port}; see its log in {self.log_dir}",
                        reason="launch_failed",
                    )
                ports = _listening_ports()
                if ports is None:
                    if await probe_backend(self.backend, connect_timeout=1.0):
                        return
                elif self.port in ports:
                    return
                await trio.sleep(0.02)
        raise BackendError(
            f"{program} did not listen on port {self.port} within {launch_timeout:g}s; "
            f"see its log in {self.log_dir}",
            reason="launch_failed",
        )

    async def _kill(self, process: trio.Process, lines: _JsonLines) -> None:
        """Ask the shim to kill the tree and wait, bounded, for its report."""
        with trio.move_on_after(self.target.kill_grace + 5):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await process.stdin.send_all(b"k")
            final = await lines.next()
            while final is not None and final.get("event") != "exited":
                final = await lines.next()
            self._record_exit(final, self.kill_reason or "killed")
            await process.wait()
        if process.returncode is None:
            # The shim itself is stuck: take the group down from here.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
            self._record_exit(None, self.kill_reason or "killed")
        with contextlib.suppress(trio.ClosedResourceError):
            await process.stdin.aclose()

    def _record_exit(self, final: dict | None, reason: str) -> None:
        if self.exit is not None:
            return
        final = final or {}
        self.exit = ServerExit(
            pid=self.pid,
            returncode=final.get("returncode"),
            signal=final.get("signal"),
            reason=reason,
        )
        self.on_event(
            "server.exited",
            {
                "pid": self.pid,
                "returncode": self.exit.returncode,
                "signal": self.exit.signal,
                "reason": reason,
            },
        )


class _JsonLines:
    """Reads the launcher's JSON lines from its stdout pipe."""

    def __init__(self, stream: trio.abc.ReceiveStream | None) -> None:
        self._stream = stream
        self._buf = b""

    async def next(self) -> dict | None:
        if self._stream is None:
            return None
        while b"\n" not in self._buf:
            try:
                data = await self._stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None
