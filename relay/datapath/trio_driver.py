"""The trio driver of the tunnel pump: system calls and waits, nothing else.

:func:`run_pump` feeds a :class:`~relay.datapath.pump.Pump` what each side's
transport did and does what the pump answers.  It runs wherever trio runs
(Linux, macOS, Windows), in production and in the tests alike: a side whose
transport is a :class:`trio.SocketStream` is driven through its socket
without blocking (:class:`~relay.datapath.sockets.RawSocket`), awaiting only
when the kernel says it would block, so a forwarded chunk costs one trip
through trio's scheduler; any other transport (memory streams in tests, a
pipe) goes through its :class:`trio.abc.Stream` methods.  Either way the
same pump decides.

A TLS side (:class:`~relay.datapath.stream.TLSStream` with its handshake
done) is driven below the stream: the pump decrypts and encrypts on the
stream's own connection and the driver moves ciphertext on its transport.

One task per direction, the pump's own running client to backend: each side
is read by one task and written by the other, and the chunk read from a side
is written whole before that side is read again (backpressure).
"""

from __future__ import annotations

import math

import trio

from .pump import BACKEND, CLIENT, Codec, PlainCodec, Pump, PumpResult, Tap, Traffic
from .sockets import RawSocket
from .stream import TLSStream
from .tls import TLSConnection

__all__ = ["RECEIVE_SIZE", "run_pump"]

#: Bytes asked of a transport per read: 64 KiB less 256, large enough that a
#: bulk transfer pays the per-chunk cost rarely.  A full read of plaintext,
#: encrypted, is four records with at most 29 bytes of framing each: 65,396
#: bytes at most, inside one loopback TCP segment (see
#: :data:`~relay.datapath.tls.PLAINTEXT_LIMIT` for why that matters).  Each
#: read gets a fresh ``bytes`` (the pump keeps a chunk until it is written
#: whole), so no buffer is shared between tunnels or held by an idle one.
RECEIVE_SIZE = 65536 - 256

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"socket error: {exc}"
    return str(exc.__cause__ or exc) or type(exc).__name__


class SocketSide:
    """A side over a socket: try the call first, wait only if it would block."""

    __slots__ = ("codec", "stream", "raw", "maybe_readable", "waited")

    def __init__(self, codec: Codec, stream: trio.SocketStream) -> None:
        self.codec = codec
        self.stream = stream
        self.raw = RawSocket(stream)
        # False after a short read: the socket is drained, so wait before the
        # next read rather than pay a failing system call.
        self.maybe_readable = True
        self.waited = False

    async def receive(self) -> bytes:
        sock = self.raw.sock
        if self.maybe_readable:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                pass
            else:
                self.maybe_readable = len(data) == RECEIVE_SIZE
                return data
        while True:
            await trio.lowlevel.wait_readable(sock)
            self.waited = True
            try:
                data = sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue
            self.maybe_readable = len(data) == RECEIVE_SIZE
            return data

    async def send(self, data: bytes | memoryview) -> int:
        sock = self.raw.sock
        try:
            return sock.send(data)
        except BlockingIOError:
            pass
        await trio.lowlevel.wait_writable(sock)
        self.waited = True
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    def release(self) -> None:
        self.raw.release()


class StreamSide:
    """A side over any other :class:`trio.abc.Stream`."""

    __slots__ = ("codec", "stream", "waited")

    def __init__(self, codec: Codec, stream: trio.abc.Stream) -> None:
        self.codec = codec
        self.stream = stream
        self.waited = True  # every call is a checkpoint

    async def receive(self) -> bytes:
        return bytes(await self.stream.receive_some(RECEIVE_SIZE))

    async def send(self, data: bytes | memoryview) -> int:
        try:
            await self.stream.send_all(data)
        except BaseException:
            if isinstance(self.codec, TLSConnection):
                # Some unknown part of a record may be out: the TLS stream
                # cannot go on, nor resend the rest when closed.
                self.codec.broken = True
            raise
        return len(data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]

    def release(self) -> None:
        pass


_Side = SocketSide | StreamSide


def side_for(stream: trio.abc.Stream) -> _Side:
    """How the pump reaches ``stream``: its codec, and its socket or stream.

    Resource handling:
        A :class:`SocketSide` borrows the socket: :meth:`SocketSide.release`
        it when done.
    """
    codec: Codec
    conn = stream.for_pump() if isinstance(stream, TLSStream) else None
    if conn is not None:
        codec = conn
        transport = stream.transport_stream  # type: ignore[attr-defined]
    else:
        codec = PlainCodec(can_half_close=hasattr(stream, "send_eof"))
        transport = stream
    if type(transport) is trio.SocketStream:
        return SocketSide(codec, transport)
    return StreamSide(codec, transport)


def pump_between(
    sides: list[_Side],
    traffic: Traffic,
    now: float,
    *,
    idle_timeout: float | None,
    close_timeout: float,
    tap: Tap | None = None,
) -> Pump:
    """The pump for a tunnel between the ``[client, backend]`` sides (both drivers)."""
    return Pump(
        sides[CLIENT].codec,
        sides[BACKEND].codec,
        traffic,
        now=now,
        idle_timeout=idle_timeout,
        close_timeout=close_timeout,
        tap=tap,
    )


async def run_pump(
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    traffic: Traffic,
    *,
    activity: trio.CancelScope | None = None,
    idle_timeout: float | None = None,
    close_timeout: float = 5.0,
    tap: Tap | None = None,
) -> PumpResult:
    """Copy bytes both ways until one side ends.

    When the client reaches EOF, the backend gets ``send_eof()`` (if it can
    half-close) and may keep answering for at most ``close_timeout`` seconds:
    a debugger's last reply is not cut off, and a backend that never closes
    cannot hold the tunnel open.  When the backend closes, the client side is
    done as soon as everything the backend sent was written.

    Args:
        client: The developer's stream (TLS on the relay, plaintext in the
            connector).
        backend: The debug server's stream (plaintext on the relay, TLS in the
            connector).
        traffic: Counters to update.
        activity: A cancel scope around the pump, cancelled once
            ``idle_timeout`` seconds pass without a byte either way; its
            ``cancelled_caught`` then says the tunnel was idle.
        idle_timeout: Seconds without a byte either way before ``activity``
            is cancelled.  Ignored without ``activity``.
        close_timeout: Seconds the backend may still send after the client's EOF.
        tap: Called with ``("c2b" | "b2c", data)`` for every chunk (recording),
            after the chunk was delivered.  An exception from it ends the
            pump and propagates inside an :class:`ExceptionGroup`.

    Returns:
        Why the pump stopped.  Cancellation (idle, shutdown, ...) propagates;
        the caller's scopes say why.

    Resource handling:
        The pump closes nothing; the caller closes both streams.  After the
        pump stops, for any reason, both streams can still be closed
        normally: a TLS stream sends the records the pump left queued, then
        ``close_notify``.
    """
    if activity is None:
        idle_timeout = None
    sides: list[_Side] = []
    try:
        sides.append(side_for(client))
        sides.append(side_for(backend))
        pump = pump_between(
            sides,
            traffic,
            trio.current_time(),
            idle_timeout=idle_timeout,
            close_timeout=close_timeout,
            tap=tap,
        )
        sweeper = None
        if activity is not None and idle_timeout is not None:
            sweeper = _sweeper()
            sweeper.watch(pump, activity)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_direction, pump, sides, BACKEND, nursery)
            # One direction runs in this task: a tunnel holds one task fewer.
            await _run_direction(pump, sides, CLIENT, nursery)
    finally:
        if sweeper is not None:
            sweeper.forget(pump)
        for side in sides:
            side.release()
    # Every way out but an outer cancellation records a result first.
    assert pump.result is not None
    return pump.result


async def _run_direction(pump: Pump, sides: list[_Side], src: int, nursery: trio.Nursery) -> None:
    """Read ``src``, write the other side, as the pump says, until it is done."""
    dst = 1 - src
    reader, writer = sides[src], sides[dst]
    current_time = trio.current_time
    while not pump.done:
        out = pump.to_send(dst)
        if out:
            try:
                count = await writer.send(out)
            except (OSError, *_BROKEN) as exc:
                pump.failed(dst, _detail(exc))
                break
            pump.sent(dst, count, current_time())
        elif pump.wants_eof(dst):
            try:
                await writer.send_eof()
            except _BROKEN:
                pass
            pump.eof_sent(dst)
            # The backend's time to answer runs from now.
            scope = nursery.cancel_scope
            scope.deadline = min(scope.deadline, pump.close_deadline)
        elif pump.wants_read(src):
            if not (reader.waited or writer.waited):
                # The last chunk came and went without a wait: let the other
                # tasks run before the next one.
                await trio.lowlevel.checkpoint()
            reader.waited = writer.waited = False
            try:
                data = await reader.receive()
            except (OSError, *_BROKEN) as exc:
                pump.failed(src, _detail(exc))
                break
            pump.received(src, data, current_time())
        else:
            # This direction ended (the client's EOF, passed on); the other
            # goes on until the close deadline.
            return
    nursery.cancel_scope.cancel()


class IdleSweeper:
    """Ends idle tunnels: one task for every tunnel of a trio run.

    A task per tunnel that sleeps until its idle deadline costs a task and
    a deadline in trio's heap for each tunnel.  Moving a cancel scope's
    deadline for every chunk would re-sort that heap each time; instead each
    pump only records its deadline, and this task sleeps until the earliest
    one, looks at every watched pump, cancels the ``activity`` scope of each
    whose deadline has passed and sleeps again.  A busy tunnel costs a look
    per wake-up; an idle one is ended exactly on time.
    """

    def __init__(self) -> None:
        self._watched: dict[Pump, trio.CancelScope] = {}
        self._due = math.inf
        self._wake = trio.Event()

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, pump: Pump, activity: trio.CancelScope) -> None:
        """Cancel ``activity`` once ``pump`` has been idle past its deadline."""
        self._watched[pump] = activity
        if pump.idle_deadline < self._due:
            self._wake.set()

    def forget(self, pump: Pump) -> None:
        """Stop watching ``pump`` (its tunnel ended)."""
        self._watched.pop(pump, None)

    def sweep(self, now: float) -> float:
        """Cancel the scopes of pumps idle at ``now``; return the next deadline."""
        due = math.inf
        for pump, activity in list(self._watched.items()):
            deadline = pump.idle_deadline
            if deadline <= now:
                activity.cancel()
                del self._watched[pump]
            elif deadline < due:
                due = deadline
        return due

    async def run(self) -> None:
        """Sweep at each earliest deadline, and whenever an earlier one is watched."""
        while True:
            self._wake = trio.Event()
            self._due = self.sweep(trio.current_time())
            with trio.move_on_at(self._due):
                await self._wake.wait()


_SWEEPER: trio.lowlevel.RunVar[IdleSweeper] = trio.lowlevel.RunVar("dbgrelay_idle_sweeper")


def _sweeper() -> IdleSweeper:
    """This trio run's sweeper, started (as a system task) on first use."""
    try:
        return _SWEEPER.get()
    except LookupError:
        sweeper = IdleSweeper()
        _SWEEPER.set(sweeper)
        trio.lowlevel.spawn_system_task(sweeper.run, name="dbgrelay idle sweeper")
        return sweeper
