"""Connections to debug servers, and the servers the relay launches itself.

The relay connects only to the backend configured for the named target: the
address comes from the config, never from the client.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from config import NpipeBackend, TargetConfig, TcpBackend, UnixBackend

from .datapath.sockets import open_tcp
from .errors import RelayError
from .privsep import LAUNCHER, Launched, LaunchError, Launchers, receive_message

__all__ = [
    "BackendError",
    "open_backend",
    "probe_backend",
    "ManagedServer",
    "ServerExit",
    "pick_free_port",
    "LAUNCHER",
    "default_launchers",
]

log = logging.getLogger("dbgrelay.backend")


class BackendError(RelayError):
    """The backend could not be reached or started (answered with 502)."""


# How managed servers are started, chosen once: the Linux launcher shim
# (relay.launcher, through relay.privsep) or a Job Object per server.
if sys.platform == "win32":
    from .platform._jobs_windows import JobLaunchers as _PlatformLaunchers
else:
    _PlatformLaunchers = Launchers


def default_launchers() -> Any:
    """What starts managed servers on this system when no privileged helper is used."""
    return _PlatformLaunchers()


async def open_backend(
    backend: TcpBackend | UnixBackend | NpipeBackend | ManagedServer, *, connect_timeout: float
) -> trio.abc.Stream:
    """Connect to a configured backend, or to a managed server through its launcher.

    TCP streams get ``TCP_NODELAY`` (trio sets it on every TCP
    :class:`trio.SocketStream`): debuggers send small requests and wait for
    the reply, so Nagle's algorithm would add a delayed-ACK wait to each.
    Named pipes (Windows only) are retried while every instance is busy, up
    to ``connect_timeout``; see :mod:`relay.npipe`.

    Raises:
        BackendError: refused, unreachable, or not within ``connect_timeout``.
    """
    if isinstance(backend, ManagedServer):
        return await backend.connect(connect_timeout=connect_timeout)
    if isinstance(backend, NpipeBackend) and sys.platform != "win32":
        raise BackendError(
            "npipe:// backends need the relay to run on Windows", reason="backend_unsupported"
        )
    with connect_errors(_describe(backend), connect_timeout), trio.fail_after(connect_timeout):
        if isinstance(backend, NpipeBackend):
            from .npipe import open_pipe_stream

            return await open_pipe_stream(backend.path)
        if isinstance(backend, TcpBackend):
            if backend.port is None:
                raise BackendError("managed backend has no port yet", reason="launch_failed")
            return await open_tcp(backend.host, backend.port)
        return await trio.open_unix_socket(str(backend.path))


@contextlib.contextmanager
def connect_errors(describe: str, connect_timeout: float, *, failed: str = "{}") -> Iterator[None]:
    """Turn a connect's timeout and OS errors into the tunnel's 502 reasons.

    Args:
        describe: The backend as the message names it.
        connect_timeout: The limit the timeout message quotes.
        failed: How an OS error is said; ``{}`` is its text.

    Raises:
        BackendError: ``backend_timeout`` for :class:`trio.TooSlowError`,
            ``backend_unreachable`` for :class:`OSError`.
    """
    try:
        yield
    except trio.TooSlowError as exc:
        raise BackendError(
            f"backend {describe} did not accept within {connect_timeout:g}s",
            reason="backend_timeout",
        ) from exc
    except OSError as exc:
        raise BackendError(
            f"backend {describe}: {failed.format(exc.strerror or exc)}",
            reason="backend_unreachable",
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

    On Linux the server runs as ``run_as`` in a private network namespace
    (see :mod:`relay.launcher`); on Windows in a Job Object under a
    restricted token (see :mod:`relay.platform._jobs_windows`).  Tunnels
    reach it only through :meth:`connect`.

    Args:
        target: The target whose ``launch`` command this runs.
        log_dir: Where the server's output goes (``<target>.log``).
        on_event: Called with ``(event, fields)`` for ``server.launched`` and
            ``server.exited``, so the relay can audit, log and count them.
        run_as: The account the server and everything it starts run as.
        launchers: How shims are started (through the privileged helper or
            directly); default: directly.

    Resource handling:
        :meth:`run` owns the process: start it with ``nursery.start`` (which
        returns once the server listens, or raises :class:`BackendError`).
        When :meth:`run` ends, for whatever reason, the tree is dead and the
        launcher reaped.
    """

    def __init__(
        self,
        target: TargetConfig,
        *,
        log_dir: Path,
        on_event: Callable[[str, dict], None],
        run_as: str,
        launchers: Launchers | None = None,
    ) -> None:
        if not target.managed or not isinstance(target.backend, TcpBackend):
            raise ValueError(f"target {target.name!r} has no launch command and tcp:// backend")
        self.target = target
        self.log_dir = log_dir
        self.on_event = on_event
        self.run_as = run_as
        self.launchers = launchers or default_launchers()
        self._launched: Any = None
        self._early_exit: dict | None = None
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
        # The server listens in the shim's private network namespace, where
        # any port is free; one that is also free on the host keeps the logs
        # and the audit trail from naming the port of a host service.
        self.port = pick_free_port(target.backend.host)
        argv = list(target.launch_command(self.port))
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The server's own output goes to a log file the operator can read.
            log_fd = os.open(
                self.log_path,
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                0o600,
            )
        except OSError as exc:
            self._done.set()
            raise BackendError(
                f"cannot open the server log {self.log_path}: {exc.strerror or exc}",
                reason="launch_failed",
            ) from exc
        try:
            launched = await self.launchers.spawn(
                run_as=self.run_as,
                kill_grace=target.kill_grace,
                listen=str(self.backend)[len("tcp://") :],
                argv=argv,
                log_fd=log_fd,
            )
        except LaunchError as exc:
            self._done.set()
            # The tunnel logs it once, as backend.failed with this message.
            raise BackendError(str(exc), reason="launch_failed") from exc
        finally:
            os.close(log_fd)
        # The Linux shim is driven over its control socket; other platforms'
        # launchers return an object with the same methods.
        tree = _ShimTree(launched) if isinstance(launched, Launched) else launched
        self._launched = tree
        try:
            await self._launch(tree, argv, task_status)
        finally:
            with trio.CancelScope(shield=True):
                if self.exit is None:
                    self.kill_reason = self.kill_reason or (
                        "shutdown" if self._started else "launch_failed"
                    )
                    await self._kill(tree)
                await tree.aclose()
            self._done.set()

    async def connect(self, *, connect_timeout: float) -> trio.SocketStream:
        """A TCP connection to the server, checked to belong to its tree.

        On Linux the shim connects inside the server's network namespace,
        after checking that the listener belongs to the tree it launched,
        and passes the socket back over the control socket (``SCM_RIGHTS``):
        nothing on the host can reach the server.  On Windows the relay
        connects to ``127.0.0.1`` after checking the listener's and the
        accepted connection's owners are in the server's Job Object (see
        :mod:`relay.platform._jobs_windows`).  Either way the relay never
        talks to an impostor.

        Raises:
            BackendError: the server is gone, refused, or did not answer in
                ``connect_timeout`` (``backend_unreachable`` / ``backend_timeout``).
        """
        tree = self._launched
        if tree is None or self.exit is not None:
            raise BackendError("the managed server has exited", reason="backend_unreachable")
        return await tree.connect(describe=_describe(self.backend), connect_timeout=connect_timeout)

    async def _launch(
        self,
        tree: Any,
        argv: list[str],
        task_status: trio.TaskStatus[None],
    ) -> None:
        target = self.target
        # One deadline covers the launcher starting and the server listening.
        with trio.move_on_after(target.launch_timeout) as launching:
            first = await tree.next_report()
            if first is None or first.get("event") != "started":
                error = (first or {}).get("error", "the launcher exited at once")
                raise BackendError(
                    f"cannot launch {argv[0]}: {error}; see {self.log_path}",
                    reason="launch_failed",
                )
            self.pid = first.get("pid")
            self.on_event("server.launched", {"pid": self.pid, "port": self.port, "argv": argv})
            # The shim reports once a process of its tree listens on the port.
            ready = await tree.next_report()
            if ready is None or ready.get("event") != "listening":
                if ready is not None and ready.get("event") == "exited":
                    self._early_exit = ready
                raise BackendError(
                    f"{argv[0]} exited before listening on port {self.port}; "
                    f"see its log in {self.log_path}",
                    reason="launch_failed",
                )
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
                self._record_exit(tree, await tree.next_report("exited"), "exited")
                return
            self.kill_reason = self.kill_reason or "idle"
        self.kill_reason = self.kill_reason or "max_session"
        await self._kill(tree)

    async def _kill(self, tree: Any) -> None:
        """Ask the launcher to kill the tree and wait, bounded, for its report."""
        reason = self.kill_reason or "killed"
        if self._early_exit is not None:
            self._record_exit(tree, self._early_exit, reason)
            return
        with trio.move_on_after(self.target.kill_grace + 5):
            await tree.request_kill()
            self._record_exit(tree, await tree.next_report("exited"), reason)
            return
        # The launcher is stuck: take down what we can reach from here.
        tree.kill_launcher()
        self._record_exit(tree, None, reason)

    def _record_exit(self, tree: Any, final: dict | None, reason: str) -> None:
        if self.exit is not None:
            return
        if final is None and self.pid is not None:
            # The launcher vanished without a report (killed itself?): the
            # server may still run, orphaned.
            tree.kill_orphans(self.pid)
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


class _ShimTree:
    """A Linux launcher shim (:mod:`relay.launcher`), driven over its control socket."""

    def __init__(self, launched: Launched) -> None:
        self.launched = launched
        self._reports = _Reports(launched.control)

    async def next_report(self, event: str | None = None) -> dict | None:
        """The shim's next report (whose ``event`` is ``event``, if given), None at EOF."""
        return await self._reports.next(event)

    async def request_kill(self) -> None:
        """Ask the shim to kill the tree (SIGTERM, SIGKILL after its grace)."""
        with contextlib.suppress(OSError):
            await self.launched.control.send(b"k")

    def kill_launcher(self) -> None:
        """The shim is stuck: kill it, if the relay started it itself.

        A relay that is not root cannot signal a helper-started shim;
        closing the control socket (in :meth:`aclose`) tells a live shim to
        kill the tree anyway.
        """
        if self.launched.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self.launched.process.kill()

    def kill_orphans(self, pid: int) -> None:
        """Kill the server's process group (its pid), left behind by a vanished shim."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    async def connect(self, *, describe: str, connect_timeout: float) -> trio.SocketStream:
        """A TCP connection to the server, made by the shim inside its namespace.

        The shim checks that the listener on the port belongs to the tree it
        launched before it connects, and passes the connected socket back
        over the control socket (``SCM_RIGHTS``).
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reply = trio.socket.from_stdlib_socket(mine)
        try:
            with (
                connect_errors(describe, connect_timeout, failed="the launcher is gone ({})"),
                trio.fail_after(connect_timeout),
            ):
                try:
                    await self.launched.control.sendmsg(
                        [b"c"],
                        [
                            (
                                socket.SOL_SOCKET,
                                socket.SCM_RIGHTS,
                                array.array("i", [theirs.fileno()]),
                            )
                        ],
                    )
                finally:
                    theirs.close()
                data, fds = await receive_message(reply)
        finally:
            reply.close()
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {}
        if answer.get("event") != "connected" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise BackendError(
                f"backend {describe}: {answer.get('error', 'the launcher is gone')}",
                reason="backend_unreachable",
            )
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fds[0]))
        stream = trio.SocketStream(sock)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return stream

    async def aclose(self) -> None:
        """Close the control socket and wait, bounded, for a shim we started ourselves."""
        launched = self.launched
        launched.control.close()
        process = launched.process
        if process is None:
            return  # the privileged helper reaps the launchers it starts
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


class _Reports:
    """Reads the launcher's JSON reports, one per message, from the control socket.

    Messages that are not JSON objects are skipped: the launcher sends only
    objects, so anything else is noise, never a report.
    """

    def __init__(self, control: trio.socket.SocketType) -> None:
        self._control = control

    async def next(self, event: str | None = None) -> dict | None:
        """The next object (whose ``event`` is ``event``, if given), or None at EOF."""
        while True:
            try:
                data, fds = await receive_message(self._control)
            except OSError:
                return None
            for fd in fds:
                os.close(fd)
            if not data:
                return None
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict) and (event is None or obj.get("event") == event):
                return obj
