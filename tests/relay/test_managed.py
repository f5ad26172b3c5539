"""Managed debug servers: a real relay on loopback launches a real gdbserver.

How time works here.  The relay runs in-process (``serve_relay``) on trio's
mock clock, and the test switches the clock between two modes:

* **real time** (``rate = 1``, ``autojump_threshold = inf``) whenever real
  processes or sockets do work: launching gdbserver, TLS handshakes, bytes
  through the tunnel, killing the process tree.  The clock then follows the
  wall clock, and a bounded wait for an event (``fail_after``) is a real
  bound.
* **autojump** (``rate = 0``, ``autojump_threshold = 0``) while only deadlines
  are pending: the clock jumps straight to the next one, so a 15-minute idle
  timeout passes in milliseconds.

A deadline whose expiry starts real work (the idle kill, ``max_session``) is
approached in autojump mode up to a second before it; the test then switches
to real time and jumps the clock past it with ``MockClock.jump``, so the kill
runs in real time.  Nothing sleeps for real to wait out a deadline.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil

import pytest
import trio
import trio.testing

from relay.connector import RelayRefused, open_tunnel

from ..processes import is_gone
from .conftest import RunningRelay, session_files, start_relay

GDBSERVER = shutil.which("gdbserver")
SLEEP = shutil.which("sleep")
pytestmark = pytest.mark.skipif(GDBSERVER is None, reason="needs gdbserver installed")

LONG_TOKEN = 8 * 3600  # the tunnels here must not end by token expiry

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}


class Clock:
    """Switch trio's mock clock between following real time and autojumping."""

    def __init__(self, mock: trio.testing.MockClock) -> None:
        self.mock = mock

    def real_time(self) -> None:
        self.mock.autojump_threshold = math.inf
        self.mock.rate = 1.0

    def autojump(self) -> None:
        self.mock.rate = 0.0
        self.mock.autojump_threshold = 0.0

    def jump(self, seconds: float) -> None:
        self.mock.jump(seconds)


class AuditEvents(logging.Handler):
    """Relay audit events as the relay logs them, with a way to wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, dict]] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        self.records.append((record.getMessage(), fields))
        self._changed.set()
        self._changed = trio.Event()

    def all(self, event: str) -> list[dict]:
        return [fields for name, fields in self.records if name == event]

    async def wait_for(self, event: str, **match) -> dict:
        """The first ``event`` whose fields match ``match``; waits (at most 20 s) for it."""
        with trio.fail_after(20):
            while True:
                for fields in self.all(event):
                    if all(fields.get(k) == v for k, v in match.items()):
                        return fields
                await self._changed.wait()


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> Clock:
    """The test's clock, starting in real time.

    pytest-trio runs a test on the clock only when the test itself takes the
    ``autojump_clock`` argument, so every test here takes both.
    """
    clock = Clock(autojump_clock)
    clock.real_time()  # every test starts by launching real things
    return clock


@pytest.fixture
def audit_events():
    handler = AuditEvents()
    logger = logging.getLogger("audit")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def managed(launch: list[str], **extra) -> dict:
    return {
        "name": "build42",
        "kind": "gdbserver",
        "backend": "tcp://127.0.0.1:{port}",
        "launch": launch,
    } | extra


def once_server() -> list[str]:
    return [GDBSERVER, "--once", "127.0.0.1:{port}", SLEEP, "1000"]


def lasting_server() -> list[str]:
    """gdbserver without --once: it listens again after its client leaves."""
    return [GDBSERVER, "127.0.0.1:{port}", SLEEP, "1000"]


async def relay_for(nursery, make_config, pki, target: dict) -> RunningRelay:
    running = await start_relay(nursery, make_config([target]), pki)
    # fsync on the event loop: in autojump mode the clock would jump while a
    # worker thread fsyncs.
    running.relay.fsync_in_thread = False
    return running


async def tunnel(running: RunningRelay, token: str) -> tuple[trio.abc.Stream, str]:
    tls, session_id, first = await open_tunnel(running.settings(token, handshake_timeout=60))
    assert first == b""
    return tls, session_id


async def ask_gdbserver(tls: trio.abc.Stream) -> bytes:
    """Send the GDB remote packet ``?`` (why did the target stop?) and read the reply."""
    await tls.send_all(b"$?#3f")
    reply = b""
    with trio.fail_after(10):
        while not re.search(rb"\$[^#]*#[0-9a-f]{2}", reply):
            data = await tls.receive_some(4096)
            assert data, f"tunnel closed after {reply!r}"
            reply += data
    return reply


def assert_stops_at_start(reply: bytes) -> None:
    # gdbserver acks our packet, then reports the inferior stopped by SIGTRAP.
    assert re.match(rb"\+\$[TS]05", reply), reply


def inferior_pid(running: RunningRelay) -> int:
    """The pid of the program gdbserver started, from the server's log."""
    log = (running.relay.config.relay.state_dir / "servers" / "build42.log").read_text()
    return int(re.findall(r"Process .* created; pid = (\d+)", log)[-1])


def session_records(running: RunningRelay, session_id: str) -> list[dict]:
    (path,) = running.relay.config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def relay_records(running: RunningRelay, event: str) -> list[dict]:
    records = []
    for path in sorted(running.relay.config.relay.audit_dir.glob("relay-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r.get("event") == event]


async def test_first_tunnel_launches_the_server_and_reaches_it_without_probing_it(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    # gdbserver --once serves exactly one client: had the relay connected to
    # check it listens, the tunnel would find it gone.
    running = await relay_for(nursery, make_config, pki, managed(once_server()))
    assert audit_events.all("server.launched") == []

    tls, session_id = await tunnel(running, token_for(ttl=LONG_TOKEN))

    assert_stops_at_start(await ask_gdbserver(tls))
    launched = audit_events.all("server.launched")
    assert len(launched) == 1
    port = launched[0]["port"]
    assert launched[0]["argv"] == [GDBSERVER, "--once", f"127.0.0.1:{port}", SLEEP, "1000"]
    await tls.aclose()
    await audit_events.wait_for("server.exited")
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    records = session_records(running, session_id)
    backend = next(r for r in records if r.get("event") == "backend.launched")
    assert (backend["pid"], backend["port"]) == (launched[0]["pid"], port)
    connected = next(r for r in records if r.get("event") == "backend.connected")
    assert connected["backend"] == f"tcp://127.0.0.1:{port}"
    running.stop.set()


async def test_a_once_server_that_exited_is_launched_afresh_for_the_next_tunnel(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    running = await relay_for(nursery, make_config, pki, managed(once_server()))
    token = token_for(ttl=LONG_TOKEN)
    tls, _ = await tunnel(running, token)
    assert_stops_at_start(await ask_gdbserver(tls))
    await tls.aclose()
    # gdbserver --once exits after its client, and the launcher reports it.
    first = await audit_events.wait_for("server.exited")
    assert first["reason"] == "exited" and first["returncode"] is not None
    assert is_gone(first["pid"])

    tls, session_id = await tunnel(running, token)

    assert_stops_at_start(await ask_gdbserver(tls))
    launched = audit_events.all("server.launched")
    assert len(launched) == 2 and launched[1]["pid"] != first["pid"]
    await tls.aclose()
    await audit_events.wait_for("server.exited", pid=launched[1]["pid"])
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    events = [r.get("event") for r in session_records(running, session_id)]
    assert "backend.launched" in events and "backend.reused" not in events
    running.stop.set()


async def test_a_running_server_is_reused_by_the_next_tunnel(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    running = await relay_for(nursery, make_config, pki, managed(lasting_server()))
    token = token_for(ttl=LONG_TOKEN)
    tls, _ = await tunnel(running, token)
    assert_stops_at_start(await ask_gdbserver(tls))
    await tls.aclose()
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()

    tls, session_id = await tunnel(running, token)

    # The same inferior is still stopped where the first tunnel left it.
    assert_stops_at_start(await ask_gdbserver(tls))
    await tls.aclose()
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    (launched,) = audit_events.all("server.launched")
    records = session_records(running, session_id)
    reused = next(r for r in records if r.get("event") == "backend.reused")
    assert reused["pid"] == launched["pid"] and reused["port"] == launched["port"]
    running.stop.set()
    await audit_events.wait_for("server.exited", reason="shutdown")


async def test_idle_timeout_closes_the_tunnel_and_kills_the_server_and_its_inferior(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    running = await relay_for(
        nursery, make_config, pki, managed(lasting_server(), idle_timeout="15m", kill_grace="5s")
    )
    tls, session_id = await tunnel(running, token_for(ttl=LONG_TOKEN))
    assert_stops_at_start(await ask_gdbserver(tls))
    t0 = trio.current_time()  # the tunnel's last byte moved just before this
    (launched,) = audit_events.all("server.launched")
    server, inferior = launched["pid"], inferior_pid(running)

    clock.autojump()
    await trio.sleep_until(t0 + 899)
    assert session_id in running.relay.sessions
    await trio.sleep_until(t0 + 901)
    assert session_id not in running.relay.sessions
    assert session_records(running, session_id)[-1]["reason"] == "idle"
    # The server outlives the tunnel by the target's idle_timeout.
    await trio.sleep_until(t0 + 900 + 899)
    assert not is_gone(server) and not is_gone(inferior)
    assert audit_events.all("server.exited") == []

    clock.real_time()
    clock.jump(2)
    exited = await audit_events.wait_for("server.exited")

    assert exited["reason"] == "idle" and exited["signal"] == "SIGTERM"
    assert exited["pid"] == server
    assert is_gone(server)
    assert is_gone(inferior)  # the debuggee, a grandchild in its own process group
    (record,) = relay_records(running, "server.exited")
    assert (record["reason"], record["signal"], record["pid"]) == ("idle", "SIGTERM", server)
    assert record["returncode"] == -15
    running.stop.set()


async def test_max_session_kills_the_server_even_while_it_is_used(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    running = await relay_for(
        nursery,
        make_config,
        pki,
        managed(lasting_server(), idle_timeout="8h", max_session="1h", kill_grace="5s"),
    )
    tls, session_id = await tunnel(running, token_for(ttl=LONG_TOKEN))
    assert_stops_at_start(await ask_gdbserver(tls))
    t0 = trio.current_time()
    (launched,) = audit_events.all("server.launched")

    clock.autojump()
    await trio.sleep_until(t0 + 3599)
    assert audit_events.all("server.exited") == []
    clock.real_time()
    clock.jump(2)
    exited = await audit_events.wait_for("server.exited")

    assert exited["reason"] == "max_session" and exited["signal"] == "SIGTERM"
    assert is_gone(launched["pid"])
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    assert session_records(running, session_id)[-1]["reason"] == "max_session"
    running.stop.set()


async def test_relay_shutdown_kills_managed_servers(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    running = await relay_for(nursery, make_config, pki, managed(lasting_server()))
    tls, _ = await tunnel(running, token_for(ttl=LONG_TOKEN))
    assert_stops_at_start(await ask_gdbserver(tls))
    await tls.aclose()
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    (launched,) = audit_events.all("server.launched")
    assert not is_gone(launched["pid"])  # idle_timeout (15 min) is far away

    running.stop.set()
    exited = await audit_events.wait_for("server.exited")

    assert exited["reason"] == "shutdown" and exited["signal"] == "SIGTERM"
    assert is_gone(launched["pid"])


async def test_a_launch_program_removed_after_startup_refuses_the_tunnel_with_502(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events, target_dir
):
    # The config check found the program; it was uninstalled since.
    program = target_dir / "gdbserver-old"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    running = await relay_for(
        nursery, make_config, pki, managed([str(program), "127.0.0.1:{port}"])
    )
    program.unlink()

    with pytest.raises(RelayRefused) as refused:
        await tunnel(running, token_for(ttl=LONG_TOKEN))

    assert (refused.value.status, refused.value.reason) == (502, "launch_failed")
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    (path,) = session_files(running.relay.config.relay.audit_dir)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    failed = next(r for r in records if r.get("event") == "backend.failed")
    assert failed["reason"] == "launch_failed"
    assert str(program) in failed["error"] and "No such file" in failed["error"]
    assert records[-1]["event"] == "session.closed" and records[-1]["reason"] == "launch_failed"
    assert audit_events.all("server.launched") == []
    running.stop.set()


async def test_a_server_that_exits_before_listening_is_reported_with_its_status(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    launch = ["sh", "-c", "echo cannot open the core file >&2; exit 3", "{port}"]
    running = await relay_for(nursery, make_config, pki, managed(launch))

    with pytest.raises(RelayRefused) as refused:
        await tunnel(running, token_for(ttl=LONG_TOKEN))

    assert (refused.value.status, refused.value.reason) == (502, "launch_failed")
    exited = await audit_events.wait_for("server.exited")
    assert exited["reason"] == "launch_failed" and exited["returncode"] == 3
    log = (running.relay.config.relay.state_dir / "servers" / "build42.log").read_text()
    assert "cannot open the core file" in log
    running.stop.set()


async def test_a_server_that_never_listens_is_killed_after_launch_timeout(
    autojump_clock, clock, nursery, make_config, token_for, pki, audit_events
):
    # `sleep 1000 PORT` runs but never listens.
    running = await relay_for(
        nursery, make_config, pki, managed([SLEEP, "1000", "{port}"], launch_timeout="10s")
    )
    outcome: list[RelayRefused] = []
    answered = trio.Event()

    async def client() -> None:
        try:
            await tunnel(running, token_for(ttl=LONG_TOKEN))
        except RelayRefused as exc:
            outcome.append(exc)
        finally:
            answered.set()

    nursery.start_soon(client)
    launched = await audit_events.wait_for("server.launched")
    started = trio.current_time()  # launch_timeout began a little before this

    clock.autojump()
    await trio.sleep_until(started + 9)
    assert audit_events.all("server.exited") == [] and not is_gone(launched["pid"])
    clock.real_time()
    clock.jump(1.5)
    exited = await audit_events.wait_for("server.exited")

    assert exited["reason"] == "launch_failed" and exited["signal"] == "SIGTERM"
    assert is_gone(launched["pid"])
    with trio.fail_after(10):
        await answered.wait()
    assert [(e.status, e.reason) for e in outcome] == [(502, "launch_failed")]
    with trio.fail_after(10):
        await running.relay.wait_no_sessions()
    (path,) = session_files(running.relay.config.relay.audit_dir)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    failed = next(r for r in records if r.get("event") == "backend.failed")
    assert f"did not listen on port {launched['port']} within 10s" in failed["error"]
    running.stop.set()
