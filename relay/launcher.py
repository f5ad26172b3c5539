"""The shim that holds a managed debug server's whole process tree.

The relay runs ``python -I relay/launcher.py CMD [ARG...]`` with a pipe on
standard input.  The shim starts the server in a new process group, makes
itself a child subreaper (so descendants that leave the group, as gdbserver's
inferior does with ``setpgid``, are still its descendants), and then waits.

It kills the tree (SIGTERM to every descendant, SIGKILL after the grace
period) when:

* the relay writes ``k`` on the pipe (idle, shutdown, admin), or
* the pipe reaches EOF: the relay has exited, ``kill -9`` included, since the
  kernel closes its end; or
* the shim gets SIGTERM, SIGINT or SIGHUP.

Why not ``PR_SET_PDEATHSIG`` on the server itself: the parent-death signal
fires when the *thread* that forked the child exits, and trio spawns processes
from worker threads that come and go.

Protocol on standard output, one JSON object per line:
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

GRACE_ENV = "DBGRELAY_KILL_GRACE"
_PR_SET_CHILD_SUBREAPER = 36


def _say(obj: dict) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``, found through /proc's parent links."""
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


def _signal_tree(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap_orphans() -> None:
    """Collect exited descendants that were reparented to us (subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: launcher.py CMD [ARG...]\n")
        return 2
    grace = float(os.environ.get(GRACE_ENV, "5"))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *_: None)

    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        _say({"event": "failed", "error": f"{argv[0]}: {exc.strerror or exc}"})
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
    _signal_tree(child.pid, signal.SIGKILL)
    _reap_orphans()
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
