"""The tunnel pump as a state machine: what to read, what to write, when it ends.

:class:`Pump` holds the forwarding logic of one tunnel and does no I/O, the
way :class:`h11.Connection` holds HTTP without a socket.  A driver
(:mod:`relay.datapath.trio_driver`) tells it what happened on each side
(:meth:`Pump.received` bytes or an EOF, :meth:`Pump.sent` some bytes, a
:meth:`Pump.failed` transport) and asks it what to do next
(:meth:`Pump.to_send`, :meth:`Pump.wants_read`, :meth:`Pump.wants_eof`,
or all three at once as :meth:`Pump.wants`, :attr:`Pump.idle_deadline`,
:attr:`Pump.close_deadline`).  Time is an
argument, never read here.

Each side has a :class:`Codec` between the wire and the plaintext: nothing
(:class:`PlainCodec`) or TLS (the same
:class:`~relay.datapath.tls.TLSConnection` the trio stream used for the
handshake).

The rules, from the tunnel's point of view:

* Backpressure: a side is read only once everything read from the other
  direction's last chunk was written, so a slow reader slows the sender.
* The client's EOF passes to the backend as a half-close when the backend
  can take one; the backend may then answer for ``close_timeout`` seconds.
  Otherwise the tunnel ends.  The backend's EOF ends the tunnel once all it
  sent reached the client.
* An error on either side ends the tunnel.  An error or ``close_notify``
  decrypted in the same read as good records takes effect once those records
  were delivered.
* The first reason recorded is the result.
* Bytes are counted, tapped and make the tunnel busy (idle deadline) once
  written whole to the other side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .tls import TLSError

__all__ = [
    "READ",
    "SEND",
    "SEND_EOF",
    "BACKEND",
    "BACKEND_CLOSED",
    "BACKEND_ERROR",
    "CLIENT",
    "CLIENT_CLOSED",
    "CLIENT_ERROR",
    "CodecError",
    "Codec",
    "PlainCodec",
    "Pump",
    "PumpResult",
    "Tap",
    "Traffic",
]

#: The two sides, as indexes.
CLIENT = 0
BACKEND = 1

#: What :meth:`Pump.wants` of a side: bits.
READ = 1
SEND = 2
SEND_EOF = 4

# Why a tunnel ended, from the point of view of the tunnel.
CLIENT_CLOSED = "client_closed"
BACKEND_CLOSED = "backend_closed"
CLIENT_ERROR = "client_error"
BACKEND_ERROR = "backend_error"

_CLOSED = (CLIENT_CLOSED, BACKEND_CLOSED)
_ERROR = (CLIENT_ERROR, BACKEND_ERROR)
_DIRECTION = ("c2b", "b2c")

Tap = Callable[[str, bytes], None]


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


class CodecError(Exception):
    """A side cannot encode what it was given (its TLS session broke)."""


class Codec(Protocol):
    """Between one side's wire and its plaintext.

    :class:`PlainCodec` is the side without TLS; a TLS side's codec is its
    :class:`~relay.datapath.tls.TLSConnection` itself (the one the trio
    stream ran the handshake on), so the pump calls the connection's methods
    directly.  Every call here runs for every chunk.

    Attributes:
        can_half_close: Whether the side can take an EOF and keep sending.
        more: Whether the last :meth:`decode` stopped at its limit, so that
            more may be decoded without new wire bytes.
    """

    can_half_close: bool
    more: bool

    def decode(self, data: bytes | None) -> tuple[bytes, str | None]:
        """Plaintext from wire bytes (``b""``: EOF; ``None``: only what is buffered).

        Returns:
            ``(plaintext, end)``: ``end`` is ``None`` while the stream goes
            on, ``""`` when it ended cleanly behind the plaintext, else the
            text of the error that broke it (after the plaintext).
        """
        ...

    def buffered(self) -> bool:
        """Whether :meth:`decode` may return something without new wire bytes."""
        ...

    def encode(self, data: bytes) -> bytes | memoryview:
        """Queue ``data`` for the wire.

        Returns:
            Everything queued for the wire now, as :meth:`outgoing`.

        Raises:
            CodecError: the side cannot take it (or
                :class:`~relay.datapath.tls.TLSError`, from a TLS side).
        """
        ...

    def outgoing(self) -> bytes | memoryview:
        """Wire bytes queued and not yet sent."""
        ...

    def sent(self, count: int) -> bytes | memoryview:
        """``count`` bytes of :meth:`outgoing` reached the wire; returns the rest."""
        ...


class PlainCodec:
    """A side without TLS: the wire bytes are the plaintext.

    Args:
        can_half_close: Whether the transport can send an EOF and keep reading.
    """

    __slots__ = ("can_half_close", "_out")

    #: A chunk is decoded whole.
    more = False

    def __init__(self, *, can_half_close: bool = True) -> None:
        self.can_half_close = can_half_close
        self._out: bytes | memoryview = b""

    def decode(self, data: bytes | None) -> tuple[bytes, str | None]:
        if data is None:
            return b"", None
        return data, (None if data else "")

    def buffered(self) -> bool:
        return False

    def encode(self, data: bytes) -> bytes | memoryview:
        self._out = out = bytes(self._out) + data if self._out else data
        return out

    def outgoing(self) -> bytes | memoryview:
        return self._out

    def sent(self, count: int) -> bytes | memoryview:
        # A view, not a copy: a short write of a large chunk is cut again.
        self._out = out = memoryview(self._out)[count:] if count < len(self._out) else b""
        return out


class Pump:
    """The forwarding state of one tunnel.

    Args:
        client: The client side's codec (the developer's end).
        backend: The backend side's codec (the debug server's end).
        traffic: Counters to update.
        now: The current time, in the driver's clock.
        idle_timeout: Seconds without a byte delivered either way before
            :attr:`idle_deadline`; ``None`` for never.
        close_timeout: Seconds the backend may still send after the client's EOF.
        tap: Called with ``("c2b" | "b2c", data)`` for every chunk once
            delivered (recording).  An exception from it propagates out of
            the call that delivered the chunk.
    """

    __slots__ = (
        "codecs",
        "traffic",
        "result",
        "done",
        "idle_deadline",
        "close_deadline",
        "_idle_timeout",
        "_close_timeout",
        "_tap",
        "_inflight",
        "_ending",
        "_ended",
        "_eof_due",
    )

    def __init__(
        self,
        client: Codec,
        backend: Codec,
        traffic: Traffic,
        *,
        now: float,
        idle_timeout: float | None = None,
        close_timeout: float = 5.0,
        tap: Tap | None = None,
    ) -> None:
        self.codecs = (client, backend)
        self.traffic = traffic
        #: The first reason recorded, ``None`` while both directions run.
        self.result: PumpResult | None = None
        #: True once nothing more is to be moved either way.
        self.done = False
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        #: When the tunnel counts as idle, in the driver's clock.
        self.idle_deadline = math.inf if idle_timeout is None else now + idle_timeout
        #: When the backend's time to answer after the client's EOF is up.
        self.close_deadline = math.inf
        self._tap = tap
        # Per direction (index of the side read): plaintext written to the
        # other side and not yet delivered whole.
        self._inflight: list[bytes | None] = [None, None]
        # Per side: how its stream ended (CLOSED/ERROR reason, detail), to
        # act on once the chunk in flight from it is delivered.
        self._ending: list[tuple[str, str | None] | None] = [None, None]
        self._ended = [False, False]
        self._eof_due = [False, False]
        for side in (CLIENT, BACKEND):
            if self.codecs[side].buffered():
                # Records that came in behind the tunnel request, still in TLS.
                self.received(side, None, now)

    # -- what the driver is told ------------------------------------------------

    def received(self, side: int, data: bytes | None, now: float) -> bytes | memoryview:
        """``data`` was read from ``side``'s wire; ``b""`` is its EOF.

        ``None`` decodes only what the side's codec holds already (records
        that came with an earlier read).

        Returns:
            What is now to be written to the other side, as :meth:`to_send`
            would answer (the driver's next call, saved).

        Raises:
            RuntimeError: the driver read ``side`` while :meth:`wants_read`
                said not to (a bug in the driver: backpressure would be lost).
        """
        if self.done or self._ended[side]:
            return b""
        if self._inflight[side] is not None:
            raise RuntimeError("the pump was given bytes from a side it did not want read")
        plain, end = self.codecs[side].decode(data)
        if end is not None:
            self._ended[side] = True
            if end:
                self._ending[side] = (_ERROR[side], end)
            else:
                self._ending[side] = (_CLOSED[side], None)
        if not plain:
            self._act_on_ending(side, now)
            return self.to_send(1 - side)
        try:
            out = self.codecs[1 - side].encode(plain)
        except (CodecError, TLSError) as exc:
            self.failed(1 - side, str(exc))
            return b""
        self._inflight[side] = plain
        return out

    def sent(self, side: int, count: int, now: float) -> bytes | memoryview:
        """``count`` bytes of :meth:`to_send` for ``side`` were written.

        Returns:
            What is still to be written to ``side``, as :meth:`to_send`
            would answer: the rest of a short write, or records that were
            waiting behind the chunk this delivered.

        Raises:
            Exception: whatever the tap raised for the chunk this delivered.
        """
        out = self.codecs[side].sent(count)
        if out:
            return out
        # The chunk read from the other side is now written whole.
        side = 1 - side
        chunk = self._inflight[side]
        if chunk is None:
            return b""
        self._inflight[side] = None
        if side == CLIENT:
            self.traffic.to_backend += len(chunk)
        else:
            self.traffic.to_client += len(chunk)
        if self._idle_timeout is not None:
            self.idle_deadline = now + self._idle_timeout
        if self._tap is not None:
            self._tap(_DIRECTION[side], chunk)
        if self._ending[side] is not None:
            self._act_on_ending(side, now)
        elif not self._ended[side] and self.codecs[side].more:
            # More records than one chunk's worth were waiting in TLS.
            return self.received(side, None, now)
        return b""

    def eof_sent(self, side: int) -> None:
        """The half-close :meth:`wants_eof` asked for was done."""
        self._eof_due[side] = False

    def failed(self, side: int, detail: str) -> None:
        """Reading or writing ``side``'s transport failed."""
        self._finish(CLIENT_ERROR if side == CLIENT else BACKEND_ERROR, detail)

    def expire(self, now: float) -> None:
        """Check :attr:`close_deadline`: past it, the pump is done."""
        if now >= self.close_deadline:
            self.done = True

    # -- what the driver asks -------------------------------------------------------

    def to_send(self, side: int) -> bytes | memoryview:
        """Wire bytes to write to ``side`` now (empty when none)."""
        if self.done:
            return b""
        return self.codecs[side].outgoing()

    def wants_eof(self, side: int) -> bool:
        """Whether the driver should half-close ``side`` now."""
        return self._eof_due[side] and not self.done

    def wants_read(self, side: int) -> bool:
        """Whether ``side`` should be read now.

        False once it ended, once the tunnel is done, and while the last chunk
        read from it is still being written (backpressure).
        """
        return not (self.done or self._ended[side] or self._inflight[side] is not None)

    def wants(self, side: int) -> int:
        """Everything the driver should do with ``side`` now, in one call.

        Returns:
            Bits: :data:`READ` as :meth:`wants_read`, :data:`SEND` when
            :meth:`to_send` has bytes, :data:`SEND_EOF` when
            :meth:`wants_eof` and nothing is left to send first; 0 once the
            tunnel is done.
        """
        if self.done:
            return 0
        bits = READ if not (self._ended[side] or self._inflight[side] is not None) else 0
        if self.codecs[side].outgoing():
            bits |= SEND
        elif self._eof_due[side]:
            bits |= SEND_EOF
        return bits

    def idle(self, now: float) -> bool:
        """Whether the tunnel has been idle for ``idle_timeout``."""
        return now >= self.idle_deadline

    # -- the machine -----------------------------------------------------------------

    def _act_on_ending(self, side: int, now: float) -> None:
        ending = self._ending[side]
        if ending is None:
            return
        self._ending[side] = None
        reason, detail = ending
        if reason in _ERROR:
            self._finish(reason, detail)
        elif side == BACKEND:
            self._finish(reason)
        else:
            if self.result is None:
                self.result = PumpResult(reason)
            if self.codecs[BACKEND].can_half_close:
                self._eof_due[BACKEND] = True
                self.close_deadline = min(self.close_deadline, now + self._close_timeout)
            else:
                self.done = True

    def _finish(self, reason: str, detail: str | None = None) -> None:
        if self.result is None:
            self.result = PumpResult(reason, detail)
        self.done = True
