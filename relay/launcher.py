"""The shim that holds a managed debug server's whole process tree.

The relay (as root, or through :mod:`relay.privhelper`) runs ``python -I
relay/launcher.py --kill-grace SECONDS --run-as ACCOUNT --forbid-uid UID
[--listen HOST:PORT] -- CMD [ARG...]`` with one end of an ``AF_UNIX``
``SOCK_SEQPACKET`` socket pair as its standard input (the *control socket*)
and the server log as its standard error.

What the shim does, in order:

1. Resolves ``--run-as`` and refuses uid 0 and ``--forbid-uid`` (the relay's
   own uid): a debuggee must never run with the relay's rights, since it
   could then read the audit key and use the admin socket.  The one
   exception is development: a shim that is not root may run the server as
   its own account when ``--run-as`` names that account explicitly.
2. Sets ``PR_SET_NO_NEW_PRIVS`` (nothing below it gains privileges through
   set-uid programs) and becomes a child subreaper (descendants that leave
   the server's process group, as gdbserver's inferior does with
   ``setpgid``, or that daemonise, stay its descendants).
3. Moves itself into a new, private network namespace with only ``lo`` up
   (``unshare(CLONE_NEWNET)``; unprivileged: ``CLONE_NEWUSER|CLONE_NEWNET``),
   so the server's listening port cannot be reached from the host at all:
   no local process can connect to it before the relay does.
4. Starts the server as ``--run-as`` (no supplementary groups, umask 077)
   in a new session, waits for its listener, and reports.

Control socket, relay to shim (one message each):

* ``k``: kill the tree (idle, max_session, shutdown);
* ``c`` with one file descriptor attached (``SCM_RIGHTS``): a reply socket.
  The shim connects a TCP socket to the server *inside its namespace*,
  having checked that the listener on that port belongs to a process of the
  tree it launched, and sends that connected socket back on the reply
  socket with ``{"event": "connected"}``, or ``{"event": "connect_failed",
  "error": TEXT}``.
* end of file: the relay has exited (``kill -9`` included, since the kernel
  closes its end): kill the tree.

The shim also kills the tree on SIGTERM, SIGINT or SIGHUP.  When the server
exits by itself (``gdbserver --once`` after its client), the shim kills
whatever the server left behind.  Either way it reaps what it killed before
it reports, so a pid it reports as gone is gone.

Why not ``PR_SET_PDEATHSIG`` on the server itself: the parent-death signal
fires when the *thread* that forked the child exits, and trio spawns processes
from worker threads that come and go.

Reports, shim to relay, one JSON object per message (the server's own output
goes to the server log, so nothing the server or its inferior prints can be
mistaken for a report): ``{"event": "started", "pid": N}``, with
``--listen`` then ``{"event": "listening"}`` once the port listens, then at
the end ``{"event": "exited", "pid": N, "returncode": R, "signal":
NAME|null, "killed_by": null|"relay"|"relay_exited"|"signal"}``, or
``{"event": "failed", "error": TEXT}`` if the server could not be started.

The shim itself stays root: the debuggee, running as another account,
cannot signal, trace or read it.  Only the standard library is used and
nothing is imported from the relay, so it starts fast under ``-I`` and can
be read in one sitting.  Linux-only (namespaces, pidfd, subreaper, /proc).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import json
import os
import pwd
import select
import signal
import socket
import struct
import subprocess
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_TCP_LISTEN = "0A"
# How long the shim keeps killing and reaping leftovers after the server is gone.
_REAP_TIMEOUT = 3.0
_CONNECT_TIMEOUT = 5.0
USAGE = (
    "usage: launcher.py [--kill-grace SECONDS] [--run-as ACCOUNT] [--forbid-uid UID] "
    "[--listen HOST:PORT] -- CMD [ARG...]\n"
)
CONTROL_FD = 0

_libc = ctypes.CDLL(None, use_errno=True)


class Refused(Exception):
    """The launch must not go ahead; the message says why and what to do."""


def _say(obj: dict, sock: socket.socket | None = None, fds: list[int] | None = None) -> None:
    """Send one report on the control socket (or ``sock``); the relay may be gone."""
    target = sock or _control
    data = json.dumps(obj).encode()
    with contextlib.suppress(OSError):
        if fds:
            target.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            target.send(data)


_control: socket.socket


# -- the account --------------------------------------------------------------


def resolve_account(name: str, forbid_uid: int) -> pwd.struct_passwd:
    """The account the server runs as, after the refusals described above.

    Raises:
        Refused: unknown account, uid 0, or the relay's own uid while root.
    """
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise Refused(
            f"run_as account {name!r} does not exist; create it "
            f"(useradd --system --no-create-home --shell /usr/sbin/nologin {name})"
        ) from None
    if os.geteuid() != 0:
        if account.pw_uid != os.geteuid():
            raise Refused(
                f"cannot start processes as {name!r} without root; start 'dbgrelay serve' as "
                "root with relay.user set, or set run_as to the relay's own account (development)"
            )
        return account  # development mode: explicitly the relay's own account
    if account.pw_uid == 0:
        raise Refused(f"run_as {name!r} is root; debug servers must run as an unprivileged account")
    if account.pw_uid == forbid_uid:
        raise Refused(
            f"run_as {name!r} is the relay's own account; a debuggee would own the relay: "
            "use a separate account such as dbgrelay-target"
        )
    return account


# -- the private network namespace -------------------------------------------


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_private_network() -> None:
    """Move this process into a new network namespace with ``lo`` up.

    Raises:
        Refused: the kernel refused (for example no CAP_SYS_ADMIN in a container).
    """
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNET if uid == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise Refused(
            f"cannot create a private network namespace: {os.strerror(err)}; "
            + (
                "the relay needs CAP_SYS_ADMIN for managed servers (container: cap_add SYS_ADMIN)"
                if uid == 0
                else "enable unprivileged user namespaces or start the relay as root"
            )
        )
    if uid != 0:
        # Keep our own ids inside the new user namespace (the server sees its
        # real uid), and the full capability set there, which lets us bring
        # lo up; the server loses them at execve since its uid is not 0.
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags_now = struct.unpack("16sH22x", ifreq)[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags_now | _IFF_UP))


# -- the process tree ---------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """Every process below ``root``, found through /proc's parent links."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _listener_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN on ``port`` in this process's network namespace."""
    inodes = set()
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _TCP_LISTEN:
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    return inodes


def tree_listens(port: int) -> bool:
    """Whether a process below the shim holds the listening socket on ``port``."""
    inodes = {f"socket:[{inode}]" for inode in _listener_inodes(port)}
    if not inodes:
        return False
    for pid in _descendants(os.getpid()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


def _connect(host: str, port: int, reply: socket.socket) -> None:
    """Answer one ``c`` request on ``reply``: a connected socket, or why not."""
    try:
        if not tree_listens(port):
            raise OSError(f"nothing the relay launched listens on port {port}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as conn:
            conn.settimeout(_CONNECT_TIMEOUT)
            conn.connect((host, port))
            conn.setblocking(True)  # hand it back as a fresh socket would be
            _say({"event": "connected"}, reply, [conn.fileno()])
    except OSError as exc:
        _say({"event": "connect_failed", "error": exc.strerror or str(exc)}, reply)
    finally:
        reply.close()


def _signal_tree(group: int | None, sig: int) -> None:
    """Signal the server's process group and every descendant of the shim."""
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _kill_and_reap_rest() -> None:
    """SIGKILL and reap everything still below the shim, bounded in time.

    Called after the server itself has been reaped: what remains are
    processes it left behind and zombies.  As a subreaper the shim is an
    ancestor of every one of them, so the /proc walk finds them all (the
    server's pid, and so its group id, may already be reused).
    """
    deadline = time.monotonic() + _REAP_TIMEOUT
    while True:
        _signal_tree(None, signal.SIGKILL)
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child of ours is left, dead or alive
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One control message and the descriptors that came with it."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


# -- main ---------------------------------------------------------------------


class _Args:
    grace = 5.0
    run_as: str | None = None
    forbid_uid = 0
    listen: tuple[str, int] | None = None
    command: list[str]


def _parse(argv: list[str]) -> _Args | None:
    out = _Args()
    args = list(argv)
    try:
        while args and args[0] != "--":
            flag, value = args[0], args[1] if len(args) > 1 else None
            if value is None:
                return None
            if flag == "--kill-grace":
                out.grace = float(value)
            elif flag == "--run-as":
                out.run_as = value
            elif flag == "--forbid-uid":
                out.forbid_uid = int(value)
            elif flag == "--listen":
                host, _, port = value.rpartition(":")
                out.listen = (host.strip("[]"), int(port))
            else:
                return None
            del args[:2]
    except ValueError:
        return None
    if not args or args[0] != "--" or len(args) < 2 or out.grace < 0:
        return None
    out.command = args[1:]
    return out


def main(argv: list[str]) -> int:
    global _control
    # The privileged helper ignores SIGCHLD, and ignored signals survive
    # execve: without this the kernel would reap the server before we can.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    args = _parse(argv)
    if args is None:
        sys.stderr.write(USAGE)
        return 2
    if not sys.platform.startswith("linux"):
        sys.stderr.write("launcher.py: managed servers need Linux\n")
        return 2
    try:
        _control = socket.socket(fileno=os.dup(CONTROL_FD))
    except OSError:
        sys.stderr.write("launcher.py: standard input must be the relay's control socket\n")
        return 2
    os.close(CONTROL_FD)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, so nothing else lands there

    try:
        account = resolve_account(
            args.run_as or pwd.getpwuid(os.geteuid()).pw_name, args.forbid_uid
        )
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise Refused(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        enter_private_network()
    except (Refused, OSError) as exc:
        _say({"event": "failed", "error": str(exc)})
        return 126

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: None)

    drop: dict = {}
    if os.geteuid() == 0:
        drop = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    env = dict(os.environ, HOME=account.pw_dir or "/", USER=account.pw_name)
    env["LOGNAME"] = account.pw_name
    try:
        child = subprocess.Popen(
            args.command,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            start_new_session=True,
            umask=0o077,
            env=env,
            **drop,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        error = getattr(exc, "strerror", None) or str(exc)
        _say({"event": "failed", "error": f"{args.command[0]}: {error}"})
        return 127
    _say({"event": "started", "pid": child.pid})

    pidfd = os.pidfd_open(child.pid)
    watch = [pidfd, _control.fileno(), wake_r]
    killed_by: str | None = None
    deadline: float | None = None
    listening = args.listen is None
    poll = 0.005
    while True:
        if deadline is not None:
            timeout: float | None = max(0.0, deadline - time.monotonic())
        elif not listening:
            timeout = poll
        else:
            timeout = None
        ready, _, _ = select.select(watch, [], [], timeout)
        if pidfd in ready:
            break
        if not listening and killed_by is None and args.listen is not None:
            if tree_listens(args.listen[1]):
                listening = True
                _say({"event": "listening"})
            poll = min(poll * 1.5, 0.1)
        why = None
        if _control.fileno() in ready:
            try:
                data, fds = _receive(_control)
            except OSError:
                data, fds = b"", []
            replies = [socket.socket(fileno=fd) for fd in fds]
            if not data:
                watch.remove(_control.fileno())
                why = "relay_exited"
            elif data == b"c" and len(replies) == 1 and args.listen is not None:
                _connect(*args.listen, replies.pop())
            elif b"k" in data:
                why = "relay"
            for extra in replies:
                extra.close()
        if wake_r in ready:
            os.read(wake_r, 64)
            why = why or "signal"
        if why and killed_by is None:
            killed_by = why
            _signal_tree(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + args.grace
        elif deadline is not None and time.monotonic() >= deadline:
            _signal_tree(child.pid, signal.SIGKILL)
            deadline = None
    returncode = child.wait()
    # Whatever the server left behind (in its group or reparented to us) goes too.
    _kill_and_reap_rest()
    sig = -returncode if returncode < 0 else None
    _say(
        {
            "event": "exited",
            "pid": child.pid,
            "returncode": returncode,
            "signal": signal.Signals(sig).name if sig else None,
            "killed_by": killed_by,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
