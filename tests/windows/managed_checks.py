"""Managed-server checks, run by the Windows Python under Wine (see test_managed.py).

``python managed_checks.py SCENARIO TOKEN`` launches ``managed_server.py``
through the relay's own code path (:class:`relay.backends.ManagedServer`,
hence a Job Object) and prints JSON lines with what it saw.  Not collected
by pytest.
"""

import json
import math
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pywintypes
import trio
import trio.testing
import win32api
import win32con
import win32process
import win32security

import relay.platform._jobs_windows as jobs
from config import TargetConfig, TcpBackend
from relay.backends import BackendError, ManagedServer

SERVER = Path(__file__).with_name("managed_server.py")
STILL_ACTIVE = 259
IDLE = 60.0


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def step(name: str, server: ManagedServer) -> None:
    """Say how far a scenario got, and whether this process is in the server's job.

    The result is the last line; these come before it, so a scenario that
    dies on the way shows where.  A process in the job would die with the
    server's kill (exit code 1, nothing printed), hence the second field.
    """
    tree = server._launched
    say(step=name, relay_in_job=None if tree is None else tree.in_job(os.getpid()))


def alive(pid: int) -> bool:
    try:
        handle = win32api.OpenProcess(win32con.PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    except pywintypes.error:
        return False
    try:
        return win32process.GetExitCodeProcess(handle) == STILL_ACTIVE
    finally:
        handle.Close()


def token_facts(pid: int) -> dict:
    handle = win32api.OpenProcess(win32con.PROCESS_QUERY_INFORMATION, False, pid)
    token = win32security.OpenProcessToken(handle, win32con.TOKEN_QUERY)
    sid, _ = win32security.GetTokenInformation(token, win32security.TokenIntegrityLevel)
    admins = win32security.CreateWellKnownSid(win32security.WinBuiltinAdministratorsSid)
    groups = win32security.GetTokenInformation(token, win32security.TokenGroups)
    admin_attrs = [attrs for g, attrs in groups if g == admins]
    privileges = win32security.GetTokenInformation(token, win32security.TokenPrivileges)
    return {
        "integrity": win32security.ConvertSidToStringSid(sid),
        "admins_deny_only": bool(admin_attrs)
        and all(a & win32security.SE_GROUP_USE_FOR_DENY_ONLY for a in admin_attrs),
        "admins_enabled": any(a & win32security.SE_GROUP_ENABLED for a in admin_attrs),
        "privileges": sorted(
            win32security.LookupPrivilegeName(None, luid) for luid, _ in privileges
        ),
    }


def make_server(token: str, events: list, run_as: str | None = None) -> ManagedServer:
    target = TargetConfig(
        name="winserver",
        kind="server",
        backend=TcpBackend("127.0.0.1", None),
        backend_url="tcp://127.0.0.1:{port}",
        launch=(sys.executable, str(SERVER), "{port}", token),
        idle_timeout=IDLE,
        launch_timeout=60.0,
    )
    return ManagedServer(
        target,
        log_dir=Path("servers"),
        on_event=lambda event, fields: events.append([event, fields]),
        run_as=run_as or win32api.GetUserName(),
    )


@asynccontextmanager
async def launched(
    token: str, events: list
) -> AsyncIterator[tuple[ManagedServer, trio.SocketStream]]:
    """The server started through ``ManagedServer.run`` and one connection through its ``connect``.

    The server runs until the block ends (or longer, if the block waits for
    its end).
    """
    server = make_server(token, events)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        step("launched", server)
        stream = await server.connect(connect_timeout=10)
        step("connected", server)
        yield server, stream


async def ask(stream: trio.SocketStream, line: bytes) -> str:
    await stream.send_all(line + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


async def ask_pids(stream: trio.SocketStream) -> tuple[int, int]:
    """The server's pid and its grandchild's."""
    pid, grandchild = map(int, (await ask(stream, b"pids")).split())
    return pid, grandchild


async def idle(token: str, clock: trio.testing.MockClock) -> None:
    """Reached through ManagedServer.connect, then killed on idle, grandchild included."""
    events: list = []
    async with launched(token, events) as (server, stream):
        server.tunnel_opened()
        echo = await ask(stream, b"hello")
        pid, grandchild = await ask_pids(stream)
        tree = server._launched
        facts = {
            "echo": echo,
            "server_in_job": tree.in_job(pid),
            "grandchild_in_job": tree.in_job(grandchild),
            "relay_in_job": tree.in_job(os.getpid()),
            "token": token_facts(pid),
        }
        await stream.aclose()
        server.tunnel_closed()
        # Autojump to a second before the idle deadline, then real time for the kill.
        clock.rate, clock.autojump_threshold = 0, 0
        await trio.sleep(IDLE - 1)
        clock.rate, clock.autojump_threshold = 1, math.inf
        await server.wait_done()
    say(
        **facts,
        events=events,
        server_alive=alive(pid),
        grandchild_alive=alive(grandchild),
        pid=pid,
    )


async def exits(token: str, clock: trio.testing.MockClock) -> None:
    """A server that exits by itself is reported as exited; the rest of its tree goes too."""
    events: list = []
    async with launched(token, events) as (server, stream):
        _, grandchild = await ask_pids(stream)
        await stream.send_all(b"quit\n")
        await server.wait_done()
    say(events=events, grandchild_alive=alive(grandchild), running=server.running)


def with_listener_owner(real_table, port: int, owner: int):
    """``tcp_table`` naming ``owner`` for the listener on ``port``, as Windows would.

    Wine 8 reports no owning process (pid 0) for listening sockets; Windows
    does.  The scenarios supply the owner of a listener whose owner they know.
    """

    def table(*, listeners: bool):
        return [
            (s, lh, lp, rh, rp, owner if (pid == 0 and listeners and lp == port) else pid)
            for s, lh, lp, rh, rp, pid in real_table(listeners=listeners)
        ]

    return table


async def refusal(server: ManagedServer, table) -> dict | None:
    """Why ``server.connect`` fails while the TCP table is read through ``table`` (None: it did not)."""
    real_table = jobs.tcp_table
    jobs.tcp_table = table
    try:
        stream = await server.connect(connect_timeout=10)
    except BackendError as exc:
        return {"reason": exc.reason, "message": str(exc)}
    finally:
        jobs.tcp_table = real_table
    await stream.aclose()
    return None


async def outsider(token: str, clock: trio.testing.MockClock) -> None:
    """A listener on the server's port owned by a process outside the job is refused."""
    events: list = []
    async with launched(token, events) as (server, stream):
        unlisten = await ask(stream, b"unlisten")
        # This process, outside the server's job, now listens on the port.
        impostor = socket.socket()
        impostor.bind(("127.0.0.1", server.port))
        impostor.listen()
        refused = await refusal(
            server, with_listener_owner(jobs.tcp_table, server.port, os.getpid())
        )
        impostor.close()
        await stream.aclose()
        step("killing", server)
        server.kill("shutdown")
        await server.wait_done()
    say(unlisten=unlisten, refused=refused, relay_pid=os.getpid(), events=events)


async def host(token: str, clock: trio.testing.MockClock) -> None:
    """Launch, say the pids, then wait to be killed from outside."""
    async with launched(token, []) as (_, stream):
        pid, grandchild = await ask_pids(stream)
        say(ready=True, pid=pid, grandchild=grandchild)
        await trio.sleep_forever()


async def busy_host(token: str, clock: trio.testing.MockClock) -> None:
    """Reached through ManagedServer.connect while the host holds thousands of connections."""
    events: list = []
    async with launched(token, events) as (server, stream):
        echo = await ask(stream, b"hello")
        await stream.aclose()
        step("killing", server)
        server.kill("shutdown")
        await server.wait_done()
    say(echo=echo, events=[event for event, _ in events])


async def slow_check(token: str, clock: trio.testing.MockClock) -> None:
    """A check of the accepted connection that fails after the connect timeout says why."""
    events: list = []
    async with launched(token, events) as (server, stream):
        pid, _ = await ask_pids(stream)
        owned = with_listener_owner(jobs.tcp_table, server.port, pid)

        def table(*, listeners: bool):
            if listeners:
                return owned(listeners=True)
            # The read of every connection on a busy host under Wine: longer
            # than the connect timeout, then given up.
            clock.jump(11)
            raise OSError(None, "GetExtendedTcpTable failed (14)")

        failed = await refusal(server, table)
        await stream.aclose()
        step("killing", server)
        server.kill("shutdown")
        await server.wait_done()
    say(failed=failed)


async def other_account(token: str, clock: trio.testing.MockClock) -> None:
    """A run_as the relay has no logon for: the launch fails with one line, nothing starts."""
    events: list = []
    server = make_server(token, events, run_as="dbgrelay-target")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
    except* BackendError as group:
        (exc,) = group.exceptions
        say(reason=exc.reason, message=str(exc), events=events)


async def warnings(token: str, clock: trio.testing.MockClock) -> None:
    """What check-config says about run_as on Windows, for a config in this folder."""
    from config import config_from_dict
    from relay.privsep import development_mode_warning, missing_account_warnings

    for name in ("server.pem", "server.key", "jwks.json"):
        await trio.Path(name).touch()
    me = win32api.GetUserName()

    def config(run_as: str):
        target = {
            "name": "build42",
            "kind": "server",
            "backend": "tcp://127.0.0.1:{port}",
            "launch": [sys.executable, str(SERVER), "{port}", token],
        }
        data = {
            "tls": {"cert": "server.pem", "key": "server.key"},
            "auth": {"jwks": "jwks.json"},
            "relay": {"run_as": run_as},
            "targets": [target],
        }
        return config_from_dict(data, base_dir=Path.cwd())

    say(
        me=me,
        other=development_mode_warning(config("dbgrelay-target")),
        own=development_mode_warning(config(me)),
        missing=missing_account_warnings(config("dbgrelay-target")),
    )


if __name__ == "__main__":
    scenario, token = sys.argv[1], sys.argv[2]
    clock = trio.testing.MockClock(rate=1)
    trio.run(globals()[scenario], token, clock, clock=clock)
