"""A real PostgreSQL server for the tests, made with ``initdb`` and run in the foreground.

The server lives in a temporary folder, listens on a free port on 127.0.0.1
only (and on a Unix socket in the same folder), trusts local connections and
is stopped and removed at the end of the test session.  PostgreSQL refuses
to run as root, so under root the server runs as the ``postgres`` account that
Debian's package creates (or a throwaway account made with ``useradd``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from bench.postgres import find_pg_bin

__all__ = ["PgServer", "find_pg_bin", "start_pg_server"]

_FALLBACK_ACCOUNT = "dbgrelay-pg"
_TIMEOUT = 60.0


def _become_and_die_with_parent(account: pwd.struct_passwd | None) -> None:
    """In the child: switch to the server's account, then ask for SIGINT when we die.

    In this order because Linux clears the parent-death signal when the
    process's credentials change.  SIGINT is PostgreSQL's fast shutdown, which
    ends client connections (SIGTERM would wait for them), so a killed test
    session leaves no server running.
    """
    if account is not None:
        os.setgroups([])
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: ``None`` means "as we are" (not root)."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_ACCOUNT):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            _FALLBACK_ACCOUNT,
        ],
        check=True,
        capture_output=True,
        timeout=_TIMEOUT,
    )
    return pwd.getpwnam(_FALLBACK_ACCOUNT)


class PgServer:
    """One PostgreSQL cluster in a temporary folder.

    Attributes:
        port: The TCP port on 127.0.0.1.
        folder: Holds the data directory, the socket and the server log.
    """

    def __init__(self, bin_dir: Path, folder: Path, account: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        self.folder = folder
        self.account = account
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.port = _free_port()
        self.user = account.pw_name if account is not None else pwd.getpwuid(os.getuid()).pw_name
        self.process: subprocess.Popen | None = None

    def _run(self, *argv: str | os.PathLike[str]) -> None:
        kwargs: dict = {}
        if self.account is not None:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        done = subprocess.run(
            [str(a) for a in argv],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"},
            **kwargs,
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}\n{log}")

    def init(self) -> None:
        self._run(
            self.bin_dir / "initdb",
            "-D",
            self.data,
            "--auth=trust",
            "--username",
            self.user,
            "--encoding=UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server (again) and wait until it accepts connections.

        It runs in the foreground as our child with a parent-death signal, so a
        test session that is killed does not leave it running.
        """
        import psycopg

        log = open(self.log, "ab")  # the child keeps its own copy
        try:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D", str(self.data),
                    "-p", str(self.port),
                    "-k", str(self.folder),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", "fsync=off",
                    "-c", "max_connections=200",
                ],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"},
                preexec_fn=partial(_become_and_die_with_parent, self.account),
            )  # fmt: skip
        finally:
            log.close()
        deadline = time.monotonic() + _TIMEOUT
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start:\n{self.log.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server at once (fast shutdown): clients see their connections end."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` over TCP."""
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname} connect_timeout=5"

    def create_database(self) -> str:
        """A new, empty database; returns its DSN."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@contextmanager
def start_pg_server() -> Iterator[PgServer]:
    """Run a fresh PostgreSQL server for the ``with`` block.

    Raises:
        LookupError: PostgreSQL's server programs are not installed.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise LookupError(
            "PostgreSQL's server is not installed (no initdb/pg_ctl); "
            "run scripts/install-tools or apt-get install postgresql"
        )
    account = _server_account()
    # Not under pytest's tmp folder: that one is private to root and the
    # server's account must reach its own files.
    folder = Path(tempfile.mkdtemp(prefix="dbgrelay-pg-"))
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
    server = PgServer(bin_dir, folder, account)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
