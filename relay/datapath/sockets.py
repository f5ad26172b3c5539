"""Non-blocking calls on a :class:`trio.SocketStream`'s socket, on every platform.

Each call through :class:`trio.SocketStream` ends in a trip through trio's
scheduler; the pump instead tries the socket first and awaits
:func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable`
only when the kernel says it would block.  It does so with the ``socket``
module's own ``recv`` and ``send`` on a second socket object for the same
descriptor (never ``os.read``/``os.write``, which do not work on sockets on
Windows).

Resource handling:
    The :class:`trio.SocketStream` keeps owning the socket.  A
    :class:`RawSocket` only borrows the descriptor and must be
    :meth:`~RawSocket.release`-d (never closed) when done.
"""

from __future__ import annotations

import ipaddress
import socket

import trio

__all__ = ["RawSocket", "open_tcp", "try_receive", "try_send"]


class RawSocket:
    """A borrowed view of a :class:`trio.SocketStream`'s socket.

    Args:
        stream: The stream whose socket to borrow; it is already non-blocking.
    """

    __slots__ = ("sock",)

    def __init__(self, stream: trio.SocketStream) -> None:
        sock = stream.socket
        self.sock = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        self.sock.setblocking(False)

    def release(self) -> None:
        """Give the descriptor back without closing it."""
        if self.sock.fileno() >= 0:
            self.sock.detach()


def try_send(stream: trio.abc.Stream, data: bytes | memoryview) -> int:
    """Write what ``stream``'s socket takes now, if it is a socket stream.

    Returns:
        The number of bytes written: 0 when the socket is full, failed, or
        ``stream`` is not a :class:`trio.SocketStream`.
    """
    if type(stream) is not trio.SocketStream:
        return 0
    raw = RawSocket(stream)
    try:
        return raw.sock.send(data)
    except OSError:
        return 0
    finally:
        raw.release()


def try_receive(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """What ``stream``'s socket holds now, without waiting.

    Returns:
        Up to ``max_bytes`` bytes; empty when nothing has arrived, at EOF,
        on an error (the next real read reports it), or when ``stream`` is
        not a :class:`trio.SocketStream`.
    """
    if type(stream) is not trio.SocketStream:
        return b""
    raw = RawSocket(stream)
    try:
        return raw.sock.recv(max_bytes)
    except OSError:
        return b""
    finally:
        raw.release()


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection with ``TCP_NODELAY``.

    A numeric address (what most backends are) is one non-blocking connect
    on one socket, about a tenth of what :func:`trio.open_tcp_stream`'s
    resolver and happy-eyeballs machinery cost; a host name goes through it.

    Raises:
        OSError: the connection failed.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        stream = await trio.open_tcp_stream(host, port)
    else:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream
