"""Shutdown: listeners closed before the drain is announced, the grace, bounded cleanup."""

from __future__ import annotations

import logging
import socket

import trio

from relay.server import serve_relay

from .conftest import start_echo, start_relay
from .test_relay import gdb_target
from .test_session_time import closed_record, harness, wait_closed, wall

__all__ = ["harness"]  # the fixture, shared with test_session_time


class ConnectWhenLogged(logging.Handler):
    """Tries to connect to ``port`` at the very moment ``relay.draining`` is logged."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.outcome: str | None = None
        self.done = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() != "relay.draining":
            return
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5):
                self.outcome = "accepted"
        except ConnectionRefusedError:
            self.outcome = "refused"
        self.done.set()


async def test_relay_draining_is_logged_only_once_the_port_refuses_connections(
    nursery, make_config, pki, caplog
):
    caplog.set_level(logging.INFO)
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    handler = ConnectWhenLogged(running.port)
    logger = logging.getLogger("dbgrelay.relay")
    logger.addHandler(handler)
    try:
        running.stop.set()
        with trio.fail_after(10):
            await handler.done.wait()
    finally:
        logger.removeHandler(handler)
    # The kernel completes a connection to a socket that still listens, even
    # before accept(): "accepted" means the log line came before the close.
    assert handler.outcome == "refused"


async def start_serving(nursery: trio.Nursery, relay) -> trio.Event:
    """Run serve_relay; return an event set when it has returned."""
    stop, returned = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus) -> None:
        try:
            await serve_relay(relay, stop=stop, task_status=task_status)
        finally:
            returned.set()

    await nursery.start(run)
    relay.stop = stop  # type: ignore[attr-defined]
    return returned


async def test_live_tunnels_run_for_the_whole_grace_then_end_with_reason_shutdown(
    autojump_clock, harness, token_for, nursery, make_config
):
    h = harness(idle_timeout="8h")
    returned = await start_serving(nursery, h.relay)
    tls, event = await h.connect(token_for(now=wall(), ttl=8 * 3600))
    session_id = event.headers["dbgrelay-session"]
    grace = h.relay.config.relay.shutdown_grace
    t0 = trio.current_time()
    h.relay.stop.set()
    await trio.sleep(grace - 1)
    await tls.send_all(b"still here")
    assert await tls.receive_some(100) == b"still here"
    await wait_closed(tls)
    assert trio.current_time() - t0 == grace
    assert closed_record(h.relay, session_id)["reason"] == "shutdown"
    await returned.wait()


async def test_a_hung_disk_delays_shutdown_by_bounded_steps_only(
    autojump_clock, harness, token_for, nursery, caplog
):
    caplog.set_level(logging.INFO)
    h = harness(idle_timeout="8h")
    returned = await start_serving(nursery, h.relay)
    tls, event = await h.connect(token_for(now=wall(), ttl=8 * 3600))
    config = h.relay.config.relay

    async def fsync_never_returns(writer) -> None:
        await trio.sleep_forever()

    h.relay.sync_audit = fsync_never_returns  # type: ignore[method-assign]
    t0 = trio.current_time()
    h.relay.stop.set()
    await wait_closed(tls)
    # The end record's fsync got session_end_timeout, then the tunnel closed.
    assert trio.current_time() - t0 == config.shutdown_grace + config.session_end_timeout
    await returned.wait()
    # The relay file's last fsync got its own session_end_timeout.
    assert trio.current_time() - t0 <= config.shutdown_grace + 2 * config.session_end_timeout
    unwritable = [r for r in caplog.records if r.getMessage() == "audit.unwritable"]
    assert len(unwritable) == 2
    assert all("fsync did not finish within 10s" in r.error for r in unwritable)
    closed = [r for r in caplog.records if r.getMessage() == "session.closed"]
    assert [r.reason for r in closed] == ["shutdown"]
