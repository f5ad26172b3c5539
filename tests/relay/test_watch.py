"""``on_idle`` and forgotten-server probes, on trio's mock clock.

Tunnels are real TLS over in-memory streams, and so is every connection to
the backend (the relay's ``open_backend`` is the in-memory listener here,
probes included), so while only those run the clock may autojump: idle
timeouts of 15 minutes and probes every 30 seconds take milliseconds.

``on_idle`` is a real subprocess.  Before a deadline whose expiry starts it,
the test switches the clock to real time and jumps past the deadline, then
waits for the ``on_idle.ran`` event; back in autojump mode it checks that
nothing runs twice.  Nothing sleeps for real to wait out a deadline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from relay.backends import BackendError
from relay.metrics import Metrics
from relay.preamble import NEED_DATA, ResponseParser, render_request
from relay.server import Relay, open_relay
from relay.session import handle_connection
from relay.tls import make_client_engine
from relay.watch import ON_IDLE_OUTPUT_LIMIT, run_watch

from .test_managed import AuditEvents, Clock, is_gone

T0 = 1_800_000_000.0  # the wall clock at mock time 0
DAY = 24 * 3600


def wall() -> float:
    return T0 + trio.current_time()


class Relayed:
    """A relay whose tunnels and backend connections are memory streams."""

    def __init__(self, relay: Relay, nursery: trio.Nursery, ca: Path) -> None:
        self.relay = relay
        self.nursery = nursery
        self.ca = ca
        self.backend_connections = 0
        self.backend_down = False
        relay.open_backend = self._open_backend
        relay.fsync_in_thread = False  # a worker thread would let the clock jump

    async def _open_backend(self, backend, *, connect_timeout: float):
        if self.backend_down:
            raise BackendError("connection refused", reason="backend_unreachable")
        self.backend_connections += 1
        ours, theirs = trio.testing.memory_stream_pair()

        async def echo() -> None:
            try:
                while data := await theirs.receive_some(65536):
                    await theirs.send_all(data)
            except trio.BrokenResourceError:
                pass
            await theirs.aclose()

        self.nursery.start_soon(echo)
        return ours

    async def connect(self, token: str) -> tuple[trio.abc.Stream, str]:
        client_raw, server_raw = trio.testing.memory_stream_pair()
        self.nursery.start_soon(handle_connection, self.relay, server_raw)
        tls = make_client_engine(ca=self.ca).wrap(client_raw, "127.0.0.1")
        await tls.do_handshake()
        await tls.send_all(render_request(method="CONNECT", target="build42", token=token))
        parser = ResponseParser()
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await tls.receive_some(4096))
        assert event.status == 200, event
        return tls, event.headers["dbgrelay-session"]

    async def close(self, tls: trio.abc.Stream, session_id: str) -> float:
        """Close a tunnel from the client side; return when the relay saw it end."""
        await tls.aclose()
        while session_id in self.relay.sessions:
            await trio.lowlevel.checkpoint()
        return trio.current_time()

    def metric(self, name: str) -> float:
        body, _ = self.relay.metrics.render()
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name and s.labels.get("target") == "build42":
                    return s.value
        raise AssertionError(f"no sample {name}")

    def audit_records(self, event: str) -> list[dict]:
        records = []
        for path in self.relay.config.relay.audit_dir.glob("relay-*.jsonl"):
            records += [json.loads(line) for line in path.read_text().splitlines()]
        return [r for r in records if r.get("event") == event]


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> Clock:
    """The test's clock, autojumping.  Tests also take ``autojump_clock``:
    pytest-trio uses a mock clock only when the test itself asks for it."""
    return Clock(autojump_clock)


@pytest.fixture
def audit_events():
    import logging

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


@pytest.fixture
def relayed(make_config, pki, nursery):
    """``relayed(**target_keys)`` builds the relay for one unmanaged target."""

    def make(**target) -> Relayed:
        config = make_config(
            [{"name": "build42", "kind": "dbgsrv", "backend": "tcp://127.0.0.1:9"} | target]
        )
        relay = open_relay(
            config, wall_clock=wall, metrics=Metrics(version="t", targets=["build42"])
        )
        return Relayed(relay, nursery, pki / "ca.pem")

    return make


SH = shutil.which("sh")


def whole_line(path: Path) -> str | None:
    """The file's text if it holds a whole line yet, else None."""
    text = path.read_text() if path.exists() else ""
    return text if text.endswith("\n") else None


async def written_by_process(path: Path) -> str:
    """The file's text once another process has written a whole line (bounded)."""
    with trio.fail_after(10):
        # Another process writes it: there is no event to wait on.
        while (text := whole_line(path)) is None:  # noqa: ASYNC110
            await trio.sleep(0.01)
    return text


async def test_on_idle_runs_once_when_the_last_tunnel_has_been_closed_for_idle_timeout(
    autojump_clock, clock, relayed, token_for, nursery, audit_events
):
    script = 'echo "cleaning up $1"; echo "a warning" >&2; exit 3'
    r = relayed(idle_timeout="15m", probe_interval="0", on_idle=[SH, "-c", script, "sh", "b42"])
    nursery.start_soon(run_watch, r.relay)
    token = token_for(now=wall(), ttl=DAY)
    first, first_id = await r.connect(token)
    second, second_id = await r.connect(token)

    await trio.sleep(100)
    closed_first = await r.close(first, first_id)
    # The second tunnel stays open (no bytes) until its own idle timeout.
    await trio.sleep_until(closed_first + 900 + 1)
    assert audit_events.all("on_idle.ran") == []
    assert second_id not in r.relay.sessions  # closed by idle at 900 s
    last_closed = r.relay.last_activity["build42"]
    assert last_closed == pytest.approx(900, abs=1)
    await trio.sleep_until(last_closed + 899)
    assert audit_events.all("on_idle.ran") == []

    clock.real_time()
    clock.jump(2)
    ran = await audit_events.wait_for("on_idle.ran")

    assert ran["trigger"] == "idle" and ran["returncode"] == 3
    assert ran["output"] == "cleaning up b42\na warning\n" and ran["output_truncated"] is False
    assert ran["argv"] == [SH, "-c", script, "sh", "b42"]
    (record,) = r.audit_records("on_idle.ran")
    assert (record["returncode"], record["output"]) == (3, "cleaning up b42\na warning\n")
    clock.autojump()
    await trio.sleep(3 * 3600)  # the idle spell goes on: on_idle does not run again
    assert len(audit_events.all("on_idle.ran")) == 1


async def test_on_idle_output_is_truncated_in_the_audit_record(
    autojump_clock, clock, relayed, token_for, nursery, audit_events
):
    script = "head -c 100000 /dev/zero | tr '\\0' x"
    r = relayed(idle_timeout="1m", probe_interval="0", on_idle=[SH, "-c", script])
    nursery.start_soon(run_watch, r.relay)
    tls, session_id = await r.connect(token_for(now=wall(), ttl=DAY))
    closed = await r.close(tls, session_id)
    await trio.sleep_until(closed + 59)

    clock.real_time()
    clock.jump(2)
    ran = await audit_events.wait_for("on_idle.ran")

    assert ran["returncode"] == 0
    assert ran["output"] == "x" * ON_IDLE_OUTPUT_LIMIT and ran["output_truncated"] is True


async def test_an_on_idle_command_that_hangs_is_killed_after_on_idle_timeout(
    autojump_clock, clock, relayed, token_for, nursery, audit_events, tmp_path
):
    pidfile = tmp_path / "on_idle.pid"
    r = relayed(
        idle_timeout="15m",
        probe_interval="0",
        on_idle_timeout="30s",
        on_idle=[SH, "-c", f"echo $$ > {pidfile}; exec sleep 1000"],
    )
    nursery.start_soon(run_watch, r.relay)
    tls, session_id = await r.connect(token_for(now=wall(), ttl=DAY))
    closed = await r.close(tls, session_id)
    await trio.sleep_until(closed + 899)
    clock.real_time()
    clock.jump(2)  # on_idle starts at closed + 901
    pid = int(await written_by_process(pidfile))

    clock.autojump()
    await trio.sleep_until(closed + 901 + 29)
    assert audit_events.all("on_idle.ran") == [] and not is_gone(pid)
    clock.real_time()
    clock.jump(2)
    ran = await audit_events.wait_for("on_idle.ran")

    assert ran["error"] == "timed out after 30s; killed"
    assert ran["signal"] == "SIGKILL"
    assert is_gone(pid)


async def test_a_forgotten_server_is_reported_once_and_triggers_on_idle(
    autojump_clock, clock, relayed, nursery, audit_events
):
    r = relayed(
        idle_timeout="15m",
        probe_interval="30s",
        on_idle=[SH, "-c", "echo stopping the forgotten server"],
    )
    started = trio.current_time()
    nursery.start_soon(run_watch, r.relay)
    # Never used since the relay started: the idle spell counts from then.
    await trio.sleep_until(started + 899)
    assert audit_events.all("server.forgotten") == []
    assert r.backend_connections == 30  # probes at 0, 30, ..., 870 s
    assert r.metric("dbgrelay_backend_up") == 1
    assert r.metric("dbgrelay_forgotten_servers") == 0

    clock.real_time()
    clock.jump(2)
    ran = await audit_events.wait_for("on_idle.ran")

    (forgotten,) = audit_events.all("server.forgotten")
    assert forgotten["backend"] == "tcp://127.0.0.1:9"
    # The 900 s probe runs once the clock has jumped to 901, plus the real
    # time the clock has run since (well under 0.5 s even on a loaded machine).
    assert forgotten["idle_seconds"] == pytest.approx(901, abs=0.5)
    assert ran["trigger"] == "forgotten" and ran["output"] == "stopping the forgotten server\n"
    assert r.metric("dbgrelay_forgotten_servers") == 1
    assert len(r.audit_records("server.forgotten")) == 1
    clock.autojump()
    probes = r.backend_connections
    await trio.sleep(10 * 30)
    assert r.backend_connections == probes + 10  # still probing...
    assert len(audit_events.all("server.forgotten")) == 1  # ...but reported once
    assert len(audit_events.all("on_idle.ran")) == 1
    assert r.metric("dbgrelay_forgotten_servers") == 1


async def test_no_probe_connects_while_a_tunnel_is_open(
    autojump_clock, clock, relayed, token_for, nursery, audit_events
):
    r = relayed(idle_timeout="15m", probe_interval="30s")
    tls, session_id = await r.connect(token_for(now=wall(), ttl=DAY))
    nursery.start_soon(run_watch, r.relay)
    for _ in range(120):  # two hours, a byte a minute: never idle
        await tls.send_all(b".")
        assert await tls.receive_some(10) == b"."
        await trio.sleep(60)
    assert r.backend_connections == 1  # the tunnel's own
    assert audit_events.all("server.forgotten") == []
    assert r.metric("dbgrelay_backend_up") == 1

    closed = await r.close(tls, session_id)
    await trio.sleep_until(closed + 899)
    assert audit_events.all("server.forgotten") == []
    assert r.backend_connections > 1  # probing resumed
    await trio.sleep_until(closed + 900 + 30)
    (forgotten,) = audit_events.all("server.forgotten")
    assert 900 <= forgotten["idle_seconds"] <= 930


async def test_a_forgotten_server_is_reported_again_after_it_went_away_and_came_back(
    autojump_clock, clock, relayed, nursery, audit_events
):
    r = relayed(idle_timeout="15m", probe_interval="30s")
    nursery.start_soon(run_watch, r.relay)
    await trio.sleep(901)
    assert len(audit_events.all("server.forgotten")) == 1

    r.backend_down = True
    await trio.sleep(31)
    assert r.metric("dbgrelay_backend_up") == 0
    assert r.metric("dbgrelay_forgotten_servers") == 0
    r.backend_down = False
    await trio.sleep(31)

    assert len(audit_events.all("server.forgotten")) == 2
    assert r.metric("dbgrelay_forgotten_servers") == 1


async def test_opening_a_tunnel_clears_the_forgotten_mark(
    autojump_clock, clock, relayed, token_for, nursery, audit_events
):
    r = relayed(idle_timeout="15m", probe_interval="30s")
    nursery.start_soon(run_watch, r.relay)
    await trio.sleep(901)
    assert r.metric("dbgrelay_forgotten_servers") == 1

    tls, session_id = await r.connect(token_for(now=wall(), ttl=DAY))
    await trio.sleep(31)

    assert r.metric("dbgrelay_forgotten_servers") == 0
    await r.close(tls, session_id)
