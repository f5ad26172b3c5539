"""A PostgreSQL server for the bench's shared-state path, started like any bench child.

``initdb`` in the scratch folder, then ``postgres`` itself in the foreground
under the bench's :class:`~bench.procs.Supervisor` (so SIGINT, SIGTERM and
the end of the run stop it with everything else), on a free port on
127.0.0.1 only.  PostgreSQL refuses to run as root; under root it runs as
the ``postgres`` account Debian's package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from .procs import BenchError, Child, Supervisor, free_port

__all__ = ["find_pg_bin", "start_postgres"]

#: Where Debian's ``postgresql`` package puts the server programs.
_PG_ROOT = Path("/usr/lib/postgresql")


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (newest installed version), or ``None``."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    if _PG_ROOT.is_dir():
        versions = sorted(
            (p for p in _PG_ROOT.iterdir() if (p / "bin" / "pg_ctl").exists()),
            key=lambda p: int(p.name) if p.name.isdigit() else 0,
        )
        if versions:
            return versions[-1] / "bin"
    return None


def start_postgres(sup: Supervisor, workdir: Path) -> tuple[Child, str]:
    """Start a fresh server with a ``dbgrelay`` database; return it and its DSN.

    Raises:
        BenchError: the server is not installed or would not start.
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise BenchError(
            "PostgreSQL server not found: apt-get install postgresql", reason="no_postgres"
        )
    prefix: list[str] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    folder = workdir / "postgres"
    folder.mkdir()
    if os.getuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise BenchError(
                "PostgreSQL refuses root and there is no postgres account: "
                "apt-get install postgresql",
                reason="no_postgres",
            ) from None
        user = account.pw_name
        os.chown(folder, account.pw_uid, account.pw_gid)
        # The scratch folder is private to root; the server's account must reach its own.
        os.chmod(workdir, 0o711)
        prefix = ["runuser", "-u", user, "--"]
    data = folder / "data"
    try:
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust",
             "--username", user, "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"initdb failed: {exc}", reason="no_postgres") from exc
    port = free_port()
    server = sup.start(
        "postgres",
        [*prefix, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
         "-k", str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
    )  # fmt: skip
    sup.wait_listening(server, port)
    dsn = f"host=127.0.0.1 port={port} user={user} dbname=postgres connect_timeout=5"
    return server, dsn
