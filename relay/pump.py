"""Move bytes both ways between a client stream and a backend stream.

The pump knows nothing about tokens or audit: it copies, counts and reports
why it stopped.  Everything that ends a tunnel from outside (idle timeout,
maximum session length, revocation, shutdown) is a cancel scope owned by the
session around the pump.

There are two loops with the same behaviour.  When both streams have a
:mod:`relay.fastpath` endpoint (a plaintext :class:`trio.SocketStream`, or
either engine's TLS stream over one), the fast loop drives the sockets
without blocking and awaits only when the kernel says it would block: one
scheduler trip per forwarded chunk instead of several.  Any other pair of
streams (memory streams in tests, TLS over another transport) goes through
the generic loop, which uses nothing but the :class:`trio.abc.Stream` methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .fastpath import Endpoint, endpoint_for

__all__ = ["Traffic", "PumpResult", "run_pump", "CHUNK"]

#: Read size of the generic loop.  A TLS record carries at most 16 KiB; 64 KiB
#: lets one read drain several records already buffered, and matches a
#: socket's default buffer.
CHUNK = 65536

# Per-direction reasons, from the point of view of the tunnel.
CLIENT_CLOSED = "client_closed"
BACKEND_CLOSED = "backend_closed"
CLIENT_ERROR = "client_error"
BACKEND_ERROR = "backend_error"

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(slots=True)
class Traffic:
    """Byte counts of one tunnel, updated by the pump.

    Plain integers: the session copies them into metrics in batches, so
    counting costs one addition per chunk.
    """

    to_backend: int = 0
    to_client: int = 0


@dataclass(frozen=True, slots=True)
class PumpResult:
    """Why the pump stopped: one of ``client_closed``, ``backend_closed``,
    ``client_error`` or ``backend_error``, with the error text if any."""

    reason: str
    detail: str | None = None


Tap = Callable[[str, bytes], None]


def _detail(exc: BaseException) -> str:
    return str(exc.__cause__ or exc) or type(exc).__name__


class _IdleTimer:
    """The idle timer: ``scope`` is cancelled ``timeout`` seconds after the last byte.

    Moving a cancel scope's deadline for every chunk re-sorts trio's deadline
    heap each time, which under the benchmark cost more than the rest of the
    per-chunk bookkeeping together.  Instead a chunk only records the time
    (:meth:`touch`), and :meth:`run` sleeps until the last byte plus
    ``timeout``, sleeping again as long as bytes kept moving: one wake-up per
    ``timeout`` on a busy tunnel, and an idle one closes exactly on time.
    """

    __slots__ = ("_scope", "_timeout", "_last")

    def __init__(self, scope: trio.CancelScope, timeout: float) -> None:
        self._scope = scope
        self._timeout = timeout
        self._last = trio.current_time()

    def touch(self) -> None:
        self._last = trio.current_time()

    async def run(self) -> None:
        """Cancel the scope once the tunnel has been idle for ``timeout`` seconds."""
        while True:
            due = self._last + self._timeout
            if trio.current_time() >= due:
                self._scope.cancel()
                return
            await trio.sleep_until(due)


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
        client: The TLS stream from the developer.
        backend: The plaintext stream to the debug server.
        traffic: Counters to update.
        activity: A cancel scope around the pump, cancelled once
            ``idle_timeout`` seconds pass without a byte either way (the idle
            timer); its ``cancelled_caught`` then says the tunnel was idle.
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
        The pump closes nothing; the session closes both streams.  After a
        cancellation both streams can still be closed normally (a TLS stream
        sends the records it had queued, then ``close_notify``).
    """
    timer = None
    if activity is not None and idle_timeout is not None:
        timer = _IdleTimer(activity, idle_timeout)
    client_end = endpoint_for(client)
    backend_end = endpoint_for(backend) if client_end is not None else None
    if client_end is not None and backend_end is not None:
        return await _run_fast(
            client, client_end, backend, backend_end, traffic, timer, close_timeout, tap
        )
    return await _run_generic(client, backend, traffic, timer, close_timeout, tap)


async def _half_close(
    backend: trio.abc.Stream, nursery: trio.Nursery, close_timeout: float
) -> None:
    """After the client's EOF: pass it on, and give the backend ``close_timeout``."""
    send_eof = getattr(backend, "send_eof", None)
    if send_eof is None:
        nursery.cancel_scope.cancel()
        return
    with contextlib.suppress(*_BROKEN):
        await send_eof()
    nursery.cancel_scope.deadline = min(
        nursery.cancel_scope.deadline, trio.current_time() + close_timeout
    )


async def _run_generic(
    client: trio.abc.Stream,
    backend: trio.abc.Stream,
    traffic: Traffic,
    timer: _IdleTimer | None,
    close_timeout: float,
    tap: Tap | None,
) -> PumpResult:
    result: PumpResult | None = None

    def finish(reason: str, detail: str | None = None) -> None:
        nonlocal result
        if result is None:
            result = PumpResult(reason, detail)

    async with trio.open_nursery() as nursery:

        async def client_to_backend() -> None:
            while True:
                try:
                    data = await client.receive_some(CHUNK)
                except _BROKEN as exc:
                    finish(CLIENT_ERROR, _detail(exc))
                    nursery.cancel_scope.cancel()
                    return
                if not data:
                    break
                try:
                    await backend.send_all(data)
                except _BROKEN as exc:
                    finish(BACKEND_ERROR, _detail(exc))
                    nursery.cancel_scope.cancel()
                    return
                traffic.to_backend += len(data)
                if timer is not None:
                    timer.touch()
                if tap is not None:
                    tap("c2b", data)
            finish(CLIENT_CLOSED)
            await _half_close(backend, nursery, close_timeout)

        async def backend_to_client() -> None:
            while True:
                try:
                    data = await backend.receive_some(CHUNK)
                except _BROKEN as exc:
                    finish(BACKEND_ERROR, _detail(exc))
                    break
                if not data:
                    finish(BACKEND_CLOSED)
                    break
                try:
                    await client.send_all(data)
                except _BROKEN as exc:
                    finish(CLIENT_ERROR, _detail(exc))
                    break
                traffic.to_client += len(data)
                if timer is not None:
                    timer.touch()
                if tap is not None:
                    tap("b2c", data)
            nursery.cancel_scope.cancel()

        nursery.start_soon(client_to_backend)
        nursery.start_soon(backend_to_client)
        if timer is not None:
            nursery.start_soon(timer.run)

    # Both directions record a result before they stop; an outer cancellation
    # never gets here.
    assert result is not None
    return result


async def _run_fast(
    client: trio.abc.Stream,
    client_end: Endpoint,
    backend: trio.abc.Stream,
    backend_end: Endpoint,
    traffic: Traffic,
    timer: _IdleTimer | None,
    close_timeout: float,
    tap: Tap | None,
) -> PumpResult:
    result: PumpResult | None = None

    async with trio.open_nursery() as nursery:

        async def client_to_backend() -> None:
            nonlocal result
            stopped = await _forward(client_end, backend_end, traffic, timer, tap, to_backend=True)
            if result is None:
                result = stopped or PumpResult(CLIENT_CLOSED)
            if stopped is not None:
                nursery.cancel_scope.cancel()
                return
            await _half_close(backend, nursery, close_timeout)

        async def backend_to_client() -> None:
            nonlocal result
            stopped = await _forward(backend_end, client_end, traffic, timer, tap, to_backend=False)
            if result is None:
                result = stopped or PumpResult(BACKEND_CLOSED)
            nursery.cancel_scope.cancel()

        nursery.start_soon(backend_to_client)
        if timer is not None:
            nursery.start_soon(timer.run)
        # One direction runs in this task: a tunnel holds one task fewer.
        await client_to_backend()

    assert result is not None
    return result


async def _forward(
    src: Endpoint,
    dst: Endpoint,
    traffic: Traffic,
    timer: _IdleTimer | None,
    tap: Tap | None,
    *,
    to_backend: bool,
) -> PumpResult | None:
    """Copy ``src`` to ``dst`` until EOF (``None``) or an error (its result).

    Each chunk is fully written before the next is read, so backpressure
    reaches the sender and a chunk in a scratch buffer is never overwritten
    while still needed.
    """
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    if to_backend:
        direction, src_error, dst_error = "c2b", CLIENT_ERROR, BACKEND_ERROR
    else:
        direction, src_error, dst_error = "b2c", BACKEND_ERROR, CLIENT_ERROR
    while True:
        waited = False
        try:
            # Try first only when the last read may have left data behind: after
            # a short read, waiting first saves a failing system call.
            data = src.receive_nowait() if src.maybe_readable else None
            while data is None:
                await wait_readable(src.fd)
                waited = True
                data = src.receive_nowait()
        except _BROKEN as exc:
            return PumpResult(src_error, _detail(exc))
        size = len(data)
        if not size:
            return None
        # data is a scratch buffer; the recording needs its own copy.
        chunk = bytes(data) if tap is not None else None
        try:
            if not dst.send_nowait(data):
                while True:
                    await wait_writable(dst.fd)
                    waited = True
                    if dst.flush_nowait():
                        break
        except _BROKEN as exc:
            return PumpResult(dst_error, _detail(exc))
        if to_backend:
            traffic.to_backend += size
        else:
            traffic.to_client += size
        if timer is not None:
            timer.touch()
        if chunk is not None:
            tap(direction, chunk)  # type: ignore[misc]
        if not waited:
            # Data kept coming without a wait: let the other tasks run.
            await trio.lowlevel.checkpoint()
