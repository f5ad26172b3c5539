"""The connect path: cached token checks, pre-made audit files, backend connects."""

from __future__ import annotations

import json
import time
from functools import partial

import pytest
import trio
import trio.testing

from auth import peek_unverified
from relay import connector
from relay.audit import AuditWriteError
from relay.connector import RelayRefused, open_tunnel
from relay.preamble import NEED_DATA, ResponseParser, render_request

from .conftest import start_echo, start_relay
from .test_relay import gdb_target, raw_request

pytestmark = pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])


async def test_a_revoked_token_is_refused_at_once_though_its_check_was_cached(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    token = token_for()
    for _ in range(2):
        tls, _, _ = await open_tunnel(running.settings(token))
        await tls.aclose()
    assert running.relay.token_cache.hits == 1
    running.relay.store.revoke(peek_unverified(token)["jti"], now=time.time())
    running.relay.refresh_revocations()
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token))
    assert (info.value.status, info.value.reason) == (401, "revoked")
    assert backend.connections == 2
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()


class Recorded(trio.abc.HalfCloseableStream):
    """A backend stream that notes, for each send, whether the start record was on disk."""

    def __init__(self, inner: trio.SocketStream, synced: list[bool], sends: list[bool]) -> None:
        self.inner, self.synced, self.sends = inner, synced, sends

    async def send_all(self, data) -> None:
        self.sends.append(bool(self.synced))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def hold_start_record(relay, release: trio.Event, synced: list[bool], *, fail: bool = False):
    """Make the first sync of each session file wait for ``release`` (and maybe fail)."""
    real = relay.sync_audit
    seen: set = set()

    async def sync_audit(writer) -> None:
        if writer.kind == "session" and writer.path not in seen:
            seen.add(writer.path)
            await release.wait()
            if fail:
                raise AuditWriteError(f"audit file {writer.path}: fsync failed: EIO")
            await real(writer)
            synced.append(True)
            return
        await real(writer)

    relay.sync_audit = sync_audit


def record_backend_sends(relay, synced: list[bool], sends: list[bool]) -> None:
    real = relay.open_backend

    async def open_backend(backend, *, connect_timeout):
        return Recorded(await real(backend, connect_timeout=connect_timeout), synced, sends)

    relay.open_backend = open_backend


async def wait_pool_full(relay) -> None:
    with trio.fail_after(10):
        while len(relay.audit_pool) < relay.audit_pool.size:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)


async def test_no_byte_reaches_the_backend_before_the_start_record_is_on_disk(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    relay = running.relay
    await wait_pool_full(relay)
    made_ahead = {p.stem for p in config.relay.audit_dir.glob("*/*.jsonl")}
    release, synced, sends = trio.Event(), [], []
    hold_start_record(relay, release, synced)
    record_backend_sends(relay, synced, sends)

    # The request and the debugger's first bytes in one write, before any answer.
    data = render_request(method="CONNECT", target="build42", token=token_for()) + b"early"
    answer: list = []

    async def client() -> None:
        answer.append(await raw_request(running.port, running.ca, data))

    nursery.start_soon(client)
    with trio.fail_after(10):
        while backend.connections == 0:  # noqa: ASYNC110 - the echo server has no event
            await trio.sleep(0.01)
    # The backend connect overlapped the sync; the sync is still held.
    await trio.testing.wait_all_tasks_blocked()
    assert synced == [] and sends == [] and backend.received == b""
    (session,) = relay.sessions.values()
    assert session.opening and session.id in made_ahead  # the file was made ahead

    release.set()
    with trio.fail_after(10):
        while not answer or backend.received != b"early":  # noqa: ASYNC110
            await trio.sleep(0.01)
    event, tls = answer[0]
    assert event.status == 200
    assert sends and all(sends)  # every byte went after the sync
    assert await tls.receive_some(10) == b"early"  # echoed
    await tls.aclose()
    with trio.fail_after(5):
        await relay.wait_no_sessions()
    (path,) = config.relay.audit_dir.glob(f"*/{session.id}.jsonl")
    events = [json.loads(line).get("event") for line in path.read_text().splitlines()[1:]]
    assert events[0] == "session.opened" and events[-1] == "session.closed"
    running.stop.set()


async def test_a_start_record_that_cannot_be_synced_gets_503_and_reaches_no_backend(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    release, synced, sends = trio.Event(), [], []
    release.set()
    hold_start_record(running.relay, release, synced, fail=True)
    record_backend_sends(running.relay, synced, sends)
    data = render_request(method="CONNECT", target="build42", token=token_for()) + b"early"
    event, tls = await raw_request(running.port, running.ca, data)
    assert (event.status, event.reason) == (503, "audit_unavailable")
    assert await tls.receive_some(100) == b""
    assert sends == [] and backend.received == b""
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()


async def test_unused_files_made_ahead_are_removed_when_the_relay_stops(nursery, make_config, pki):
    config = make_config([gdb_target("build42", 9)])
    running = await start_relay(nursery, config, pki)
    await wait_pool_full(running.relay)
    assert len(list(config.relay.audit_dir.glob("*/*.jsonl"))) == running.relay.audit_pool.size
    running.stop.set()
    with trio.fail_after(10):
        while running.relay.audit_pool:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert list(config.relay.audit_dir.glob("*/*.jsonl")) == []


# -- TLS session resumption ----------------------------------------------------


async def test_a_second_tunnel_resumes_the_tls_session(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    settings = running.settings(token_for())
    ids = []
    kept = []
    for _ in range(3):
        tls, session_id, _ = await open_tunnel(settings)
        ids.append((session_id, tls.tls_info().resumed))
        ((_, session),) = settings.tls_sessions.values()
        kept.append(session)
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()
    assert [resumed for _, resumed in ids] == [False, True, True]
    # The session of the full handshake serves every tunnel that resumes it.
    assert kept[0] is kept[1] is kept[2]
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    # The relay audits which tunnels resumed.
    for session_id, resumed in ids:
        (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
        opened = json.loads(path.read_text().splitlines()[1])
        assert opened["event"] == "session.opened" and opened["tls_resumed"] is resumed
    running.stop.set()


async def test_a_resumed_session_still_needs_a_valid_token(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    settings = running.settings(token_for())
    tls, _, _ = await open_tunnel(settings)
    await tls.aclose()
    ((_, session),) = settings.tls_sessions.values()

    engine = settings.engine
    for token, status, reason in [
        (token_for(audience="someone-else"), 401, "bad_audience"),
        (token_for(targets=["other"]), 403, "not_granted"),
    ]:
        raw = await trio.open_tcp_stream("127.0.0.1", running.port)
        tls = engine.wrap(raw, "127.0.0.1", session=session)
        await tls.do_handshake()
        assert tls.tls_info().resumed
        await tls.send_all(render_request(method="CONNECT", target="build42", token=token))
        parser = ResponseParser()
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await tls.receive_some(4096))
        assert (event.status, event.reason) == (status, reason)
        assert await tls.receive_some(100) == b""
        await tls.aclose()
    assert backend.connections == 1
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()


async def test_a_new_ticket_key_ends_resumption_of_earlier_tickets(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    settings = running.settings(token_for())
    resumed = []
    kept = []
    for rotate in (False, False, True, False):
        if rotate:
            running.relay.new_ticket_key()
        tls, _, _ = await open_tunnel(settings)
        resumed.append(tls.tls_info().resumed)
        ((_, session),) = settings.tls_sessions.values()
        kept.append(session)
        await tls.aclose()
    assert resumed == [False, True, False, True]
    # After the full handshake the connector keeps the new key's session.
    assert kept[0] is kept[1] and kept[2] is not kept[1] and kept[3] is kept[2]
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()


async def test_the_ticket_key_is_rotated_every_interval(autojump_clock, make_config, pki, nursery):
    from relay.server import open_relay

    relay = open_relay(make_config([gdb_target("build42", 9)], tls={"ticket_key_interval": "10m"}))
    first = relay.tls.current
    nursery.start_soon(relay.run_ticket_keys)
    await trio.sleep(599)
    assert relay.tls.current is first
    await trio.sleep(2)
    second = relay.tls.current
    assert second is not first
    await trio.sleep(600)
    assert relay.tls.current is not second
    relay.close()


async def test_without_a_ticket_interval_no_session_resumes(
    nursery, make_config, token_for, pki, engine
):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)], tls={"ticket_key_interval": 0})
    running = await start_relay(nursery, config, pki)
    settings = running.settings(token_for())
    for _ in range(2):
        tls, _, _ = await open_tunnel(settings)
        assert not tls.tls_info().resumed
        await tls.aclose()
    if engine == "stdlib":
        # The stdlib engine tells a ticketless session apart: the connector
        # remembers there is none rather than asking after every tunnel.
        ((_, session),) = settings.tls_sessions.values()
        assert session is None
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()


# -- the debugger's first bytes go with the request ----------------------------


async def test_the_first_bytes_go_with_the_request_before_the_answer(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    release, synced, sends = trio.Event(), [], []
    hold_start_record(running.relay, release, synced)
    record_backend_sends(running.relay, synced, sends)
    asked: list[bytes] = []

    def early() -> bytes:
        asked.append(b"first")
        return b"first"

    opened: list = []

    async def connect() -> None:
        opened.append(await open_tunnel(running.settings(token_for()), early=early))

    nursery.start_soon(connect)
    with trio.fail_after(10):
        while not running.relay.sessions:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)
    # The token passed and the relay holds the start record's sync: no answer
    # yet, and the bytes were already sent; nothing reached the backend.
    await trio.testing.wait_all_tasks_blocked()
    assert asked == [b"first"] and opened == []
    assert sends == [] and backend.received == b""
    release.set()
    with trio.fail_after(10):
        while not opened or backend.received != b"first":  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert all(sends)
    tls, _, first = opened[0]
    echoed = first
    while len(echoed) < 5:
        echoed += await tls.receive_some(10)
    assert echoed == b"first"
    await tls.aclose()
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()


async def test_first_bytes_sent_with_a_refused_request_are_dropped(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    token = token_for()
    running.relay.store.revoke(peek_unverified(token)["jti"], now=time.time())
    running.relay.refresh_revocations()
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token), early=lambda: b"first")
    assert (info.value.status, info.value.reason) == (401, "revoked")
    assert backend.connections == 0 and backend.received == b""
    running.stop.set()


@pytest.mark.parametrize("accepted", [True, False])
async def test_the_connector_sends_what_the_debugger_already_wrote(
    nursery, make_config, token_for, pki, accepted
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    token = token_for()
    if not accepted:
        running.relay.store.revoke(peek_unverified(token)["jti"], now=time.time())
        running.relay.refresh_revocations()
    settings = running.settings(token)
    taken: list[bytes] = []
    real = connector.try_receive

    def spy(stream, max_bytes):
        taken.append(data := real(stream, max_bytes))
        return data

    connector.try_receive = spy
    try:
        refused: list = []
        (listener,) = await nursery.start(
            partial(connector.serve_connector, settings, on_refused=refused.append)
        )
        debugger = await trio.open_tcp_stream(*listener.socket.getsockname()[:2])
        await debugger.send_all(b"$qSupported#37")
        if accepted:
            got = b""
            while len(got) < 14:
                got += await debugger.receive_some(100)
            assert got == b"$qSupported#37"
            assert backend.received == b"$qSupported#37"
        else:
            assert await debugger.receive_some(100) == b""  # the connector hung up
            (exc,) = refused
            assert exc.reason == "revoked"
            assert backend.connections == 0 and backend.received == b""
        # Sent before the answer whenever it had arrived before the handshake ended.
        assert len(taken) == 1
        await debugger.aclose()
    finally:
        connector.try_receive = real
    running.stop.set()
