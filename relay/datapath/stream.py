"""The one TLS stream: a :class:`trio.abc.Stream` over a :class:`TLSConnection`.

Both engines go through this class; they differ only in the
:class:`~relay.datapath.tls.Engine` inside the connection.  It behaves like
``trio.SSLStream``: one task may send while another receives, two concurrent
senders (or receivers) get :class:`trio.BusyResourceError`, and TLS errors
become :class:`trio.BrokenResourceError` raised ``from`` the
:class:`~relay.datapath.tls.TLSError`.  Three differences, on purpose:

* a failed handshake sends the engine's alert before raising, so the peer
  reads "protocol version" or "certificate required" rather than a bare EOF;
* an EOF without ``close_notify`` is an error (``TRUNCATED``), ``close_notify``
  reads as ``b""``;
* :meth:`TLSStream.aclose` sends ``close_notify``, written without waiting
  first when the transport is a socket, so even a cancelled close ends the
  session cleanly when the socket has room.

Once the handshake is done the pump (:mod:`relay.datapath.trio_driver`) may
take the connection and the transport over (see :meth:`TLSStream.for_pump`);
both share one state, so the stream can be used, and closed cleanly, after
the pump stops at any point.
"""

from __future__ import annotations

import contextlib
import operator

import trio

from .sockets import try_send
from .tls import Engine, TLSConnection, TLSError, TLSInfo

__all__ = ["TLSStream"]

# Bytes asked of the transport per receive, and the default size of
# receive_some().  64 KiB matches trio's socket default; below glibc's mmap
# threshold, so each receive buffer is not a fresh mmap.
RECEIVE_SIZE = 65536

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


def _cause(exc: TLSError) -> BaseException:
    """The engine's own exception behind ``exc``, for ``raise ... from``."""
    return exc.__cause__ or exc


class _ConflictDetector:
    """Raise :class:`trio.BusyResourceError` when two tasks enter at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._held = False
        self._message = message

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


class TLSStream(trio.abc.Stream):
    """A TLS stream over any transport stream, run by either engine.

    Args:
        transport_stream: The stream carrying TLS records.
        conn: The TLS connection (engine in accept or connect state).

    Attributes:
        transport_stream: The wrapped stream.
        conn: The TLS state, shared with the pump while it runs.

    Resource handling:
        The stream owns ``transport_stream``: :meth:`aclose` closes it.
    """

    @classmethod
    def over(cls, transport_stream: trio.abc.Stream, engine: Engine) -> TLSStream:
        """A stream over ``transport_stream`` run by ``engine`` (accept or connect state)."""
        return cls(transport_stream, TLSConnection(engine))

    def __init__(self, transport_stream: trio.abc.Stream, conn: TLSConnection) -> None:
        self.transport_stream = transport_stream
        self.conn = conn
        self._closed = False
        self._handshake_lock = trio.Lock()
        # Bytes leave through one sender at a time, in the order TLS made them.
        self._send_lock = trio.StrictFIFOLock()
        self._send_conflict = _ConflictDetector("another task is sending on this TLS stream")
        self._recv_conflict = _ConflictDetector("another task is receiving on this TLS stream")

    # -- state ----------------------------------------------------------------

    def _check_status(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self.conn.broken:
            raise trio.BrokenResourceError("this TLS stream is broken by an earlier error")

    def for_pump(self) -> TLSConnection | None:
        """The connection, for the pump to drive over :attr:`transport_stream`.

        ``None`` unless the handshake is done and the stream neither broken
        nor closed.  While the pump drives it, nobody calls this stream's
        async methods.
        """
        conn = self.conn
        if self._closed or conn.broken or not conn.handshake_done:
            return None
        return conn

    async def _send_out(self) -> None:
        """Send everything the connection queued, in order."""
        async with self._send_lock:
            # Taken under the lock: whoever holds it sends everything queued
            # so far, so records reach the wire in the order they were made.
            out = self.conn.outgoing()
            if not out:
                return
            self.conn.sent(len(out))
            try:
                await self.transport_stream.send_all(out)
            except BaseException:
                # Some unknown part of a record may be on the wire.
                self.conn.broken = True
                raise

    def _broken(self, exc: TLSError) -> trio.BrokenResourceError:
        """The error to raise ``from`` :func:`_cause` for a TLS failure."""
        return trio.BrokenResourceError(f"TLS error: {exc}")

    # -- handshake --------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake now, or wait for the one already running.

        Sending or receiving runs the handshake implicitly; call this to
        authenticate the peer before anything else (and under a deadline).

        Raises:
            trio.BrokenResourceError: the handshake failed; the alert the
                engine wrote was sent first, as far as the transport allowed.
            trio.ClosedResourceError: the stream was closed.

        Cancellation:
            Cancelling a handshake midway leaves the stream broken: every later
            call raises :class:`trio.BrokenResourceError`, and :meth:`aclose`
            just closes the transport.
        """
        self._check_status()
        if self.conn.handshake_done:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> None:
        if self.conn.handshake_done:
            return
        async with self._handshake_lock:
            if self.conn.handshake_done:
                return
            self._check_status()
            try:
                await self._handshake()
            except BaseException:
                self.conn.broken = True
                raise

    async def _handshake(self) -> None:
        conn = self.conn
        while True:
            try:
                done = conn.handshake()
            except TLSError as exc:
                # Send the alert, best effort: the peer should read why.
                with contextlib.suppress(*_BROKEN):
                    await self._send_out()
                raise self._broken(exc) from _cause(exc)
            if conn.outgoing():
                await self._send_out()
            elif not done:
                conn.receive(await self.transport_stream.receive_some(RECEIVE_SIZE))
            if done:
                return

    # -- trio.abc.Stream ----------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive and decrypt some data; ``b""`` once the peer sent ``close_notify``.

        See :meth:`trio.abc.ReceiveStream.receive_some`.

        Raises:
            trio.BrokenResourceError: a TLS error, an EOF without
                ``close_notify``, or a broken transport.
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: this stream was closed.
        """
        with self._recv_conflict:
            if max_bytes is None:
                max_bytes = RECEIVE_SIZE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_status()
            await self._ensure_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
            conn = self.conn
            while True:
                try:
                    data = conn.read(max_bytes)
                except TLSError as exc:
                    raise self._broken(exc) from _cause(exc)
                if data is not None:
                    break
                yielded = True
                if conn.outgoing():
                    await self._send_out()
                conn.receive(await self.transport_stream.receive_some(RECEIVE_SIZE))
            if not yielded:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it on the transport.

        See :meth:`trio.abc.SendStream.send_all`.

        Raises:
            trio.BrokenResourceError: a TLS error or a broken transport.
            trio.BusyResourceError: another task is sending.
            trio.ClosedResourceError: this stream was closed.

        Cancellation:
            Cancelling may leave part of a record sent, so it breaks the
            stream, as with :class:`trio.SSLStream`.
        """
        with self._send_conflict:
            self._check_status()
            await self._ensure_handshake()
            if data:
                try:
                    self.conn.write(data)
                except TLSError as exc:
                    raise self._broken(exc) from _cause(exc)
            await self._send_out()
            if not data:
                await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        with self._send_conflict:
            self._check_status()
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort), then close the transport.

        Ciphertext the pump left queued goes out before ``close_notify``.  On
        a socket both are first written without waiting, so a cancelled close
        (:func:`trio.aclose_forcefully`) still tells the peer the stream
        ended cleanly whenever the socket has room.  The peer's reply is not
        awaited, as with :class:`trio.SSLStream`.

        Cancellation:
            Safe: a cancelled ``aclose`` still closes the transport and leaves
            the stream closed.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        conn = self.conn
        if conn.broken or not conn.handshake_done:
            await self.transport_stream.aclose()
            return
        try:
            conn.close()
            out = conn.outgoing()
            conn.sent(len(out))
            if out and not self._send_lock.locked():
                out = out[try_send(self.transport_stream, out) :]
            if out:
                with contextlib.suppress(trio.BrokenResourceError, trio.BusyResourceError):
                    async with self._send_lock:
                        await self.transport_stream.send_all(out)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()

    # -- introspection ----------------------------------------------------------

    def session(self) -> object | None:
        """The engine's session, to resume a later connection with (client side).

        A TLS 1.3 session can resume only once its ticket arrived, which the
        server sends after the handshake: take it after reading from the
        stream.
        """
        return self.conn.engine.session()

    def resumed(self) -> bool:
        """Whether the handshake resumed the session the stream was given."""
        return self.conn.engine.resumed()

    def tls_info(self) -> TLSInfo:
        """What the handshake negotiated.

        Raises:
            trio.NeedHandshakeError: the handshake has not completed.
        """
        if not self.conn.handshake_done:
            raise trio.NeedHandshakeError("call do_handshake() before tls_info()")
        return self.conn.info()
