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
        "settled",
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
        # Armed for reading on both sides with nothing to send (see _step).
        self.settled = False


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
        # fd -> (tunnel, side)
        tunnels: dict[int, tuple[_Tunnel, int]] = {}
        # Every read lands here and leaves as a bytes of its own size: a
        # 64 KiB bytes per read, cut down to what came, leaves holes the
        # allocator cannot give back (measured as resident memory growing
        # with every round of a thousand tunnels).
        scratch = memoryview(bytearray(trio_driver.RECEIVE_SIZE))
        # When a deadline (idle, or the backend's time after the client's EOF)
        # may next be due.  Deadlines only move later with traffic, so this
        # is lowered only when a tunnel comes or sets a close deadline, and
        # the tunnels are scanned when it passes, not on every wake-up.
        check_at = math.inf
        clock = self._clock
        step = self._step
        while True:
            events = epoll.poll(-1.0 if check_at == math.inf else max(0.0, check_at - clock()))
            now = clock()
            for fd, _ in events:
                entry = tunnels.get(fd)
                if entry is None:
                    if fd == wake_fd:
                        self._drain_wake()
                    continue
                # Readable, writable, hung up or failed: each shows on the
                # next try of the socket.
                tunnel, side = entry
                tunnel.readable[side] = True
                was_settled = tunnel.settled
                try:
                    step(epoll, tunnel, now, scratch)
                except BaseException as exc:  # a bug: report it to the session
                    tunnel.crash = exc
                    self._let_go(epoll, tunnels, tunnel)
                    continue
                pump = tunnel.pump
                if pump.done:
                    self._let_go(epoll, tunnels, tunnel)
                elif not (was_settled and tunnel.settled):
                    check_at = min(check_at, pump.idle_deadline, pump.close_deadline)
            # Read without the lock: a command appended after this look has
            # its wake-up byte still unread, so the next poll returns at once.
            if self._commands or self._closed:
                with self._lock:
                    commands, self._commands = self._commands, []
                    closed = self._closed
                for command, tunnel in commands:
                    if command == "add":
                        tunnels[tunnel.fds[CLIENT]] = (tunnel, CLIENT)
                        tunnels[tunnel.fds[BACKEND]] = (tunnel, BACKEND)
                        # Armed for everything: the next poll returns at
                        # once (a new socket is writable) for a first step,
                        # which then arms each side for what it wants.
                        for fd in tunnel.fds:
                            epoll.register(fd, _IN | _OUT)
                        tunnel.masks = [_IN | _OUT, _IN | _OUT]
                        pump = tunnel.pump
                        check_at = min(check_at, pump.idle_deadline, pump.close_deadline)
                    else:
                        self._let_go(epoll, tunnels, tunnel)
                if closed:
                    for tunnel, _ in list(tunnels.values()):
                        self._let_go(epoll, tunnels, tunnel)
                    epoll.close()
                    return
            if now >= check_at:
                check_at = math.inf
                for tunnel, side in list(tunnels.values()):
                    if side == BACKEND:
                        continue  # each tunnel once
                    pump = tunnel.pump
                    pump.expire(now)
                    tunnel.idle = pump.idle(now)
                    if pump.done or tunnel.idle:
                        self._let_go(epoll, tunnels, tunnel)
                    else:
                        check_at = min(check_at, pump.idle_deadline, pump.close_deadline)

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    @staticmethod
    def _let_go(
        epoll: select.epoll, tunnels: dict[int, tuple[_Tunnel, int]], tunnel: _Tunnel
    ) -> None:
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

        This runs for every chunk, so the common case is short: a tunnel is
        *settled* while both sides are armed for reading only and nothing
        waits to be sent.  A settled tunnel's step reads the side that
        became readable, sends the other side what the pump made of it, and
        asks the pump nothing more.  Anything else (a short send, an EOF, a
        side the pump stopped reading) unsettles it, and the step then asks
        the pump what each side wants and re-arms to match.
        """
        pump = tunnel.pump
        socks = tunnel.socks
        readable = tunnel.readable
        settled = tunnel.settled
        if not settled:
            # Bytes or an EOF may be waiting for a side that became writable.
            for side in (CLIENT, BACKEND):
                _flush(pump, socks[side], side, now)
            if pump.done:
                return
        full = len(scratch)
        for side in (CLIENT, BACKEND):
            if not readable[side]:
                continue
            sock = socks[side]
            other = 1 - side
            to = socks[other]
            # A settled tunnel wants both sides read: no need to ask first.
            wanted = settled
            while readable[side] and (wanted or pump.wants_read(side)):
                wanted = False
                try:
                    count = sock.recv_into(scratch)
                except BlockingIOError:
                    readable[side] = False
                    break
                except OSError as exc:
                    pump.failed(side, f"socket error: {exc}")
                    return
                # A short read drained the socket: epoll says when more comes.
                readable[side] = count == full
                if not count:
                    pump.received(side, b"", now)
                    settled = False
                    break
                out = pump.received(side, bytes(scratch[:count]), now)
                if out:
                    # One send: the whole chunk, almost always.  Anything
                    # left (a short write, more records) unsettles the
                    # tunnel, and the flush below sends what the socket takes.
                    try:
                        written = to.send(out)
                    except BlockingIOError:
                        written = 0
                    except OSError as exc:
                        pump.failed(other, f"socket error: {exc}")
                        return
                    if pump.sent(other, written, now):
                        settled = False
                if pump.done:
                    return
        if settled and pump.result is None:
            return
        # Something changed: a side ended or is behind.  Send what is due
        # (an EOF first of all), then arm each socket for what its side wants.
        for side in (CLIENT, BACKEND):
            _flush(pump, socks[side], side, now)
        if pump.done:
            return
        settled = True
        for side in (CLIENT, BACKEND):
            wants = pump.wants(side)
            mask = (_IN if wants & READ else 0) | (_OUT if wants & (SEND | SEND_EOF) else 0)
            if mask != _IN:
                settled = False
            if mask != tunnel.masks[side]:
                fd = tunnel.fds[side]
                if not tunnel.masks[side]:
                    epoll.register(fd, mask)
                elif mask:
                    epoll.modify(fd, mask)
                else:
                    epoll.unregister(fd)
                tunnel.masks[side] = mask
        tunnel.settled = settled


def _flush(pump: Pump, sock: socket.socket, side: int, now: float) -> None:
    """Send ``side`` what the pump has for it, and its EOF when due, until the socket is full."""
    out = pump.to_send(side)
    while out:
        try:
            count = sock.send(out)
        except BlockingIOError:
            return
        except OSError as exc:
            pump.failed(side, f"socket error: {exc}")
            return
        rest = pump.sent(side, count, now)
        if count < len(out):
            return
        out = rest
    if pump.wants_eof(side):
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        pump.eof_sent(side)


_shared: DataPlane | None = None
_shared_lock = threading.Lock()


def shared_plane() -> DataPlane:
    """The process's data plane (one thread for every tunnel handed over)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = DataPlane()
        return _shared
