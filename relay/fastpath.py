"""The pump's fast path: one data-plane thread moves every tunnel's bytes.

Why a thread.  Under the ping-pong benchmark, with every process pinned to
one CPU, a relay built on trio's scheduler (even one that drives the sockets
itself and awaits only ``wait_readable``) spent about twice stunnel's time per
round trip, while the same TLS relay written as a plain epoll loop in Python
came within 15% of stunnel: nearly all the difference was trio's per-wake-up
machinery (its run loop, the one-shot epoll re-arm, task switching), paid
twice per round trip in each of the two relay processes.  So once a tunnel is
authorised, its bytes move on a :class:`DataPlane`: one thread per process
with its own level-triggered epoll set, reading and writing non-blocking
sockets and calling into the TLS object directly.  trio keeps everything
else (handshakes, authorisation, timeouts, half-close, teardown) and hears
from the data plane only when a tunnel's state changes.

Ownership.  While a :class:`Tunnel` is registered, only the data-plane thread
touches its endpoints (the sockets and the TLS object); trio gets them back
when :meth:`DataPlane.remove` returns.  One lock, held by the thread while it
handles a batch of events and by trio to add or remove a tunnel, makes the
hand-over exact.

An :class:`Endpoint` is one side of a tunnel seen without blocking: plaintext
comes out of :meth:`~Endpoint.receive_nowait` and goes in through
:meth:`~Endpoint.send_nowait`.  :class:`SocketEndpoint` wraps a plaintext
:class:`trio.SocketStream`; the stdlib TLS stream in :mod:`relay.tls` is an
endpoint itself (it decrypts and encrypts between the socket and the caller).

Scratch buffers.  Received bytes land in two module-wide buffers rather than
per-tunnel ones, so a thousand idle tunnels hold no buffers.  Only the
data-plane thread uses them, and a view returned by ``receive_nowait`` is
handed to ``send_nowait`` (which copies whatever the socket did not take)
before the next receive.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any, Protocol

import trio

__all__ = [
    "Endpoint",
    "SocketEndpoint",
    "Tunnel",
    "DataPlane",
    "endpoint_for",
    "data_plane",
    "RECEIVE_SIZE",
]

#: Bytes asked of the kernel per receive: eight full TLS records (16 KiB of
#: plaintext each).  A bulk transfer pays the per-chunk cost once per this
#: many bytes; on the benchmark, 128 KiB moved 1.34x stunnel's MB/s to a sink
#: where 64 KiB moved 1.13x, and 256 KiB gained nothing more.
RECEIVE_SIZE = 131072

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

# The data plane needs epoll (Linux); elsewhere the pump uses its generic loop.
_HAVE_EPOLL = hasattr(select, "epoll")

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class Endpoint(Protocol):
    """One side of a tunnel, driven without blocking.

    Attributes:
        fd: The socket's file descriptor.
        buffered: True when received bytes wait inside the endpoint (a TLS
            object holding complete records), where polling the socket
            cannot see them: receive again without waiting.
    """

    fd: int
    buffered: bool

    def receive_nowait(self) -> memoryview | None:
        """Plaintext received now: a view valid until the next receive.

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


class SocketEndpoint:
    """A plaintext :class:`trio.SocketStream` as an :class:`Endpoint`.

    The stream keeps owning the socket; this object only reads and writes the
    descriptor while the tunnel is on the data plane.  Bytes still queued when
    the tunnel leaves it are dropped with the tunnel.
    """

    __slots__ = ("fd", "buffered", "_pending")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.fd = stream.socket.fileno()
        self.buffered = False
        self._pending: bytes = b""

    def receive_nowait(self) -> memoryview | None:
        try:
            n = os.readv(self.fd, (RECEIVE_BUFFER,))
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        return RECEIVE_VIEW[:n]

    def send_nowait(self, data: memoryview) -> bool:
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
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
            sent = os.write(self.fd, self._pending)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        self._pending = self._pending[sent:]
        return not self._pending


def endpoint_for(stream: trio.abc.Stream) -> Endpoint | None:
    """The fast-path endpoint for ``stream``, or ``None`` if it has none.

    Plaintext :class:`trio.SocketStream` objects qualify, and so does any
    stream with a ``fast_endpoint()`` method (the stdlib TLS stream over a
    socket), which may itself return ``None``.  Without epoll (not Linux)
    nothing qualifies.
    """
    if not _HAVE_EPOLL:
        return None
    if type(stream) is trio.SocketStream:
        return SocketEndpoint(stream)
    get = getattr(stream, "fast_endpoint", None)
    if get is None:
        return None
    return get()


def _detail(exc: BaseException) -> str:
    return str(exc.__cause__ or exc) or type(exc).__name__


class _Direction:
    """One way through a tunnel: read ``src``, write ``dst``, one chunk at a time.

    A chunk is fully written before the next is read, so a slow receiver
    stops the reading (TCP backpressure reaches the sender) and the relay
    holds at most one chunk per direction.
    """

    __slots__ = (
        "tunnel",
        "src",
        "dst",
        "name",
        "to_backend",
        "src_error",
        "dst_error",
        "reading",
        "blocked",
        "pending_size",
        "pending_chunk",
    )

    def __init__(self, tunnel: Tunnel, src: Endpoint, dst: Endpoint, *, to_backend: bool) -> None:
        self.tunnel = tunnel
        self.src = src
        self.dst = dst
        self.to_backend = to_backend
        if to_backend:
            self.name, self.src_error, self.dst_error = "c2b", "client_error", "backend_error"
        else:
            self.name, self.src_error, self.dst_error = "b2c", "backend_error", "client_error"
        self.reading = True
        self.blocked = False
        self.pending_size = 0
        self.pending_chunk: bytes | None = None

    def on_readable(self) -> None:
        tunnel = self.tunnel
        try:
            data = self.src.receive_nowait()
        except _BROKEN as exc:
            tunnel.finish(self.src_error, _detail(exc))
            return
        if data is None:
            return
        size = len(data)
        if not size:
            self.reading = False
            tunnel.source_ended(self)
            return
        activity = tunnel.activity
        if activity is not None:
            # Before sending: whoever sees the bytes arrive sees the new time.
            activity.last_activity = tunnel.clock.current_time()
        chunk = bytes(data) if tunnel.tap is not None else None
        try:
            sent = self.dst.send_nowait(data)
        except _BROKEN as exc:
            tunnel.finish(self.dst_error, _detail(exc))
            return
        if sent:
            self.delivered(size, chunk)
        else:
            self.blocked = True
            self.pending_size, self.pending_chunk = size, chunk
            tunnel.interest_changed()

    def on_writable(self) -> None:
        try:
            done = self.dst.flush_nowait()
        except _BROKEN as exc:
            self.tunnel.finish(self.dst_error, _detail(exc))
            return
        if done:
            self.blocked = False
            self.delivered(self.pending_size, self.pending_chunk)
            self.pending_chunk = None
            self.tunnel.interest_changed()

    def delivered(self, size: int, chunk: bytes | None) -> None:
        traffic = self.tunnel.traffic
        if self.to_backend:
            traffic.to_backend += size
        else:
            traffic.to_client += size
        if chunk is not None:
            self.tunnel.tap(self.name, chunk)  # type: ignore[misc]


class Tunnel:
    """A tunnel's state while its bytes move on the :class:`DataPlane`.

    Fields written by the data-plane thread (``traffic``, ``activity``, the
    result) are read by trio only after :meth:`wait_changed` returns or the
    tunnel left the plane.

    Args:
        client: The developer's side.
        backend: The debug server's side.
        traffic: Counters to update (``to_backend``, ``to_client``).
        activity: An object whose ``last_activity`` is set to the trio time
            of every chunk (the idle timer), or ``None``.
        tap: Called with ``("c2b" | "b2c", data)`` for every chunk, on the
            data-plane thread (so it must not call into trio).

    Attributes:
        client_eof: The client sent EOF; the backend may still answer.
        reason: Why the tunnel stopped (or, after ``client_eof``, will be
            reported as having stopped): ``client_closed``,
            ``backend_closed``, ``client_error`` or ``backend_error``.
        detail: The error text, if any.
        error: An unexpected exception raised on the data plane (a bug, or
            ``tap`` failing); trio re-raises it.
        finished: Nothing more will move.
    """

    __slots__ = (
        "traffic",
        "activity",
        "tap",
        "clock",
        "c2b",
        "b2c",
        "client_fd",
        "backend_fd",
        "client_eof",
        "reason",
        "detail",
        "error",
        "finished",
        "plane",
        "masks",
        "_token",
        "_changed",
    )

    def __init__(
        self,
        client: Endpoint,
        backend: Endpoint,
        traffic: Any,
        *,
        activity: Any = None,
        tap: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.traffic = traffic
        self.activity = activity
        self.tap = tap
        self.clock = trio.lowlevel.current_clock()
        self.c2b = _Direction(self, client, backend, to_backend=True)
        self.b2c = _Direction(self, backend, client, to_backend=False)
        self.client_fd = client.fd
        self.backend_fd = backend.fd
        self.client_eof = False
        self.reason: str | None = None
        self.detail: str | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.plane: DataPlane | None = None
        # Epoll masks currently registered per descriptor (0: not registered).
        self.masks = {self.client_fd: 0, self.backend_fd: 0}
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()

    # -- data-plane thread ------------------------------------------------------

    def source_ended(self, direction: _Direction) -> None:
        if direction is self.c2b:
            self.client_eof = True
            self._set_reason("client_closed")
            self.interest_changed()
            self._notify()
        else:
            self.finish("backend_closed")

    def finish(self, reason: str, detail: str | None = None) -> None:
        self._set_reason(reason, detail)
        self.finished = True
        self.c2b.reading = self.b2c.reading = False
        self.c2b.blocked = self.b2c.blocked = False
        self.interest_changed()
        self._notify()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.finish("error", repr(exc))

    def _set_reason(self, reason: str, detail: str | None = None) -> None:
        if self.reason is None:
            self.reason, self.detail = reason, detail

    def interest_changed(self) -> None:
        if self.plane is not None:
            self.plane.update(self)

    def wanted_masks(self) -> tuple[int, int]:
        """The epoll masks for the client and backend descriptors."""
        client = backend = 0
        c2b, b2c = self.c2b, self.b2c
        if c2b.blocked:
            backend |= select.EPOLLOUT
        elif c2b.reading:
            client |= select.EPOLLIN
        if b2c.blocked:
            client |= select.EPOLLOUT
        elif b2c.reading:
            backend |= select.EPOLLIN
        return client, backend

    def _notify(self) -> None:
        try:
            self._token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            pass

    def _wake(self) -> None:
        # Runs in trio's thread: sets whichever event trio waits on now.
        self._changed.set()

    # -- trio --------------------------------------------------------------------

    async def wait_changed(self) -> None:
        """Wait until the data plane reports ``client_eof`` or ``finished``."""
        await self._changed.wait()
        self._changed = trio.Event()


class DataPlane:
    """A thread that moves bytes for every registered :class:`Tunnel`.

    Use :func:`data_plane` for the process's one instance.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._by_fd: dict[int, tuple[Tunnel, bool]] = {}
        # Directions whose source holds bytes epoll cannot see (Endpoint.buffered).
        self._ready: list[_Direction] = []
        # Wakes the thread when a tunnel arrives with bytes already buffered.
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        self._epoll.register(self._wakeup_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="dbgrelay-data-plane", daemon=True)
        self._thread.start()

    # -- called from trio ----------------------------------------------------------

    def add(self, tunnel: Tunnel) -> None:
        """Start moving the tunnel's bytes.  Returns at once."""
        with self._lock:
            tunnel.plane = self
            self._by_fd[tunnel.client_fd] = (tunnel, True)
            self._by_fd[tunnel.backend_fd] = (tunnel, False)
            self.update(tunnel)
            buffered = [d for d in (tunnel.c2b, tunnel.b2c) if d.src.buffered]
            if buffered:
                self._ready.extend(buffered)
                os.write(self._wakeup_w, b"!")

    def remove(self, tunnel: Tunnel) -> None:
        """Stop moving the tunnel's bytes; its endpoints are trio's again on return."""
        with self._lock:
            tunnel.plane = None
            for fd in (tunnel.client_fd, tunnel.backend_fd):
                if tunnel.masks[fd]:
                    self._unregister(fd)
                    tunnel.masks[fd] = 0
                if self._by_fd.get(fd, (None,))[0] is tunnel:
                    del self._by_fd[fd]
            self._ready = [d for d in self._ready if d.tunnel is not tunnel]

    # -- either side, under the lock -------------------------------------------------

    def update(self, tunnel: Tunnel) -> None:
        """Make the epoll registrations match what the tunnel waits for."""
        client, backend = tunnel.wanted_masks()
        for fd, wanted in ((tunnel.client_fd, client), (tunnel.backend_fd, backend)):
            current = tunnel.masks[fd]
            if wanted == current:
                continue
            # An fd with nothing to wait for is unregistered: epoll would
            # otherwise keep reporting a hung-up socket.
            if not wanted:
                self._unregister(fd)
            elif not current:
                self._epoll.register(fd, wanted)
            else:
                self._epoll.modify(fd, wanted)
            tunnel.masks[fd] = wanted

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped it

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        poll = self._epoll.poll
        while True:
            events = poll(0 if self._ready else -1)
            with self._lock:
                by_fd = self._by_fd
                for fd, mask in events:
                    entry = by_fd.get(fd)
                    if entry is None:
                        if fd == self._wakeup_r:
                            try:
                                os.read(fd, 4096)
                            except BlockingIOError:
                                pass
                        continue
                    tunnel, is_client = entry
                    if tunnel.finished:
                        continue
                    reader = tunnel.c2b if is_client else tunnel.b2c
                    writer = tunnel.b2c if is_client else tunnel.c2b
                    try:
                        # EPOLLHUP and EPOLLERR wake both ways: the next
                        # read or write reports what happened.
                        if writer.blocked and mask & ~select.EPOLLIN:
                            writer.on_writable()
                        if reader.reading and not reader.blocked and mask & ~select.EPOLLOUT:
                            reader.on_readable()
                            if reader.src.buffered and reader.reading:
                                self._ready.append(reader)
                    except BaseException as exc:  # a bug or a failing tap: end this tunnel
                        tunnel.fail(exc)
                ready, self._ready = self._ready, []
                for direction in ready:
                    tunnel = direction.tunnel
                    if tunnel.finished or not direction.reading or direction.blocked:
                        continue
                    try:
                        direction.on_readable()
                        if direction.src.buffered and direction.reading:
                            self._ready.append(direction)
                    except BaseException as exc:
                        tunnel.fail(exc)


_plane: DataPlane | None = None
_plane_lock = threading.Lock()


def data_plane() -> DataPlane:
    """The process's data plane, started on first use."""
    global _plane
    with _plane_lock:
        if _plane is None:
            _plane = DataPlane()
        return _plane
