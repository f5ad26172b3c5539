"""The shim that holds a managed debug server's whole process tree.

The relay runs ``python -I relay/launcher.py --kill-grace SECONDS -- CMD
[ARG...]`` with pipes on standard input and output.  The shim starts the
server in a new session (so a terminal's Ctrl-C does not reach it), makes
itself a child subreaper (so descendants that leave the server's process
group, as gdbserver's inferior does with ``setpgid``, or that daemonise, stay
its descendants), and then waits.

It kills the tree (SIGTERM to every descendant, SIGKILL to whatever is left
after the grace period) when:

* the relay writes ``k`` on the pipe (idle, max_session, shutdown), or
* the pipe reaches EOF: the relay has exited, ``kill -9`` included, since the
  kernel closes its end; or
* the shim gets SIGTERM, SIGINT or SIGHUP.

When the server exits by itself (``gdbserver --once`` after its client), the
shim kills whatever the server left behind.  Either way it reaps what it
killed before it reports, so a pid it reports as gone is gone.

Why not ``PR_SET_PDEATHSIG`` on the server itself: the parent-death signal
fires when the *thread* that forked the child exits, and trio spawns processes
from worker threads that come and go.

Protocol on standard output, one JSON object per line (the server's own
output goes to the shim's standard error, the server log, so nothing the
server or its inferior prints can be mistaken for a report):
``{"event": "started", "pid": N}``, then at the end
``{"event": "exited", "pid": N, "returncode": R, "signal": NAME|null,
"killed_by": null|"relay"|"relay_exited"|"signal"}``, or
``{"event": "failed", "error": TEXT}`` if the server could not be started.

Only the standard library is used and nothing is imported from the relay, so
it starts fast under ``-I``.  Linux-only (pidfd, subreaper, /proc).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36
# How long the shim keeps killing and reaping leftovers after the server is gone.
_REAP_TIMEOUT = 3.0
USAGE = "usage: launcher.py [--kill-grace SECONDS] -- CMD [ARG...]\n"


def _say(obj: dict) -> None:
    try:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    except OSError:
        # The relay is gone.  Point stdout at /dev/null so the interpreter's
        # final flush does not complain into the server log.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


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


def _parse(argv: list[str]) -> tuple[float, list[str]] | None:
    grace = 5.0
    args = list(argv)
    while args and args[0] != "--":
        if args[0] == "--kill-grace" and len(args) > 1:
            try:
                grace = float(args[1])
            except ValueError:
                return None
            del args[:2]
        else:
            return None
    if not args or args[0] != "--" or len(args) < 2 or grace < 0:
        return None
    return grace, args[1:]


def main(argv: list[str]) -> int:
    parsed = _parse(argv)
    if parsed is None:
        sys.stderr.write(USAGE)
        return 2
    grace, command = parsed
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: None)

    try:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            start_new_session=True,
        )
    except OSError as exc:
        _say({"event": "failed", "error": f"{command[0]}: {exc.strerror or exc}"})
        return 127
    _say({"event": "started", "pid": child.pid})

    pidfd = os.pidfd_open(child.pid)
    watch = [pidfd, 0, wake_r]
    killed_by: str | None = None
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(watch, [], [], timeout)
        if pidfd in ready:
            break
        why = None
        if 0 in ready:
            try:
                data = os.read(0, 64)
            except OSError:
                data = b""
            if not data:
                watch.remove(0)
                why = "relay_exited"
            elif b"k" in data:
                why = "relay"
        if wake_r in ready:
            os.read(wake_r, 64)
            why = why or "signal"
        if why and killed_by is None:
            killed_by = why
            _signal_tree(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
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
