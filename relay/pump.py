"""Move bytes both ways between a client stream and a backend stream.

The pump knows nothing about tokens or audit: it copies, counts and reports
why it stopped.  Everything that ends a tunnel from outside (idle timeout,
maximum session length, revocation, shutdown) is a cancel scope owned by the
session around the pump.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["Traffic", "PumpResult", "run_pump", "CHUNK"]

#: Read size.  A TLS record carries at most 16 KiB; 64 KiB lets one read drain
#: several records already buffered, and matches a socket's default buffer.
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
        activity: A cancel scope whose deadline is pushed to
            ``now + idle_timeout`` every time bytes move (the idle timer).
        idle_timeout: Seconds without a byte either way before ``activity``
            fires.  Ignored without ``activity``.
        close_timeout: Seconds the backend may still send after the client's EOF.
        tap: Called with ``("c2b" | "b2c", data)`` for every chunk (recording).

    Returns:
        Why the pump stopped.  Cancellation (idle, shutdown, ...) propagates;
        the caller's scopes say why.

    Resource handling:
        The pump closes nothing; the session closes both streams.
    """
    result: PumpResult | None = None

    def finish(reason: str, detail: str | None = None) -> None:
        nonlocal result
        if result is None:
            result = PumpResult(reason, detail)

    if activity is not None and idle_timeout is not None:
        activity.deadline = trio.current_time() + idle_timeout

    def touch() -> None:
        if activity is not None and idle_timeout is not None:
            activity.deadline = trio.current_time() + idle_timeout

    async with trio.open_nursery() as nursery:

        async def client_to_backend() -> None:
            while True:
                try:
                    data = await client.receive_some(CHUNK)
                except _BROKEN as exc:
                    finish(CLIENT_ERROR, str(exc.__cause__ or exc) or type(exc).__name__)
                    nursery.cancel_scope.cancel()
                    return
                if not data:
                    break
                try:
                    await backend.send_all(data)
                except _BROKEN as exc:
                    finish(BACKEND_ERROR, str(exc.__cause__ or exc) or type(exc).__name__)
                    nursery.cancel_scope.cancel()
                    return
                traffic.to_backend += len(data)
                touch()
                if tap is not None:
                    tap("c2b", data)
            finish(CLIENT_CLOSED)
            send_eof = getattr(backend, "send_eof", None)
            if send_eof is None:
                nursery.cancel_scope.cancel()
                return
            with contextlib.suppress(*_BROKEN):
                await send_eof()
            nursery.cancel_scope.deadline = min(
                nursery.cancel_scope.deadline, trio.current_time() + close_timeout
            )

        async def backend_to_client() -> None:
            while True:
                try:
                    data = await backend.receive_some(CHUNK)
                except _BROKEN as exc:
                    finish(BACKEND_ERROR, str(exc.__cause__ or exc) or type(exc).__name__)
                    break
                if not data:
                    finish(BACKEND_CLOSED)
                    break
                try:
                    await client.send_all(data)
                except _BROKEN as exc:
                    finish(CLIENT_ERROR, str(exc.__cause__ or exc) or type(exc).__name__)
                    break
                traffic.to_client += len(data)
                touch()
                if tap is not None:
                    tap("b2c", data)
            nursery.cancel_scope.cancel()

        nursery.start_soon(client_to_backend)
        nursery.start_soon(backend_to_client)

    # Both directions record a result before they stop; an outer cancellation
    # never gets here.
    assert result is not None
    return result
