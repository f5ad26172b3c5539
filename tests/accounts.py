"""Real OS accounts for the tests: the account managed servers run as, and throwaways.

CI runs the suite as root, where managed servers run as ``dbgrelay-target``
(``.ci/run`` and ``scripts/install-tools`` create it; the session fixture in
``tests/conftest.py`` creates it too when missing).  Run as another user,
the relay can only use its own account (development mode), so tests ask
:func:`target_account` instead of naming one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = "dbgrelay-target"
NOT_ROOT = "needs root: the test runs processes as a second, real account (CI runs as root)"


def is_root() -> bool:
    return os.geteuid() == 0


def target_account() -> str:
    """The account managed servers run as in these tests."""
    return TARGET if is_root() else pwd.getpwuid(os.getuid()).pw_name


def exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def create(name: str) -> None:
    """A system account with no home and no login shell (root only)."""
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
    )


def remove(name: str) -> None:
    subprocess.run(["userdel", name], check=False, capture_output=True)


def shared_dir(owner: str | None = None) -> Path:
    """A fresh folder under /tmp, mode 0755, that other accounts can reach.

    pytest's ``tmp_path`` sits below a 0700 folder of the user running the
    tests, where a server running as the target account could not read a
    debuggee.  With ``owner``, the folder belongs to that account (it may
    write there).  The caller removes it with :func:`shutil.rmtree`.
    """
    path = Path(tempfile.mkdtemp(prefix="dbgrelay-test-"))
    path.chmod(0o755)
    if owner is not None and is_root():
        account = pwd.getpwnam(owner)
        os.chown(path, account.pw_uid, account.pw_gid)
    return path


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _reachable_by_others(path: str) -> bool:
    """Whether every folder above ``path`` lets other accounts through, and it reads."""
    real = Path(os.path.realpath(path))
    if not os.stat(real).st_mode & 0o005 == 0o005:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in real.parents)


def public_python() -> str:
    """A Python 3 interpreter other accounts can run (for debuggees and a dropped relay).

    The venv's interpreter is normally fine; where it links into a private
    home (a pyenv build under /root, say), the system's ``python3`` is used.
    """
    for candidate in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(candidate) and _reachable_by_others(candidate):
            return os.path.realpath(candidate) if candidate != sys.executable else candidate
    raise RuntimeError("no Python interpreter other accounts can run; install python3")


def public_python_env() -> dict[str, str]:
    """Environment for :func:`public_python` to import this checkout and its packages."""
    import site

    import relay

    paths = [str(Path(relay.__file__).resolve().parents[1]), *site.getsitepackages()]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
