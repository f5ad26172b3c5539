"""Session deadlines on trio's mock clock: production-sized timeouts in milliseconds.

The client and the backend are in-memory streams (real TLS on top of the
client's), so the autojump clock only jumps when every task waits on a
deadline, never while bytes sit in a kernel buffer.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import trio
import trio.testing

from relay.preamble import NEED_DATA, ResponseParser, render_request
from relay.server import Relay, open_relay
from relay.session import handle_connection
from relay.tls import make_client_engine

from .conftest import session_files

# The whole suite runs on both TLS engines.
pytestmark = pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])

T0 = 1_800_000_000.0  # the wall clock at mock time 0


def wall() -> float:
    return T0 + trio.current_time()


class Harness:
    """A relay whose client connections and backend are memory streams."""

    def __init__(self, relay: Relay, nursery: trio.Nursery, ca) -> None:
        self.relay = relay
        self.engine = relay.config.tls.engine
        self.nursery = nursery
        self.ca = ca
        self.backend_connections = 0
        relay.open_backend = self._open_backend
        # fsync on the event loop: the autojump clock would jump past our
        # deadlines while a worker thread fsyncs.
        relay.fsync_in_thread = False

    async def _open_backend(self, backend, *, connect_timeout: float):
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

    async def connect(self, token: str, target: str = "build42", *, send_request: bool = True):
        client_raw, server_raw = trio.testing.memory_stream_pair()
        self.nursery.start_soon(handle_connection, self.relay, server_raw)
        tls = make_client_engine(engine=self.engine, ca=self.ca).wrap(client_raw, "127.0.0.1")
        await tls.do_handshake()
        if not send_request:
            return tls, None
        await tls.send_all(render_request(method="CONNECT", target=target, token=token))
        parser = ResponseParser()
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await tls.receive_some(4096))
        return tls, event


@pytest.fixture
def harness(make_config, pki, nursery) -> Callable[..., Harness]:
    def make(**target) -> Harness:
        config = make_config(
            [
                {
                    "name": "build42",
                    "kind": "dbgsrv",
                    "backend": "tcp://127.0.0.1:9",
                    "probe_interval": "0",
                }
                | target
            ]
        )
        relay = open_relay(config, wall_clock=wall)
        return Harness(relay, nursery, pki / "ca.pem")

    return make


def closed_record(relay: Relay, session_id: str) -> dict:
    """The tunnel's one end record (and check there is exactly one start)."""
    (path,) = relay.config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(r.get("event") == "session.closed" for r in records) == 1
    assert sum(r.get("event") == "session.opened" for r in records) == 1
    return records[-1]


def closed_reason(relay: Relay, session_id: str) -> str:
    return closed_record(relay, session_id)["reason"]


async def wait_closed(tls) -> None:
    """Read until the relay closes the tunnel (when it ended is in the end record)."""
    with trio.fail_after(3600):
        while await tls.receive_some(65536):
            pass


async def test_idle_timeout_closes_a_quiet_tunnel(autojump_clock, harness, token_for):
    h = harness(idle_timeout="15m")
    tls, event = await h.connect(token_for(now=wall()))
    session_id = event.headers["dbgrelay-session"]
    await tls.send_all(b"x")
    assert await tls.receive_some(10) == b"x"
    await trio.sleep(899)
    assert session_id in h.relay.sessions  # still open one second before the deadline
    await tls.send_all(b"y")  # activity moves the deadline
    assert await tls.receive_some(10) == b"y"
    await trio.sleep(899)
    assert session_id in h.relay.sessions
    await wait_closed(tls)
    record = closed_record(h.relay, session_id)
    assert record["reason"] == "idle"
    assert record["duration"] == pytest.approx(899 + 900, abs=0.01)


async def test_max_session_ends_even_a_busy_tunnel(autojump_clock, harness, token_for):
    h = harness(idle_timeout="15m", max_session="1h")
    tls, event = await h.connect(token_for(now=wall(), ttl=8 * 3600))
    session_id = event.headers["dbgrelay-session"]
    with trio.fail_after(4000):
        try:
            while True:  # a byte every minute: never idle
                await tls.send_all(b".")
                if not await tls.receive_some(10):
                    break
                await trio.sleep(60)
        except trio.BrokenResourceError:
            pass
    record = closed_record(h.relay, session_id)
    assert record["reason"] == "max_session"
    assert record["duration"] == pytest.approx(3600, abs=0.01)


async def test_token_expiry_ends_the_tunnel(autojump_clock, harness, token_for):
    h = harness(idle_timeout="8h")
    tls, event = await h.connect(token_for(now=wall(), ttl=1800))
    session_id = event.headers["dbgrelay-session"]
    await trio.sleep(1799)
    assert session_id in h.relay.sessions
    await wait_closed(tls)
    record = closed_record(h.relay, session_id)
    assert record["reason"] == "token_expired"
    assert record["duration"] == pytest.approx(1800, abs=0.01)


async def test_token_expiry_can_be_waived_per_target(autojump_clock, harness, token_for):
    h = harness(idle_timeout="8h", end_on_token_expiry=False)
    tls, event = await h.connect(token_for(now=wall(), ttl=1800))
    await trio.sleep(3600)
    assert event.headers["dbgrelay-session"] in h.relay.sessions
    await tls.aclose()


async def test_revocation_ends_a_live_tunnel_within_seconds(
    autojump_clock, harness, token_for, nursery
):
    h = harness(idle_timeout="8h")
    nursery.start_soon(h.relay.run_housekeeping)
    token = token_for(now=wall())
    tls, event = await h.connect(token)
    session_id = event.headers["dbgrelay-session"]
    from auth import RevocationStore, peek_unverified

    # Revoke through a second connection to the store, as `dbgrelay token revoke` does.
    with RevocationStore(h.relay.config.relay.state_dir / "tokens.sqlite") as store:
        store.revoke(peek_unverified(token)["jti"], now=wall())
    revoked_at = trio.current_time()
    await wait_closed(tls)
    record = closed_record(h.relay, session_id)
    assert record["reason"] == "revoked"
    assert record["duration"] <= revoked_at + h.relay.config.relay.revocation_interval + 0.1


async def test_slow_preamble_gets_408(autojump_clock, harness):
    h = harness()
    tls, _ = await h.connect("", send_request=False)
    await tls.send_all(b"CONNECT build42 HTTP/1.1\r\n")  # and then nothing
    parser = ResponseParser()
    with trio.fail_after(60):
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await tls.receive_some(4096))
    assert (event.status, event.reason) == (408, "timeout")
    assert trio.current_time() == pytest.approx(10, abs=0.01)  # handshake_timeout
    assert h.backend_connections == 0


async def test_stalled_tls_handshake_is_dropped(autojump_clock, harness):
    h = harness()
    client_raw, server_raw = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await handle_connection(h.relay, server_raw)
        done.set()

    h.nursery.start_soon(serve)
    await client_raw.send_all(b"\x16\x03\x01")  # a ClientHello that never finishes
    with trio.fail_after(60):
        await done.wait()
    assert trio.current_time() == pytest.approx(10, abs=0.01)


async def test_token_expiring_before_the_tunnel_opens_gets_401_not_a_bare_close(
    autojump_clock, harness, token_for
):
    h = harness(idle_timeout="8h")

    async def never_answers(backend, *, connect_timeout: float):
        await trio.sleep_forever()

    h.relay.open_backend = never_answers
    tls, event = await h.connect(token_for(now=wall(), ttl=10))
    assert (event.status, event.reason) == (401, "expired")
    assert event.message == "the token has expired; ask an admin for a new one"
    assert trio.current_time() == pytest.approx(10, abs=0.01)
    (path,) = session_files(h.relay.config.relay.audit_dir)
    assert closed_reason(h.relay, path.stem) == "token_expired"


async def test_session_ended_by_an_admin_before_its_200_is_told_so(
    autojump_clock, harness, token_for, nursery
):
    h = harness(idle_timeout="8h")
    connecting = trio.Event()

    async def slow_backend(backend, *, connect_timeout: float):
        connecting.set()
        await trio.sleep_forever()

    h.relay.open_backend = slow_backend
    answer: list = []
    answered = trio.Event()

    async def client() -> None:
        answer.append(await h.connect(token_for(now=wall())))
        answered.set()

    nursery.start_soon(client)
    await connecting.wait()
    (session,) = h.relay.sessions.values()
    # The start record is synced while the backend connects; then the session is open.
    await trio.testing.wait_all_tasks_blocked()
    assert session.describe()["state"] == "open"
    session.end("ended_by_admin")
    await answered.wait()
    _, event = answer[0]
    assert (event.status, event.reason) == (503, "ended_by_admin")
    assert closed_reason(h.relay, session.id) == "ended_by_admin"
