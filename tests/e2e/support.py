"""Running the ``dbgrelay`` CLI and its peers as real subprocesses.

Everything here is synchronous: a :class:`Proc` reads its child's stdout and
stderr in two threads, and tests wait for a line (a READY event such as
``relay.listening``) bounded by a real timeout.  Nothing sleeps to wait out a
deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "DBGRELAY",
    "READY_TIMEOUT",
    "Proc",
    "ProcGroup",
    "clean_env",
    "config_text",
    "copy_materials",
    "free_port",
    "run_cli",
    "start_relay",
]

#: The venv's ``dbgrelay`` script, or ``python -m relay`` from a source tree.
_SCRIPT = Path(sys.executable).with_name("dbgrelay")
DBGRELAY: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "relay"]

#: Seconds to wait for a child to report that it is ready.  Generous: the
#: machine is shared, and a READY wait returns as soon as the line arrives.
READY_TIMEOUT = 20.0


def clean_env(home: Path) -> dict[str, str]:
    """A minimal environment: no user config, no debuginfod, unbuffered Python."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "LC_ALL": "C",
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    *args: str | os.PathLike[str], cwd: Path, timeout: float = 30.0, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    """Run one short ``dbgrelay`` command to completion and capture its output."""
    return subprocess.run(
        [*DBGRELAY, *map(str, args)],
        cwd=cwd,
        env=clean_env(cwd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        umask=umask,
    )


class Proc:
    """A long-running child whose output lines can be awaited.

    Args:
        argv: The command.
        cwd: Its working directory (also its ``HOME``).
        name: A label for failure messages.
        env: Its environment (default :func:`clean_env`).

    Resource handling:
        :meth:`stop` ends the child (SIGTERM, then SIGKILL) and joins the
        reader threads; :class:`ProcGroup` calls it on teardown.
    """

    def __init__(
        self, argv: list[str], *, cwd: Path, name: str, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.name = name
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=clean_env(cwd) if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._eof: set[str] = set()
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read, args=(s, getattr(self.popen, s)), daemon=True)
            for s in ("stdout", "stderr")
        ]
        for t in self._threads:
            t.start()

    def _read(self, stream: str, pipe: Any) -> None:
        for line in pipe:
            with self._cond:
                self.lines[stream].append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof.add(stream)
            self._cond.notify_all()

    def output(self) -> str:
        """Everything read so far, for failure messages."""
        with self._cond:
            return (
                f"--- {self.name} {self.argv}\n--- stdout:\n"
                + "\n".join(self.lines["stdout"])
                + "\n--- stderr:\n"
                + "\n".join(self.lines["stderr"])
            )

    def wait_line(
        self,
        match: str | Callable[[str], bool],
        *,
        stream: str = "stderr",
        timeout: float = READY_TIMEOUT,
    ) -> str:
        """The first line of ``stream`` that contains ``match`` (or satisfies it).

        Raises:
            AssertionError: the stream ended or ``timeout`` passed first; the
                message holds the child's output.
        """
        test = match if callable(match) else (lambda line: match in line)
        found: list[str] = []

        def ready() -> bool:
            found[:] = [line for line in self.lines[stream] if test(line)][:1]
            return bool(found) or stream in self._eof

        with self._cond:
            self._cond.wait_for(ready, timeout)
        if not found:
            raise AssertionError(
                f"{self.name}: no {stream} line matching {match!r}\n{self.output()}"
            )
        return found[0]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """JSON log records read so far from stderr, optionally only event ``name``."""
        with self._cond:
            lines = list(self.lines["stderr"])
        records = [_json(line) for line in lines]
        return [r for r in records if r is not None and (name is None or r.get("event") == name)]

    def wait_event(self, name: str, *, timeout: float = READY_TIMEOUT, **fields: Any) -> dict:
        """The first JSON log record for event ``name`` whose fields match ``fields``."""

        def test(line: str) -> bool:
            record = _json(line)
            return (
                record is not None
                and record.get("event") == name
                and all(record.get(k) == v for k, v in fields.items())
            )

        record = _json(self.wait_line(test, timeout=timeout))
        assert record is not None
        return record

    def wait(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait for the child to exit on its own and for its output to be read."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s\n{self.output()}"
            ) from None
        for t in self._threads:
            t.join(5)
        return code

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, grace: float = 5.0) -> None:
        """End the child if it still runs: SIGTERM, then SIGKILL after ``grace``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for t in self._threads:
            t.join(5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def _json(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class ProcGroup:
    """Children started for one test (or module), all stopped by :meth:`close`."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def start(
        self,
        argv: Iterable[str | os.PathLike[str]],
        *,
        cwd: Path,
        name: str,
        env: dict[str, str] | None = None,
    ) -> Proc:
        proc = Proc([str(a) for a in argv], cwd=cwd, name=name, env=env)
        self._procs.append(proc)
        return proc

    def dbgrelay(self, *args: str | os.PathLike[str], cwd: Path, name: str) -> Proc:
        """Start ``dbgrelay ARGS...``."""
        return self.start([*DBGRELAY, *args], cwd=cwd, name=name)

    def close(self) -> None:
        # Connectors and debuggers first, the relay last, so it can log the ends.
        for proc in reversed(self._procs):
            proc.stop()


def config_text(
    targets: list[dict[str, Any]],
    *,
    audit_key: bool = True,
    engine: str = "stdlib",
    data_plane: str = "auto",
) -> str:
    """A relay config on a free loopback port, with the given ``[[targets]]``.

    ``shutdown_grace`` is short so stopping a relay with a live tunnel
    (after a failed assertion) does not hold the test run.
    """
    lines = [
        "[relay]",
        'listen = ["127.0.0.1:0"]',
        'state_dir = "state"',
        'shutdown_grace = "1s"',
        f'data_plane = "{data_plane}"',
        "[tls]",
        'cert = "pki/server.pem"',
        'key = "pki/server.key"',
        f'engine = "{engine}"',
        "[auth]",
        'jwks = "keys/jwks.json"',
    ]
    if audit_key:
        lines.append('audit_key = "keys/audit.key"')
    lines += ["[metrics]", 'listen = ""', "[admin]", 'listen = "unix:admin.sock"']
    for target in targets:
        lines.append("[[targets]]")
        for key, value in target.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def start_relay(procs: ProcGroup, home: Path) -> tuple[Proc, str]:
    """Start ``dbgrelay serve`` on ``home/dbgrelay.toml``; return it and its address."""
    relay = procs.dbgrelay("serve", "--config", "dbgrelay.toml", cwd=home, name="relay")
    listening = relay.wait_event("relay.listening")
    return relay, listening["address"]


def copy_materials(materials: Path, home: Path) -> None:
    """Copy keys/ and pki/ (modes included) into a relay's folder."""
    for sub in ("keys", "pki"):
        shutil.copytree(materials / sub, home / sub)
