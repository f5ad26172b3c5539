"""Windows named pipes as trio streams: the ``npipe://`` backends' transport.

Windows only (it imports pywin32).  A debug server started with
``-server npipe:pipe=NAME`` (or ``dbgsrv -t npipe:pipe=NAME``) listens on
``\\\\.\\pipe\\NAME``; :func:`open_pipe_stream` connects to it as a client.

:class:`PipeListener` is the server side: the admin API's ``\\\\.\\pipe\\dbgrelay-admin``.

One duplex handle, registered with trio's I/O completion port once: trio's
own ``PipeSendStream`` and ``PipeReceiveStream`` each register their handle,
and registering the same handle a second time fails (WinError 87), so they
cannot share one.  Reads and writes use ``readinto_overlapped`` and
``write_overlapped`` directly; cancelling a pending read cancels its I/O.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

import trio

assert sys.platform == "win32"

import pywintypes  # noqa: E402
import win32api  # noqa: E402
import win32con  # noqa: E402
import win32file  # noqa: E402
import win32pipe  # noqa: E402
import win32security  # noqa: E402
import winerror  # noqa: E402

from .platform._windows import admin_sddl, security_attributes  # noqa: E402

__all__ = ["PipeStream", "PipeListener", "open_pipe_stream", "open_pipe_listener"]

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
        registered: The handle is already registered with trio's completion
            port (a listener's instance); a handle can be registered only once.
        peer_name: Who is at the other end, for logs (``npipe:pid=N,sid=S``).

    Resource handling:
        :meth:`aclose` closes the handle; a read pending in another task ends
        with :class:`trio.ClosedResourceError`.
    """

    def __init__(self, handle: int, *, registered: bool = False, peer_name: str = "npipe") -> None:
        self._handle = handle
        self.peer_name = peer_name
        if not registered:
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
        raise OSError(None, exc.strerror, path, exc.winerror) from None
    return handle.Detach()


def _wait_for_instance(path: str) -> None:
    """Block (in a thread) until an instance may be free, for one slice at most."""
    try:
        win32pipe.WaitNamedPipe(path, _WAIT_SLICE_MS)
    except pywintypes.error as exc:
        if exc.winerror not in (winerror.ERROR_SEM_TIMEOUT, winerror.ERROR_PIPE_BUSY):
            raise OSError(None, exc.strerror, path, exc.winerror) from None


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


# ---------------------------------------------------------------------------
# The server side


_kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
_kernel32.ConnectNamedPipe.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_kernel32.ConnectNamedPipe.restype = ctypes.c_int
# OVERLAPPED on 64-bit Windows: Internal, InternalHigh, Offset/OffsetHigh, hEvent.
_OVERLAPPED_SIZE = 32


def _client_name(handle: int) -> str:
    """``npipe:pid=N,sid=S`` for the client process at the other end (best effort)."""
    try:
        pid = win32pipe.GetNamedPipeClientProcessId(handle)
    except pywintypes.error:
        return "npipe"
    try:
        process = win32api.OpenProcess(win32con.PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        token = win32security.OpenProcessToken(process, win32security.TOKEN_QUERY)
        sid = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
        return f"npipe:pid={pid},sid={win32security.ConvertSidToStringSid(sid)}"
    except pywintypes.error:
        return f"npipe:pid={pid}"


class PipeListener(trio.abc.Listener[PipeStream]):
    """A named pipe server: each :meth:`accept` returns one connected client.

    Build one with :func:`open_pipe_listener`.  One instance always waits
    for the next client (the next one is created the moment a client
    connects), so the name is never free for another process to claim.

    Attributes:
        path: ``\\\\.\\pipe\\NAME``.
    """

    def __init__(self, path: str, sddl: str) -> None:
        self.path = path
        self._attributes = security_attributes(sddl)
        self._closed = False
        # FILE_FLAG_FIRST_PIPE_INSTANCE: if any process already created a pipe
        # of this name (a squatter waiting for admins to connect), fail here.
        self._next = self._instance(first=True)

    def _instance(self, *, first: bool = False) -> int:
        mode = win32pipe.PIPE_ACCESS_DUPLEX | win32file.FILE_FLAG_OVERLAPPED
        if first:
            mode |= win32pipe.FILE_FLAG_FIRST_PIPE_INSTANCE
        handle = win32pipe.CreateNamedPipe(
            self.path,
            mode,
            win32pipe.PIPE_TYPE_BYTE
            | win32pipe.PIPE_READMODE_BYTE
            | win32pipe.PIPE_WAIT
            | win32pipe.PIPE_REJECT_REMOTE_CLIENTS,
            win32pipe.PIPE_UNLIMITED_INSTANCES,
            RECEIVE_SIZE,
            RECEIVE_SIZE,
            0,
            self._attributes,
        ).Detach()
        try:
            trio.lowlevel.register_with_iocp(handle)
        except BaseException:
            win32file.CloseHandle(handle)
            raise
        return handle

    async def accept(self) -> PipeStream:
        """Wait for a client; its connected stream.

        Cancellation:
            Safe: the pending connect is cancelled and the instance waits
            for the next call.
        """
        if self._closed:
            raise trio.ClosedResourceError("this pipe listener was closed")
        handle = self._next
        overlapped = ctypes.create_string_buffer(_OVERLAPPED_SIZE)
        address = ctypes.addressof(overlapped)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not _kernel32.ConnectNamedPipe(handle, address):
            error = ctypes.get_last_error()
            if error == winerror.ERROR_IO_PENDING:
                await trio.lowlevel.wait_overlapped(handle, address)
            elif error != winerror.ERROR_PIPE_CONNECTED:  # connected before we asked: done
                raise OSError(None, ctypes.FormatError(error), self.path, error)
        else:
            # Completed at once; its completion packet still arrives on the port.
            await trio.lowlevel.wait_overlapped(handle, address)
        self._next = self._instance()
        return PipeStream(handle, registered=True, peer_name=_client_name(handle))

    async def aclose(self) -> None:
        """Stop listening: close the waiting instance."""
        if not self._closed:
            self._closed = True
            win32file.CloseHandle(self._next)
        await trio.lowlevel.checkpoint()


def open_pipe_listener(name: str, *, admit: Iterable[str] = ()) -> PipeListener:
    """Listen on ``\\\\.\\pipe\\NAME``, reachable only from this machine.

    Args:
        name: The pipe name.
        admit: Account or group names admitted besides Administrators,
            LocalSystem and the account this runs as.

    The pipe's DACL admits only those: Windows refuses anyone else's
    ``CreateFile`` with ``ERROR_ACCESS_DENIED`` before the relay sees them.

    Raises:
        OSError: The pipe exists already (another relay, or another process
            holding the name), a name in ``admit`` is unknown, or it cannot
            be created.
    """
    sids = []
    for account in admit:
        try:
            sid = win32security.LookupAccountName(None, account)[0]
        except pywintypes.error as exc:
            raise OSError(exc.winerror, f"unknown account {account!r}", account) from None
        sids.append(win32security.ConvertSidToStringSid(sid))
    path = f"\\\\.\\pipe\\{name}"
    try:
        return PipeListener(path, admin_sddl(sids))
    except pywintypes.error as exc:
        if exc.winerror in (winerror.ERROR_ACCESS_DENIED, winerror.ERROR_PIPE_BUSY):
            raise OSError(
                exc.winerror, "another process already listens on it; stop it first", path
            ) from None
        raise OSError(None, exc.strerror, path, exc.winerror) from None
