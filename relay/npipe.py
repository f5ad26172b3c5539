"""Windows named pipes as trio streams: the ``npipe://`` backends' transport.

Windows only (it imports pywin32).  A debug server started with
``-server npipe:pipe=NAME`` (or ``dbgsrv -t npipe:pipe=NAME``) listens on
``\\\\.\\pipe\\NAME``; :func:`open_pipe_stream` connects to it as a client.

One duplex handle, registered with trio's I/O completion port once: trio's
own ``PipeSendStream`` and ``PipeReceiveStream`` each register their handle,
and registering the same handle a second time fails (WinError 87), so they
cannot share one.  Reads and writes use ``readinto_overlapped`` and
``write_overlapped`` directly; cancelling a pending read cancels its I/O.
"""

from __future__ import annotations

import sys

import trio

assert sys.platform == "win32"

import pywintypes  # noqa: E402
import win32file  # noqa: E402
import win32pipe  # noqa: E402
import winerror  # noqa: E402

__all__ = ["PipeStream", "open_pipe_stream"]

RECEIVE_SIZE = 65536

_EOF_ERRORS = frozenset({winerror.ERROR_BROKEN_PIPE, winerror.ERROR_PIPE_NOT_CONNECTED})

# How long one WaitNamedPipe call may block its thread (ms).  The caller's
# deadline is enforced by trio; a short wait keeps an abandoned thread short.
_WAIT_SLICE_MS = 250


class PipeStream(trio.abc.Stream):
    """A connected, overlapped named-pipe handle as a :class:`trio.abc.Stream`.

    Named pipes have no half-close, so this is not a ``HalfCloseableStream``:
    the pump then ends the tunnel when the client's side ends (as for any
    backend without ``send_eof``).

    Args:
        handle: An open pipe handle (an int), opened with
            ``FILE_FLAG_OVERLAPPED``.  The stream owns it from now on.

    Resource handling:
        :meth:`aclose` closes the handle; a read pending in another task ends
        with :class:`trio.ClosedResourceError`.
    """

    def __init__(self, handle: int) -> None:
        self._handle = handle
        trio.lowlevel.register_with_iocp(handle)
        self._send_conflict = trio.StrictFIFOLock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this pipe was closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if self._send_conflict.locked():
            raise trio.BusyResourceError("another task is sending on this pipe")
        async with self._send_conflict:
            if not data:
                await trio.lowlevel.checkpoint()
                return
            try:
                await trio.lowlevel.write_overlapped(self._handle, data)
            except OSError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("this pipe was closed") from exc
                raise trio.BrokenResourceError(f"pipe error: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._check_open()
        buffer = bytearray(max_bytes or RECEIVE_SIZE)
        try:
            size = await trio.lowlevel.readinto_overlapped(self._handle, buffer)
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("this pipe was closed") from exc
            # The server closed its handle (ERROR_BROKEN_PIPE) or disconnected
            # this client (ERROR_PIPE_NOT_CONNECTED): either is the pipe's EOF.
            if getattr(exc, "winerror", None) in _EOF_ERRORS:
                return b""
            raise trio.BrokenResourceError(f"pipe error: {exc}") from exc
        del buffer[size:]
        return buffer

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            win32file.CloseHandle(self._handle)
        await trio.lowlevel.checkpoint()


def _try_open(path: str) -> int | None:
    """Open the pipe's client end; ``None`` when every instance is busy."""
    try:
        handle = win32file.CreateFile(
            path,
            win32file.GENERIC_READ | win32file.GENERIC_WRITE,
            0,
            None,
            win32file.OPEN_EXISTING,
            win32file.FILE_FLAG_OVERLAPPED,
            None,
        )
    except pywintypes.error as exc:
        if exc.winerror == winerror.ERROR_PIPE_BUSY:
            return None
        raise OSError(exc.winerror, exc.strerror, path) from None
    return handle.Detach()


def _wait_for_instance(path: str) -> None:
    """Block (in a thread) until an instance may be free, for one slice at most."""
    try:
        win32pipe.WaitNamedPipe(path, _WAIT_SLICE_MS)
    except pywintypes.error as exc:
        if exc.winerror not in (winerror.ERROR_SEM_TIMEOUT, winerror.ERROR_PIPE_BUSY):
            raise OSError(exc.winerror, exc.strerror, path) from None


async def open_pipe_stream(path: str) -> PipeStream:
    """Connect to the named pipe ``path`` (``\\\\HOST\\pipe\\NAME``).

    A busy pipe (every instance taken: ``ERROR_PIPE_BUSY``) is retried after
    ``WaitNamedPipe`` says an instance may be free, until the caller's
    deadline; a pipe that does not exist fails at once.

    Raises:
        FileNotFoundError: no such pipe (no server listens on it).
        OSError: any other failure to open it.

    Cancellation:
        Safe at any point: a wait runs in a thread trio abandons, which ends
        within a quarter of a second; a handle is only opened between checkpoints.
    """
    while True:
        handle = _try_open(path)
        if handle is not None:
            try:
                win32pipe.SetNamedPipeHandleState(handle, win32pipe.PIPE_READMODE_BYTE, None, None)
                return PipeStream(handle)
            except BaseException:
                win32file.CloseHandle(handle)
                raise
        await trio.to_thread.run_sync(_wait_for_instance, path, abandon_on_cancel=True)
