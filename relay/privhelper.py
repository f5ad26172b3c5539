"""The privileged helper: the only part of a root-started relay that stays root.

``dbgrelay serve``, started as root with ``relay.user`` set, starts this
helper first (``python -I relay/privhelper.py --relay-uid UID --run-as
ACCOUNT[,ACCOUNT...]``) with one end of an ``AF_UNIX`` ``SOCK_SEQPACKET``
socket pair as its standard input, and then drops its own privileges.  The
pair has no name in the file system: only the relay holds the other end.

It does one thing: start :mod:`relay.launcher` shims.  Request, one
message, with the server log's file descriptor attached (``SCM_RIGHTS``)::

    {"run_as": ACCOUNT, "kill_grace": S, "listen": "HOST:PORT", "argv": [CMD, ...]}

It refuses an account that is not in ``--run-as`` (the accounts the
configuration named when the relay started), that is root, or that is the
relay's own uid; otherwise it creates a new control socket pair, starts the
shim with one end as its standard input and the log as its standard error,
and answers ``{"ok": true, "pid": N}`` with the other end attached, or
``{"ok": false, "error": TEXT}``.  It exits when the relay's end closes.  The
shims it started then see their control sockets close and kill their trees.

Only the standard library is used and nothing is imported from the relay.
"""

from __future__ import annotations

import array
import json
import os
import pwd
import signal
import socket
import subprocess
import sys

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
USAGE = "usage: privhelper.py --relay-uid UID --run-as ACCOUNT[,ACCOUNT...]\n"


def check_request(req: object, allowed: set[str], relay_uid: int) -> str | None:
    """Why ``req`` is refused, or None if the helper may start it."""
    if not isinstance(req, dict):
        return "malformed request"
    run_as, argv = req.get("run_as"), req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return "malformed request: argv"
    if not isinstance(req.get("kill_grace"), int | float) or not isinstance(req.get("listen"), str):
        return "malformed request: kill_grace or listen"
    if run_as not in allowed:
        return (
            f"run_as {run_as!r} was not configured when the relay started; "
            "restart the relay to use a new run_as account"
        )
    try:
        uid = pwd.getpwnam(run_as).pw_uid
    except KeyError:
        return f"run_as account {run_as!r} does not exist"
    if uid in (0, relay_uid):
        return f"run_as {run_as!r} is root or the relay's own account"
    return None


def serve(sock: socket.socket, allowed: set[str], relay_uid: int) -> None:
    """Answer requests on ``sock`` until the relay closes it."""
    while True:
        fds = array.array("i")
        data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            return
        try:
            req = json.loads(data)
        except ValueError:
            req = None
        error = check_request(req, allowed, relay_uid)
        if error is None and len(fds) != 1:
            error = "malformed request: expected the server log's file descriptor"
        if error is not None:
            sock.send(json.dumps({"ok": False, "error": error}).encode())
        else:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                shim = subprocess.Popen(
                    [sys.executable, "-I", LAUNCHER, "--kill-grace", str(req["kill_grace"])]
                    + ["--run-as", req["run_as"], "--forbid-uid", str(relay_uid)]
                    + ["--listen", req["listen"], "--", *req["argv"]],
                    stdin=mine.fileno(),
                    stdout=subprocess.DEVNULL,
                    stderr=fds[0],
                    start_new_session=True,
                )
            except OSError as exc:
                sock.send(json.dumps({"ok": False, "error": f"launcher: {exc}"}).encode())
            else:
                sock.sendmsg(
                    [json.dumps({"ok": True, "pid": shim.pid}).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
                )
            finally:
                mine.close()
                theirs.close()
        for fd in fds:
            os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "--relay-uid" or argv[2] != "--run-as":
        sys.stderr.write(USAGE)
        return 2
    try:
        relay_uid = int(argv[1])
    except ValueError:
        sys.stderr.write(USAGE)
        return 2
    allowed = {name for name in argv[3].split(",") if name}
    sock = socket.socket(fileno=os.dup(0))
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)
    # Shims are reaped by the kernel: the helper never waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # The relay's SIGTERM or Ctrl-C must not end the helper before the relay
    # has killed its servers; the helper ends when the relay's end closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        serve(sock, allowed, relay_uid)
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
