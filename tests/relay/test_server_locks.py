"""The lock files that make one worker of a host a managed server's owner (SQLite workers).

Real files and real ``flock``: a second descriptor in this process, or
another process, is refused while the first holds the lock, and gets it once
the holder releases it or dies.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relay.backends import BackendError
from relay.state import ServerLocks

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="serve --workers is POSIX only")

_HOLDER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from relay.state import ServerLocks\n"
    "ServerLocks(Path(sys.argv[1])).claim(sys.argv[2])\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def refusal(locks: ServerLocks, target: str) -> BackendError:
    with pytest.raises(BackendError) as caught:
        locks.claim(target)
    return caught.value


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    folder = tmp_path / "claims"
    first, second = ServerLocks(folder), ServerLocks(folder)
    first.claim("build42")
    first.claim("build42")  # already its own: nothing to do
    refused = refusal(second, "build42")
    assert refused.reason == "server_elsewhere"
    assert str(refused) == "target 'build42': its managed server runs on another worker"
    second.claim("build43")  # another target has a lock of its own

    first.release("build42")
    second.claim("build42")
    assert refusal(first, "build42").reason == "server_elsewhere"
    second.close()
    first.claim("build42")
    first.close()


def test_the_lock_file_is_private_and_named_by_a_hash_of_the_target(tmp_path: Path) -> None:
    folder = tmp_path / "claims"
    locks = ServerLocks(folder)
    name = "../../etc/passwd\n"
    locks.claim(name)
    (path,) = folder.iterdir()
    assert path == locks.path(name) and path.name.endswith(".lock")
    assert len(path.stem) == 32 and all(c in "0123456789abcdef" for c in path.stem)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid()
    locks.close()


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    folder = tmp_path / "claims"
    locks = ServerLocks(folder)
    folder.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    locks.path("build42").symlink_to(elsewhere)
    refused = refusal(locks, "build42")
    assert refused.reason == "state_unavailable"
    assert "cannot claim its managed server" in str(refused)
    assert not elsewhere.exists()


def test_another_process_holding_the_lock_refuses_it_here_until_it_dies(tmp_path: Path) -> None:
    folder = tmp_path / "claims"
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder), "build42"],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        locks = ServerLocks(folder)
        assert refusal(locks, "build42").reason == "server_elsewhere"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # The kernel dropped the dead holder's lock with its descriptors.
        locks.claim("build42")
        locks.close()
    finally:
        holder.kill()
        holder.wait()
        for pipe in (holder.stdin, holder.stdout):
            assert pipe is not None
            pipe.close()
