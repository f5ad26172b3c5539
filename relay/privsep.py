"""Privilege separation: who starts managed servers, and the relay dropping root.

A managed server and everything it starts run as a separate, unprivileged
account (``run_as``), inside a private network namespace, under a
:mod:`relay.launcher` shim.  Starting a process as another account needs
root, which the relay itself should not keep, so:

* ``dbgrelay serve`` started as root with ``relay.user`` set first starts
  the :mod:`relay.privhelper` (connected by an unnamed socket pair), then
  drops to ``relay.user`` (:func:`drop_privileges`).  Every launch goes
  through the helper (:class:`Launchers` with a helper socket).
* A relay that is itself root (no ``relay.user``, or tests running
  in-process as root) starts the shim directly; the shim drops to
  ``run_as`` itself.
* A relay that is not root can only run servers as its own account, and
  only when ``run_as`` names that account explicitly: a development mode
  (``dbgrelay check-config`` warns about it).  The shim then uses an
  unprivileged user namespace for the private network.

Everything here is Linux machinery; :func:`check_platform` is the one place
that says so.  On Windows, managed servers run in Job Objects instead
(:mod:`relay.platform._jobs_windows`); only the ``check-config`` warnings
here answer for both.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from config import Config

from .errors import LocalProtocolError, RelayError

if TYPE_CHECKING:
    import pwd

__all__ = [
    "HELPER",
    "LAUNCHER",
    "Launched",
    "Launchers",
    "check_platform",
    "development_mode_warning",
    "missing_account_warnings",
    "drop_privileges",
    "run_as_accounts",
    "start_helper",
]

LAUNCHER = Path(__file__).with_name("launcher.py")
HELPER = Path(__file__).with_name("privhelper.py")


class LaunchError(RelayError):
    """A launcher shim could not be started (the tunnel gets 502 launch_failed)."""


def check_platform() -> str | None:
    """Why managed servers cannot run on this system, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"managed servers (launch) need Linux; this is {sys.platform}"
    return None


def run_as_accounts(config: Config) -> list[str]:
    """Every account the configuration runs managed servers as, sorted."""
    return sorted({config.run_as(t) for t in config.targets if t.managed})


def development_mode_warning(config: Config) -> str | None:
    """One line when managed servers would run as the relay's own account.

    On Windows, one line per target whose ``run_as`` the relay cannot honour
    (see :mod:`relay.platform._jobs_windows`).
    """
    if sys.platform == "win32":
        from .platform._jobs_windows import run_as_warning

        return run_as_warning(config)
    me = _account_name(os.getuid())
    own = [t.name for t in config.targets if t.managed and config.run_as(t) == me]
    if own and os.getuid() != 0:
        return (
            f"warning: targets {', '.join(own)} run as the relay's own account {me!r} "
            "(development mode): a debuggee there can read the relay's keys and audit files"
        )
    return None


def missing_account_warnings(config: Config) -> list[str]:
    """One line per account the config names that does not exist on this host."""
    if sys.platform == "win32":
        return []  # run_as is the relay's own account there (development_mode_warning)
    named = [("relay.user", config.relay.user)] if config.relay.user else []
    named += [("run_as", name) for name in run_as_accounts(config)]
    import pwd  # POSIX only; this module is imported on Windows too

    lines = []
    for key, name in named:
        try:
            pwd.getpwnam(name)
        except KeyError:
            lines.append(
                f"warning: {key} account {name!r} does not exist on this host; create it "
                "(deploy/systemd/dbgrelay.sysusers) before the relay starts"
            )
    return lines


def _account_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(slots=True)
class Launched:
    """A running shim.

    Attributes:
        control: The relay's end of the shim's control socket.
        pid: The shim's pid.
        process: The shim as a child of the relay (direct launch), or None
            when the helper started it (the helper reaps it).
    """

    control: trio.socket.SocketType
    pid: int
    process: trio.Process | None


class Launchers:
    """Starts launcher shims, through the privileged helper when there is one.

    Args:
        helper: The relay's end of the helper's socket pair, or None to
            start shims directly.

    Resource handling:
        The helper's socket stays open for the relay's life; the kernel
        closes it when the relay exits, however it exits, and the helper
        then exits too.
    """

    def __init__(self, helper: socket.socket | None = None) -> None:
        self._helper = trio.socket.from_stdlib_socket(helper) if helper is not None else None
        self._lock = trio.Lock()

    async def spawn(
        self, *, run_as: str, kill_grace: float, listen: str, argv: list[str], log_fd: int
    ) -> Launched:
        """Start a shim for ``argv`` as ``run_as``, its output going to ``log_fd``.

        Raises:
            LaunchError: the relay cannot start processes as ``run_as``, or
                the helper refused; the message says what to do.
        """
        problem = check_platform()
        if problem is not None:
            raise LaunchError(problem, reason="launch_failed")
        if self._helper is not None:
            return await self._through_helper(run_as, kill_grace, listen, argv, log_fd)
        if os.geteuid() != 0 and run_as != _account_name(os.geteuid()):
            raise LaunchError(
                f"cannot start processes as {run_as!r}: the relay runs as "
                f"{_account_name(os.geteuid())!r} without its privileged helper; start "
                "'dbgrelay serve' as root with relay.user set, or for development set "
                f'run_as = "{_account_name(os.geteuid())}"',
                reason="launch_failed",
            )
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", str(LAUNCHER), "--kill-grace", str(kill_grace)]
                + ["--run-as", run_as, "--forbid-uid", str(os.getuid()), "--listen", listen]
                + ["--", *argv],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=log_fd,
                start_new_session=True,
            )
        except OSError as exc:
            mine.close()
            raise LaunchError(
                f"cannot start {sys.executable} {LAUNCHER}: {exc.strerror or exc}",
                reason="launch_failed",
            ) from exc
        finally:
            theirs.close()
        return Launched(trio.socket.from_stdlib_socket(mine), process.pid, process)

    async def _through_helper(
        self, run_as: str, kill_grace: float, listen: str, argv: list[str], log_fd: int
    ) -> Launched:
        assert self._helper is not None
        request = {"run_as": run_as, "kill_grace": kill_grace, "listen": listen, "argv": argv}
        async with self._lock:
            try:
                await self._helper.sendmsg(
                    [json.dumps(request).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [log_fd]))],
                )
                data, fds = await receive_message(self._helper)
            except OSError as exc:
                data, fds = b"", []
                error = exc.strerror or str(exc)
            else:
                error = "it exited"
        try:
            answer = json.loads(data) if data else {"ok": False, "error": f"helper: {error}"}
        except ValueError:
            answer = {"ok": False, "error": "helper: malformed answer"}
        if not answer.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LaunchError(
                f"the privileged helper refused to start the server: {answer.get('error')}",
                reason="launch_failed",
            )
        control = socket.socket(fileno=fds[0])
        return Launched(trio.socket.from_stdlib_socket(control), int(answer["pid"]), None)


async def receive_message(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """One ``SOCK_SEQPACKET`` message and the descriptors that came with it."""
    fds = array.array("i")
    data, ancdata, _, _ = await sock.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


# ---------------------------------------------------------------------------
# Starting as root


def start_helper(run_as: Iterable[str], relay_uid: int) -> socket.socket:
    """Start the privileged helper; returns the relay's end of its socket pair.

    Call as root, before :func:`drop_privileges`.  The helper exits when the
    returned socket closes (the relay exited, however it exited).

    Raises:
        LocalProtocolError: the helper could not be started.
    """
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        subprocess.Popen(
            [sys.executable, "-I", str(HELPER), "--relay-uid", str(relay_uid)]
            + ["--run-as", ",".join(run_as)],
            stdin=theirs.fileno(),
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        mine.close()
        raise LocalProtocolError(
            f"cannot start the privileged helper {HELPER}: {exc.strerror or exc}",
            reason="privsep",
        ) from exc
    finally:
        theirs.close()
    return mine


def drop_privileges(user: str, own: Iterable[Path]) -> pwd.struct_passwd:
    """Become ``user`` for good, after giving it the folders in ``own``.

    Each folder in ``own`` (the state and audit folders) is created if
    missing, it and everything in it are chowned to ``user``, and it is made
    mode 0700, so that neither the target account nor anyone else can read
    keys, audit files or logs kept there.  Then supplementary groups, gid
    and uid are set from the account, and we check that root cannot be
    regained.

    Raises:
        LocalProtocolError: unknown account, root as ``relay.user``, or a
            failed step; the message says which.
    """
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise LocalProtocolError(
            f"relay.user {user!r} does not exist; create it (see deploy/sysusers.d)",
            reason="privsep",
        ) from None
    if account.pw_uid == 0:
        raise LocalProtocolError(
            f"relay.user {user!r} is root; name the unprivileged account the relay runs as",
            reason="privsep",
        )
    try:
        for folder in own:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = folder.stat()
            if info.st_uid != account.pw_uid:
                # First start under relay.user (say after running as root):
                # hand over what is there.  Later starts find it done, so the
                # walk needs no capability to read folders relay.user owns.
                for root, dirs, files in os.walk(folder):
                    for name in [*dirs, *files]:
                        path = os.path.join(root, name)
                        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
                os.chown(folder, account.pw_uid, account.pw_gid)
            if info.st_mode & 0o777 != 0o700:
                os.chmod(folder, 0o700)
        os.initgroups(user, account.pw_gid)
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
    except OSError as exc:
        raise LocalProtocolError(
            f"cannot drop privileges to relay.user {user!r}: {exc}", reason="privsep"
        ) from exc
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        raise LocalProtocolError(
            f"dropping to relay.user {user!r} left the process able to regain root",
            reason="privsep",
        )
    return account
