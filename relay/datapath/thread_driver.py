"""The pump's fast driver: established tunnels moved by a data-plane thread.

Every chunk the trio driver forwards passes once through trio's scheduler
(``wait_readable``, re-arming trio's one-shot epoll registration, the task
switch).  This driver hands an established tunnel to one thread per process
that runs a level-triggered ``epoll`` loop: each socket stays registered for
the tunnel's life, and a chunk costs ``epoll_wait``, ``recv`` and ``send``.
The logic is the same :class:`~relay.datapath.pump.Pump`; only the system
calls and the waiting differ.

The hand-off is the one interface between trio and the thread
(:meth:`DataPlane.run_pump`, same contract as
:func:`relay.datapath.trio_driver.run_pump`):

* The handshake, the request, the token check, audit and admin stay in
  trio.  The session hands the tunnel over after the 200.
* While handed over, the thread owns both sockets and the pump (with the
  TLS connection inside it); the trio task only waits.
* The tunnel comes back when the pump ends (either side closed or failed),
  when it has been idle for ``idle_timeout`` (the session's ``activity``
  scope is then cancelled, as with the trio driver), or when the trio task
  is cancelled (revocation, maximum session, admin end, shutdown): the task
  asks the thread to let go and waits for it, so the sockets are trio's
  again before the session closes them and writes its audit record.
* Tunnels with a recording tap, sides that are not sockets, and platforms
  without ``epoll`` stay on the trio driver.

Time: the thread reads ``clock`` (``time.monotonic``), never trio's clock, so
this driver does not run under :class:`trio.testing.MockClock`.
"""

from __future__ import annotations

import functools
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from . import trio_driver
from .pump import BACKEND, CLIENT, READ, SEND, SEND_EOF, Pump, PumpResult, Traffic

__all__ = ["DataPlane", "shared_plane"]

_IN = select.EPOLLIN if hasattr(select, "EPOLLIN") else 0
_OUT = select.EPOLLOUT if hasattr(select, "EPOLLOUT") else 0

#: How long a cancelled session waits for the thread to let its tunnel go.
_RETURN_TIMEOUT = 5.0


def _wake_task(token: trio.lowlevel.TrioToken, done: trio.Event) -> None:
    """From the thread: tell the tunnel's trio task it is back."""
    try:
        token.run_sync_soon(done.set, idempotent=True)
    except trio.RunFinishedError:
        pass  # the trio run is over; nobody waits


class _Tunnel:
    """One handed-over tunnel: the pump, the two sockets, and how it ended."""

    __slots__ = (
        "pump",
        "socks",
        "fds",
        "masks",
        "readable",
        "finish",
        "idle",
        "crash",
        "released",
    )

    def __init__(
        self, pump: Pump, socks: tuple[socket.socket, socket.socket], finish: Callable[[], None]
    ) -> None:
        self.pump = pump
        self.socks = socks
        self.fds = (socks[0].fileno(), socks[1].fileno())
        self.masks = [0, 0]
        # Per side: may hold bytes (epoll said so, or the last read was full).
        self.readable = [True, True]
        self.finish = finish
        self.idle = False
        self.crash: BaseException | None = None
        self.released = False


class DataPlane:
    """A thread with a level-triggered epoll loop moving handed-over tunnels.

    Args:
        clock: Seconds, monotonic; the thread's only source of time.

    Resource handling:
        The thread starts on the first hand-off and runs as a daemon until
        :meth:`close`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._commands: list[tuple[str, _Tunnel]] = []
        self._thread: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._closed = False
        #: Tunnels handed over so far (the rest ran on the trio driver).
        self.handed_over = 0

    @staticmethod
    def available() -> bool:
        """Whether this platform has what the thread needs (``epoll``)."""
        return hasattr(select, "epoll")

    # -- the trio side ------------------------------------------------------------

    async def run_pump(
        self, client: trio.abc.Stream, backend: trio.abc.Stream, traffic: Traffic, **options: Any
    ) -> PumpResult:
        """Hand the tunnel to the thread and wait until it comes back.

        Takes the arguments of :func:`relay.datapath.trio_driver.run_pump`
        and keeps its contract; that driver runs instead when the tunnel
        cannot be handed over (see the module docstring).

        Cancellation:
            Takes the tunnel back from the thread before propagating: the
            streams are trio's again, and can be closed normally.
        """
        sides = self._hand_over(client, backend, options)
        if sides is None:
            return await trio_driver.run_pump(client, backend, traffic, **options)
        activity: trio.CancelScope | None = options.get("activity")
        idle_timeout = options.get("idle_timeout") if activity is not None else None
        try:
            pump = trio_driver.pump_between(
                sides,  # type: ignore[arg-type]
                traffic,
                self._clock(),
                idle_timeout=idle_timeout,
                close_timeout=options.get("close_timeout", 5.0),
            )
            done = trio.Event()
            token = trio.lowlevel.current_trio_token()
            tunnel = _Tunnel(
                pump,
                (sides[CLIENT].raw.sock, sides[BACKEND].raw.sock),  # type: ignore[union-attr]
                functools.partial(_wake_task, token, done),
            )
            self._submit("add", tunnel)
            self.handed_over += 1
            try:
                await done.wait()
            except BaseException:
                with trio.CancelScope(shield=True):
                    self._submit("remove", tunnel)
                    with trio.move_on_after(_RETURN_TIMEOUT):
                        await done.wait()
                raise
        finally:
            for side in sides:
                side.release()
        if tunnel.crash is not None:
            raise tunnel.crash
        if tunnel.idle and activity is not None:
            activity.cancel()
            await trio.lowlevel.checkpoint()
        if pump.result is None:
            raise RuntimeError("the data plane stopped while it held a tunnel")
        return pump.result

    def _hand_over(
        self, client: trio.abc.Stream, backend: trio.abc.Stream, options: dict[str, Any]
    ) -> list[trio_driver.SocketSide] | None:
        """Both sides, borrowed, if the thread can take the tunnel; else ``None``."""
        if not self.available() or options.get("tap") is not None or self._closed:
            return None
        sides = [trio_driver.side_for(client), trio_driver.side_for(backend)]
        if all(isinstance(side, trio_driver.SocketSide) for side in sides):
            return sides  # type: ignore[return-value]
        for side in sides:
            side.release()
        return None

    def poke(self) -> None:
        """Make the thread read its clock now (for a clock that jumps, as in tests)."""
        self._wake()

    def close(self) -> None:
        """Stop the thread (tunnels still in it are let go first)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._wake()
            thread.join(timeout=_RETURN_TIMEOUT)
            if not thread.is_alive():
                for sock in (self._wake_r, self._wake_w):
                    if sock is not None:
                        sock.close()

    # -- between the two ------------------------------------------------------------

    def _submit(self, command: str, tunnel: _Tunnel) -> None:
        with self._lock:
            self._commands.append((command, tunnel))
            if self._thread is None:
                self._epoll = select.epoll()
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
                self._epoll.register(self._wake_r.fileno(), _IN)
                self._thread = threading.Thread(
                    target=self._run, name="dbgrelay-data-plane", daemon=True
                )
                self._thread.start()
        self._wake()

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # a wake-up is pending already, or the plane is closed

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        epoll = self._epoll
        assert epoll is not None and self._wake_r is not None
        wake_fd = self._wake_r.fileno()
        tunnels: dict[int, _Tunnel] = {}
        # Every read lands here and leaves as a bytes of its own size: a
        # 64 KiB bytes per read, cut down to what came, leaves holes the
        # allocator cannot give back (measured as resident memory growing
        # with every round of a thousand tunnels).
        scratch = memoryview(bytearray(trio_driver.RECEIVE_SIZE))
        # When a deadline (idle, or the backend's time after the client's EOF)
        # may next be due.  Deadlines only move later with traffic, so the
        # tunnels are scanned when this passes, not on every wake-up.
        check_at = math.inf
        while True:
            timeout = -1.0 if check_at == math.inf else max(0.0, check_at - self._clock())
            events = epoll.poll(timeout)
            ready: set[_Tunnel] = set()
            for fd, _ in events:
                if fd == wake_fd:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                elif fd in tunnels:
                    # Readable, writable, hung up or failed: each shows on
                    # the next try of the socket.
                    tunnel = tunnels[fd]
                    tunnel.readable[0 if fd == tunnel.fds[0] else 1] = True
                    ready.add(tunnel)
            with self._lock:
                commands, self._commands = self._commands, []
                closed = self._closed
            for command, tunnel in commands:
                if command == "add":
                    tunnels[tunnel.fds[0]] = tunnels[tunnel.fds[1]] = tunnel
                    ready.add(tunnel)
                else:
                    self._let_go(epoll, tunnels, tunnel)
                    ready.discard(tunnel)
            if closed:
                for tunnel in set(tunnels.values()):
                    self._let_go(epoll, tunnels, tunnel)
                epoll.close()
                return
            now = self._clock()
            for tunnel in ready:
                try:
                    self._step(epoll, tunnel, now, scratch)
                except BaseException as exc:  # a bug: report it to the session
                    tunnel.crash = exc
                    self._let_go(epoll, tunnels, tunnel)
                    continue
                pump = tunnel.pump
                if pump.done:
                    self._let_go(epoll, tunnels, tunnel)
                else:
                    check_at = min(check_at, pump.idle_deadline, pump.close_deadline)
            if now >= check_at:
                check_at = math.inf
                for tunnel in set(tunnels.values()):
                    pump = tunnel.pump
                    pump.expire(now)
                    tunnel.idle = pump.idle(now)
                    if pump.done or tunnel.idle:
                        self._let_go(epoll, tunnels, tunnel)
                    else:
                        check_at = min(check_at, pump.idle_deadline, pump.close_deadline)

    @staticmethod
    def _let_go(epoll: select.epoll, tunnels: dict[int, _Tunnel], tunnel: _Tunnel) -> None:
        """Unregister the tunnel's sockets and give it back to its trio task."""
        if tunnel.released:
            return
        tunnel.released = True
        for side in (CLIENT, BACKEND):
            tunnels.pop(tunnel.fds[side], None)
            if tunnel.masks[side]:
                try:
                    epoll.unregister(tunnel.fds[side])
                except OSError:
                    pass
        tunnel.finish()

    @staticmethod
    def _step(epoll: select.epoll, tunnel: _Tunnel, now: float, scratch: memoryview) -> None:
        """Do everything the pump wants that the sockets allow now, then re-arm.

        One :meth:`Pump.wants` per side and pass: this runs for every chunk.
        """
        pump = tunnel.pump
        socks = tunnel.socks
        readable = tunnel.readable
        progress = True
        while progress:
            progress = False
            for side in (CLIENT, BACKEND):
                wants = pump.wants(side)
                if wants & SEND:
                    out = pump.to_send(side)
                    try:
                        count = socks[side].send(out)
                    except BlockingIOError:
                        count = 0
                    except OSError as exc:
                        pump.failed(side, f"socket error: {exc}")
                        return
                    if count:
                        pump.sent(side, count, now)
                        progress = True
                elif wants & SEND_EOF:
                    try:
                        socks[side].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    pump.eof_sent(side)
                    progress = True
                # Sending to this side changes what the other may read, never
                # whether this one may be read.
                if wants & READ and readable[side]:
                    try:
                        count = socks[side].recv_into(scratch)
                    except BlockingIOError:
                        readable[side] = False
                        continue
                    except OSError as exc:
                        pump.failed(side, f"socket error: {exc}")
                        return
                    # A short read drained the socket: epoll says when more comes.
                    readable[side] = count == len(scratch)
                    pump.received(side, bytes(scratch[:count]), now)
                    progress = True
        if pump.done:
            return
        for side in (CLIENT, BACKEND):
            wants = pump.wants(side)
            mask = (_IN if wants & READ else 0) | (_OUT if wants & (SEND | SEND_EOF) else 0)
            if mask != tunnel.masks[side]:
                fd = tunnel.fds[side]
                if not tunnel.masks[side]:
                    epoll.register(fd, mask)
                elif mask:
                    epoll.modify(fd, mask)
                else:
                    epoll.unregister(fd)
                tunnel.masks[side] = mask


_shared: DataPlane | None = None
_shared_lock = threading.Lock()


def shared_plane() -> DataPlane:
    """The process's data plane (one thread for every tunnel handed over)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DataPlane()
        return _shared
