"""Managed servers on Windows: one Job Object per server, identity from the TCP table.

The Linux launcher shim (:mod:`relay.launcher`) has no Windows counterpart
process: the relay itself holds each server's job.

* **Containment.**  The server is created suspended, put in a new Job Object
  with ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`` (and no breakaway), then
  resumed, so everything it starts is in the job from its first
  instruction.  Killing (idle, ``max_session``, shutdown) terminates the
  job; when the relay dies, however it dies, Windows closes its last handle
  to the job and kills the whole tree.
* **Readiness without connecting.**  The relay polls the TCP table
  (``GetExtendedTcpTable`` from iphlpapi, through ctypes) until a listener
  on the server's port is owned by a process in the job.  Nothing connects
  to the server before the first tunnel does, so a ``--once`` server is not
  used up by a probe.
* **Identity.**  Windows has no network namespaces: the server listens on
  the host's loopback.  Before connecting, the relay refuses the port if any
  listener on it belongs to a process outside the job; after connecting, it
  checks that the server side of its connection is owned by a process in the
  job, and closes it otherwise.  The relay thus never talks to an impostor;
  what it cannot prevent is another local process connecting to the server
  directly (README, "What the relay guarantees").  Where the table names no
  owner (pid 0: Wine 8 reports none for listening and accepted sockets;
  Windows always reports one), a listener on the port is taken as the
  server's, unverified, and the connection is not checked.
* **Handles.**  The server is created with handle inheritance on, for the
  log and NUL handles duplicated for it; Python creates every other handle
  non-inheritable, so besides those it can inherit only the relay's own
  standard handles, when whoever started the relay made them inheritable.
* **Restricted token.**  A Windows relay has no password for another
  account, so ``run_as`` must name the relay's own account; the server then
  runs under a restricted copy of the relay's token: Administrators for deny
  only, every privilege but SeChangeNotify removed, low integrity.
"""

from __future__ import annotations

import contextlib
import ctypes
import msvcrt
import os
import socket
import struct
import subprocess
from ctypes import wintypes
from typing import Any

import pywintypes
import trio
import win32api
import win32con
import win32event
import win32job
import win32process
import win32security

__all__ = ["JobLaunchers", "JobTree", "run_as_warning", "tcp_table"]

#: Seconds between looks at the TCP table while a server starts.
POLL_INTERVAL = 0.05

_LOW_INTEGRITY = "S-1-16-4096"
_TCP_TABLE_OWNER_PID_LISTENER = 3
_TCP_TABLE_OWNER_PID_CONNECTIONS = 4
_MIB_TCP_STATE_LISTEN = 2
_ERROR_INSUFFICIENT_BUFFER = 122
_CREATE_SUSPENDED = 0x00000004
_CREATE_NEW_PROCESS_GROUP = 0x00000200
_CREATE_NO_WINDOW = 0x08000000


class _Row(ctypes.Structure):
    _fields_ = [  # MIB_TCPROW_OWNER_PID
        ("state", wintypes.DWORD),
        ("local_addr", wintypes.DWORD),
        ("local_port", wintypes.DWORD),
        ("remote_addr", wintypes.DWORD),
        ("remote_port", wintypes.DWORD),
        ("pid", wintypes.DWORD),
    ]


_iphlpapi = ctypes.WinDLL("iphlpapi")
_GetExtendedTcpTable = _iphlpapi.GetExtendedTcpTable
_GetExtendedTcpTable.restype = wintypes.DWORD
_GetExtendedTcpTable.argtypes = [
    ctypes.c_void_p,
    ctypes.POINTER(wintypes.DWORD),
    wintypes.BOOL,
    wintypes.ULONG,
    ctypes.c_int,
    wintypes.ULONG,
]


#: Bytes the last read of each table class filled (where the next read starts).
_table_size: dict[int, int] = {}


def tcp_table(*, listeners: bool) -> list[tuple[int, str, int, str, int, int]]:
    """IPv4 TCP endpoints and their owning processes.

    Args:
        listeners: True for listening sockets, False for connections.

    Returns:
        ``(state, local_host, local_port, remote_host, remote_port, pid)``
        per endpoint.

    Raises:
        OSError: iphlpapi refused.  Wine's iphlpapi gives up with
            ERROR_OUTOFMEMORY (14) when the table outgrows its buffer in
            five reads in a row, which a host opening connections faster
            than a read takes (thousands of rows) brings about.
    """
    kind = _TCP_TABLE_OWNER_PID_LISTENER if listeners else _TCP_TABLE_OWNER_PID_CONNECTIONS
    # Each call reads the whole table (on Wine, with a scan of every Windows
    # process's descriptors per row), and the table may grow between two
    # calls: start from the size the last read needed and leave room, so
    # one call is the rule and a retry gets room for more growth.
    needed = _table_size.get(kind, 0)
    while True:
        capacity = 4 + needed + needed // 4 + 16 * ctypes.sizeof(_Row)
        buffer = ctypes.create_string_buffer(capacity)
        size = wintypes.DWORD(capacity)
        status = _GetExtendedTcpTable(buffer, ctypes.byref(size), False, socket.AF_INET, kind, 0)
        if status == 0:
            break
        if status != _ERROR_INSUFFICIENT_BUFFER:
            raise OSError(None, f"GetExtendedTcpTable failed ({status})")
        needed = size.value
    (count,) = struct.unpack_from("<I", buffer, 0)
    _table_size[kind] = 4 + count * ctypes.sizeof(_Row)
    rows = (_Row * count).from_buffer_copy(buffer.raw[4 : 4 + count * ctypes.sizeof(_Row)])

    def host(addr: int) -> str:
        return socket.inet_ntoa(struct.pack("<I", addr))

    def port(value: int) -> int:
        return socket.ntohs(value & 0xFFFF)

    return [
        (
            r.state,
            host(r.local_addr),
            port(r.local_port),
            host(r.remote_addr),
            port(r.remote_port),
            r.pid,
        )
        for r in rows
    ]


def run_as_warning(config: Any) -> str | None:
    """One line naming the managed targets whose ``run_as`` is not the relay's account."""
    me = win32api.GetUserName()
    other = sorted(
        {
            (t.name, config.run_as(t))
            for t in config.targets
            if t.managed and config.run_as(t).lower() != me.lower()
        }
    )
    if not other:
        return None
    return (
        f"warning: targets {', '.join(name for name, _ in other)} run as "
        f"{', '.join(sorted({repr(a) for _, a in other}))}, but on Windows the relay starts "
        f'managed servers only as its own account {me!r}: set run_as = "{me}" (the server then '
        "runs under a restricted, low-integrity token), or their tunnels get 502 launch_failed"
    )


class JobLaunchers:
    """Starts managed servers in Job Objects (the Windows side of ``Launchers``)."""

    async def spawn(
        self, *, run_as: str, kill_grace: float, listen: str, argv: list[str], log_fd: int
    ) -> JobTree:
        """Start ``argv`` in a new kill-on-close job, its output going to ``log_fd``.

        ``kill_grace`` is unused: Windows console servers have no SIGTERM,
        so a kill terminates the job at once.

        Raises:
            LaunchError: ``run_as`` is not the relay's own account, or Windows
                refused to create the job, token or process.
        """
        from ..privsep import LaunchError

        me = win32api.GetUserName()
        if run_as.lower() != me.lower():
            raise LaunchError(
                f"cannot start processes as {run_as!r} on Windows: the relay has no logon for "
                f'that account; set run_as = "{me}" (the server then runs under a restricted, '
                "low-integrity token of the relay's account)",
                reason="launch_failed",
            )
        port = listen.rpartition(":")[2]
        try:
            return JobTree.start(argv, log_fd, int(port))
        except pywintypes.error as exc:
            raise LaunchError(
                f"cannot start {argv[0]}: {exc.funcname}: {exc.strerror}", reason="launch_failed"
            ) from exc


def restricted_token() -> Any:
    """A primary token for a managed server: the relay's, with its power taken away.

    Administrators (and every other group) keep their SIDs, but
    Administrators only for deny; every privilege except SeChangeNotify is
    removed; the integrity level is Low, so the server cannot write to the
    relay's files or open the relay's processes for writing.
    """
    access = (
        win32con.TOKEN_DUPLICATE
        | win32con.TOKEN_QUERY
        | win32con.TOKEN_ASSIGN_PRIMARY
        | win32con.TOKEN_ADJUST_DEFAULT
    )
    own = win32security.OpenProcessToken(win32api.GetCurrentProcess(), access)
    try:
        admins = win32security.CreateWellKnownSid(win32security.WinBuiltinAdministratorsSid)
        # Every privilege but SeChangeNotify, named one by one as well as by
        # DISABLE_MAX_PRIVILEGE (Wine honours only the list).
        change_notify = win32security.LookupPrivilegeValue(
            None, win32security.SE_CHANGE_NOTIFY_NAME
        )
        privileges = [
            (luid, 0)
            for luid, _ in win32security.GetTokenInformation(own, win32security.TokenPrivileges)
            if luid != change_notify
        ]
        token = win32security.CreateRestrictedToken(
            own, win32security.DISABLE_MAX_PRIVILEGE, [(admins, 0)], privileges, None
        )
    finally:
        own.Close()
    low = win32security.ConvertStringSidToSid(_LOW_INTEGRITY)
    win32security.SetTokenInformation(
        token, win32security.TokenIntegrityLevel, (low, win32security.SE_GROUP_INTEGRITY)
    )
    return token


class JobTree:
    """One managed server's process tree in its Job Object.

    Presents what :class:`relay.backends.ManagedServer` drives on every
    platform: reports (``started``, ``listening``, ``exited``) like the Linux
    shim's, a kill, and connections checked against the job.

    Resource handling:
        The relay holds the only handle to the job.  :meth:`aclose`
        terminates the job and closes it; if the relay dies first, Windows
        closes the handle and kill-on-close ends the tree.
    """

    def __init__(self, job: Any, process: Any, pid: int, port: int) -> None:
        self._job = job
        self._process = process
        self.pid = pid
        self.port = port
        self._reported: list[str] = []
        self.process = None  # nothing for the relay to reap besides the job

    @classmethod
    def start(cls, argv: list[str], log_fd: int, port: int) -> JobTree:
        """Create the job, then the server suspended inside it, then let it run."""
        job = win32job.CreateJobObject(None, "")
        try:
            limits = win32job.QueryInformationJobObject(
                job, win32job.JobObjectExtendedLimitInformation
            )
            limits["BasicLimitInformation"]["LimitFlags"] = (
                win32job.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
                | win32job.JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION
            )
            win32job.SetInformationJobObject(
                job, win32job.JobObjectExtendedLimitInformation, limits
            )
            token = restricted_token()
            current = win32api.GetCurrentProcess()
            # The log handle is inheritable only in this duplicate, closed
            # right after the process is created (the relay never creates
            # processes from two threads).
            log = win32api.DuplicateHandle(
                current, msvcrt.get_osfhandle(log_fd), current, 0, True,
                win32con.DUPLICATE_SAME_ACCESS,
            )  # fmt: skip
            null_fd = os.open(os.devnull, os.O_RDONLY)
            try:
                null = win32api.DuplicateHandle(
                    current, msvcrt.get_osfhandle(null_fd), current, 0, True,
                    win32con.DUPLICATE_SAME_ACCESS,
                )  # fmt: skip
            finally:
                os.close(null_fd)
            try:
                startup = win32process.STARTUPINFO()
                startup.dwFlags = win32process.STARTF_USESTDHANDLES
                startup.hStdInput = null
                startup.hStdOutput = log
                startup.hStdError = log
                process, thread, pid, _ = win32process.CreateProcessAsUser(
                    token,
                    None,
                    subprocess.list2cmdline(argv),
                    None,
                    None,
                    True,
                    _CREATE_SUSPENDED | _CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW,
                    None,
                    None,
                    startup,
                )
            finally:
                log.Close()
                null.Close()
                token.Close()
            try:
                win32job.AssignProcessToJobObject(job, process)
            except pywintypes.error:
                win32process.TerminateProcess(process, 1)
                process.Close()
                raise
            finally:
                with contextlib.suppress(pywintypes.error):
                    win32process.ResumeThread(thread)
                thread.Close()
        except BaseException:
            job.Close()
            raise
        return cls(job, process, pid, port)

    def in_job(self, pid: int) -> bool:
        """Whether process ``pid`` runs in this server's job."""
        # A process the relay may not query is not one it started: those run
        # under a restricted copy of the relay's own token.
        try:
            handle = win32api.OpenProcess(win32con.PROCESS_QUERY_INFORMATION, False, pid)
        except pywintypes.error:
            return False
        try:
            return bool(win32job.IsProcessInJob(handle, self._job))
        except pywintypes.error:
            return False
        finally:
            handle.Close()

    def listener_owners(self) -> tuple[set[int], set[int], bool]:
        """Who listens on the server's loopback port.

        Returns:
            The pids in the job, the pids outside it, and whether a listener
            has no owner in the table (pid 0: Wine 8 reports none; Windows
            always does).
        """
        inside, outside, unattributed = set(), set(), False
        for state, host, port, _, _, pid in tcp_table(listeners=True):
            if state != _MIB_TCP_STATE_LISTEN or port != self.port:
                continue
            if host not in ("127.0.0.1", "0.0.0.0"):
                continue
            if pid == 0:
                unattributed = True
            else:
                (inside if self.in_job(pid) else outside).add(pid)
        return inside, outside, unattributed

    def ready(self) -> bool:
        """Whether the server listens: a listener in the job and none outside it.

        Where the system attributes no listener to a process (Wine), a
        listener on the port is taken as the server's, unverified.
        """
        inside, outside, unattributed = self.listener_owners()
        return not outside and bool(inside or unattributed)

    def _exited(self) -> dict | None:
        if win32event.WaitForSingleObject(self._process, 0) != win32event.WAIT_OBJECT_0:
            return None
        return {
            "event": "exited",
            "pid": self.pid,
            "returncode": win32process.GetExitCodeProcess(self._process),
            "signal": None,
        }

    async def next_report(self, event: str | None = None) -> dict | None:
        """The next report, as the Linux shim would send it (see :mod:`relay.launcher`)."""
        if not self._reported and event in (None, "started"):
            self._reported.append("started")
            return {"event": "started", "pid": self.pid}
        if "listening" not in self._reported and event in (None, "listening"):
            while True:
                final = self._exited()
                if final is not None:
                    self._reported.append("exited")
                    self._terminate()
                    return final
                if self.ready():
                    self._reported.append("listening")
                    return {"event": "listening", "port": self.port}
                await trio.sleep(POLL_INTERVAL)
        await trio.lowlevel.WaitForSingleObject(int(self._process))
        self._terminate()  # the rest of the tree goes with the server
        self._reported.append("exited")
        return self._exited()

    async def request_kill(self) -> None:
        """End the whole tree now; the ``exited`` report follows."""
        self._terminate()

    def kill_launcher(self) -> None:
        """End the tree (nothing else stands between the relay and it)."""
        self._terminate()

    def kill_orphans(self, pid: int) -> None:
        """End whatever of the tree is left."""
        self._terminate()

    def _terminate(self) -> None:
        with contextlib.suppress(pywintypes.error):
            win32job.TerminateJobObject(self._job, 1)

    async def connect(self, *, describe: str, connect_timeout: float) -> trio.SocketStream:
        """A TCP connection to the server on ``127.0.0.1``, checked against the job.

        Raises:
            BackendError: a process outside the job listens on the port, the
                connection's server side is not in the job, or the server
                refused or did not answer in ``connect_timeout``.
        """
        from ..backends import BackendError, connect_errors

        inside, outside, unattributed = self.listener_owners()
        if outside:
            raise BackendError(
                f"backend {describe}: process {min(outside)} outside the server's job listens "
                "on its port; refusing to connect",
                reason="backend_unreachable",
            )
        if not (inside or unattributed):
            raise BackendError(
                f"backend {describe}: the managed server no longer listens",
                reason="backend_unreachable",
            )
        with connect_errors(describe, connect_timeout):
            # The timeout bounds the connect alone.  The check after it is
            # synchronous; inside an expired timeout, the close that follows
            # its failure would be cancelled and the failure reported as a
            # connect timeout.
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            if not inside:
                # The system names no owner for the server's listener (Wine),
                # nor then for the connection it accepts: the table of
                # connections could name no stranger.  Reading it would cost
                # a read of every connection on the host with its owner,
                # which Wine makes slow and, on a host whose connections
                # grow, fallible; so it is not read.
                return stream
            try:
                await self._check_peer(stream, describe)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream

    async def _check_peer(self, stream: trio.SocketStream, describe: str) -> None:
        """Refuse ``stream`` if its server side belongs to a process outside the job.

        A connection the server has not taken with ``accept()`` yet has no
        owner in the table; it passes (the listener was checked just before).
        Wine 8 names the owner of a connecting socket but never of a
        listening or an accepted one, so this check has something to find
        only where the listener's owner is known (Windows).
        """
        from ..backends import BackendError

        host, port = stream.socket.getsockname()[:2]
        owners = {
            pid
            for _, lh, lp, rh, rp, pid in tcp_table(listeners=False)
            if lp == self.port and rh == host and rp == port and lh == "127.0.0.1"
        } - {0}
        strangers = sorted(pid for pid in owners if not self.in_job(pid))
        if strangers:
            raise BackendError(
                f"backend {describe}: the connection was accepted by process {strangers[0]}, "
                "outside the server's job; refusing it",
                reason="backend_unreachable",
            )

    async def aclose(self) -> None:
        """Terminate the job (if anything is left) and close every handle."""
        self._terminate()
        self._job.Close()
        self._process.Close()
