"""The admin Unix socket authenticates every caller by its kernel credentials.

A file mode is not an access control the relay can rely on (a debuggee
running as the relay's own account passed it), so each request is checked
against ``SO_PEERCRED``.  These tests give other, real accounts access to the
socket's path on purpose and check who gets in.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from config import AdminSection
from relay.admin import serve_admin
from relay.admin_client import AdminClient, AdminEndpoint

from .. import accounts
from .conftest import start_echo, start_relay
from .test_relay import gdb_target, sample

pytestmark = pytest.mark.skipif(not accounts.is_root(), reason=accounts.NOT_ROOT)

# Named for this test process: a run beside another, or after one that was
# killed before its cleanup, must not find the names taken.
OUTSIDER, LISTED, GROUPED, GROUP = (
    f"dbgr-o{os.getpid()}",
    f"dbgr-l{os.getpid()}",
    f"dbgr-g{os.getpid()}",
    f"dbgr-ops{os.getpid()}",
)

# Runs as another account: one request on the admin socket, prints the status line.
CLIENT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "s.sendall(b'GET /v1/sessions HTTP/1.1\\r\\nHost: relay\\r\\nConnection: close\\r\\n\\r\\n'); "
    "data = b''\n"
    "while chunk := s.recv(65536): data += chunk\n"
    "print(data.decode())"
)


@pytest.fixture(scope="module")
def other_accounts() -> Iterator[None]:
    subprocess.run(["groupadd", "--system", GROUP], check=True)
    for name in (OUTSIDER, LISTED, GROUPED):
        accounts.create(name)
    subprocess.run(["usermod", "-a", "-G", GROUP, GROUPED], check=True)
    yield
    for name in (OUTSIDER, LISTED, GROUPED):
        accounts.remove(name)
    subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = accounts.shared_dir()
    yield path
    accounts.rmtree(path)


async def request_as(user: str, socket_path: Path) -> tuple[int, str]:
    done = await trio.run_process(
        [accounts.public_python(), "-I", "-c", CLIENT, str(socket_path)],
        user=user,
        group=user,
        extra_groups=os.getgrouplist(user, pwd.getpwnam(user).pw_gid),
        capture_stdout=True,
        capture_stderr=True,
    )
    text = done.stdout.decode()
    return int(text.split()[1]), text


async def test_other_accounts_get_403_unless_named_in_admin_users_or_groups(
    nursery, make_config, pki, other_accounts, open_dir
):
    backend = await start_echo(nursery)
    sock = open_dir / "admin.sock"
    config = make_config([gdb_target("build42", backend.port)])
    admin = AdminSection(listen=sock, users=(LISTED,), groups=(GROUP,))
    config = dataclasses.replace(config, admin=admin)
    running = await start_relay(nursery, config, pki)
    await nursery.start(serve_admin, running.relay)
    # Anyone may reach the path: only the peer credentials keep them out now.
    sock.chmod(0o666)

    status, text = await request_as(OUTSIDER, sock)
    assert status == 403, text
    assert '"reason": "peer_not_allowed"' in text
    uid = pwd.getpwnam(OUTSIDER).pw_uid
    assert f"uid {uid} may not use the admin socket; add its account to admin.users" in text
    assert sample(running.metrics, "dbgrelay_admin_refusals_total", reason="peer_not_allowed") == 1

    for admitted in (LISTED, GROUPED):
        status, text = await request_as(admitted, sock)
        assert status == 200, (admitted, text)
    # Root (and the relay's own uid, which is root here) are admitted.
    assert await AdminClient(AdminEndpoint(unix_path=sock)).sessions() == []
    running.stop.set()
