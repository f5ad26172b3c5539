"""Non-blocking endpoints for the pump's fast path: raw sockets, no per-call awaits.

Moving one chunk through :class:`trio.SocketStream` and :class:`trio.SSLStream`
costs several trips through trio's scheduler (every successful socket call
ends in a checkpoint) plus the stream's locks and retry loop.  Under the
benchmark, that per-chunk machinery, not the bytes or the crypto, was most of
a relay's time per round trip.  The fast path instead tries each socket
operation without blocking and only awaits
:func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable`
when the kernel says it would block, so a forwarded chunk costs one scheduler
trip.

An :class:`Endpoint` is one side of a tunnel seen this way: plaintext comes
out of :meth:`~Endpoint.receive_nowait` and goes in through
:meth:`~Endpoint.send_nowait`.  :class:`SocketEndpoint` wraps a plaintext
:class:`trio.SocketStream`; the TLS streams of both engines (:mod:`relay.tls`,
:mod:`relay.tls_openssl`) are endpoints themselves (they decrypt and encrypt
between the socket and the caller).

Sockets: the endpoints call ``recv_into`` and ``send`` on the stdlib socket
under the trio socket (non-blocking, as trio keeps it), which works on every
platform; ``os.readv``/``os.write`` on the descriptor would not on Windows,
where a socket is a SOCKET handle, not a file descriptor.

Scratch buffers: received bytes land in two module-wide buffers rather than
per-tunnel ones, so a thousand idle tunnels do not hold a thousand buffers.
This is safe because trio runs one task at a time: a view returned by
``receive_nowait`` is passed to ``send_nowait`` (which copies whatever the
socket did not take) before the caller awaits anything.  A view into a
scratch buffer must never be kept across an ``await``.
"""

from __future__ import annotations

import socket
from typing import Protocol

import trio

__all__ = [
    "Endpoint",
    "SocketEndpoint",
    "endpoint_for",
    "raw_socket",
    "read_nowait",
    "write_nowait",
    "RECEIVE_SIZE",
]

#: Bytes asked of the kernel per receive.  Four full TLS records (16 KiB of
#: plaintext each): large enough that a bulk transfer pays the per-chunk cost
#: rarely, small enough to stay well inside a loopback socket buffer.
RECEIVE_SIZE = 65536

# Received ciphertext (TLS) or plaintext (SocketEndpoint).  See the module
# docstring for why one buffer serves every tunnel.
RECEIVE_BUFFER = bytearray(RECEIVE_SIZE)
RECEIVE_VIEW = memoryview(RECEIVE_BUFFER)

# Decrypted plaintext.  A TLS endpoint decrypts at most RECEIVE_SIZE new bytes
# plus one record left incomplete by the previous receive (16 KiB of
# plaintext, RFC 8446 section 5.1), so everything complete always fits.
PLAINTEXT_SIZE = RECEIVE_SIZE + 16384 + 1024
PLAINTEXT_BUFFER = bytearray(PLAINTEXT_SIZE)
PLAINTEXT_VIEW = memoryview(PLAINTEXT_BUFFER)

EMPTY = memoryview(b"")


class Endpoint(Protocol):
    """One side of a tunnel, driven without blocking.

    Attributes:
        fd: The socket's file descriptor, for ``wait_readable``/``wait_writable``.
        sock: The socket itself, which the I/O goes through.
        maybe_readable: False when the last receive drained the socket and
            nothing is buffered, so the caller should wait for readability
            before receiving again (saves a failing system call per chunk).
    """

    fd: int
    sock: socket.socket
    maybe_readable: bool

    def receive_nowait(self) -> memoryview | None:
        """Plaintext received now: a view valid until the next ``await``.

        Returns:
            The data, an empty view at EOF, or ``None`` when nothing can be
            read without blocking.

        Raises:
            trio.BrokenResourceError: the connection failed (the cause is the
                ``OSError`` or ``ssl.SSLError``).
        """
        ...

    def send_nowait(self, data: memoryview) -> bool:
        """Take all of ``data`` and send as much as the socket accepts now.

        Returns:
            True when everything went out; False when some is queued, to be
            sent with :meth:`flush_nowait` once the socket is writable.

        Raises:
            trio.BrokenResourceError: the connection failed.
        """
        ...

    def flush_nowait(self) -> bool:
        """Send queued bytes; True when none are left."""
        ...


def raw_socket(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under ``stream``, which keeps owning (and closes) it.

    trio has no public accessor for it; ``_sock`` has been the attribute
    since trio's socket wrapper was written, and the fast path's tests fail
    at once if that ever changes.
    """
    return stream.socket._sock  # type: ignore[attr-defined]


def read_nowait(end: Endpoint) -> memoryview | None:
    """Read what ``end``'s socket holds into the shared receive buffer.

    Sets ``end.maybe_readable``: a short read means the socket is drained.

    Returns:
        A view of the bytes (valid until the next ``await``), an empty view at
        EOF, or ``None`` when the socket has nothing now.

    Raises:
        OSError: The socket failed.
    """
    try:
        n = end.sock.recv_into(RECEIVE_BUFFER)
    except BlockingIOError:
        end.maybe_readable = False
        return None
    end.maybe_readable = n == RECEIVE_SIZE
    return RECEIVE_VIEW[:n]


def write_nowait(sock: socket.socket, data: bytes | memoryview) -> int:
    """Write what ``sock`` takes now: the number of bytes, 0 when full.

    Raises:
        OSError: The socket failed (anything but "would block").
    """
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


class SocketEndpoint:
    """A plaintext :class:`trio.SocketStream` as an :class:`Endpoint`.

    The stream keeps owning the socket; this object only reads and writes the
    descriptor between the stream's own calls.  Bytes still queued when the
    pump stops are dropped with the tunnel.
    """

    __slots__ = ("fd", "sock", "maybe_readable", "_pending")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.fd = stream.socket.fileno()
        self.sock = raw_socket(stream)
        self.maybe_readable = True
        self._pending: bytes = b""

    def receive_nowait(self) -> memoryview | None:
        try:
            return read_nowait(self)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc

    def send_nowait(self, data: memoryview) -> bool:
        try:
            sent = write_nowait(self.sock, data)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        if sent == len(data):
            return True
        # ``data`` may be a scratch buffer: keep a copy of the rest.
        self._pending = bytes(data[sent:])
        return False

    def flush_nowait(self) -> bool:
        if not self._pending:
            return True
        try:
            sent = write_nowait(self.sock, self._pending)
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        self._pending = self._pending[sent:]
        return not self._pending


def endpoint_for(stream: trio.abc.Stream) -> Endpoint | None:
    """The fast-path endpoint for ``stream``, or ``None`` if it has none.

    Plaintext :class:`trio.SocketStream` objects qualify, and so does any
    stream with a ``fast_endpoint()`` method (either engine's TLS stream over
    a socket), which may itself return ``None``.
    """
    if type(stream) is trio.SocketStream:
        return SocketEndpoint(stream)
    get = getattr(stream, "fast_endpoint", None)
    if get is None:
        return None
    return get()
