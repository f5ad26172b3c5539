"""Unauthenticated load against a real relay on loopback: floods, idle sockets, PROXY v2.

The relay runs in-process on trio's mock clock in real-time mode (sockets and
TLS do real work, so ``fail_after`` is a real bound).  Rates in these tests
are set so low (one token per 1,000 s) that nothing refills while the test
runs, however slow the machine; refilling is then shown by jumping the clock
with ``MockClock.jump``, never by sleeping.  Attackers are real sockets, some
bound to 127.0.0.2 or 127.0.0.3 to act as other sources (all of 127/8 is
local on Linux).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import socket
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from relay.connector import RelayRefused, open_tunnel
from relay.errors import RemoteProtocolError
from relay.preamble import NEED_DATA, ResponseParser, TunnelResponse, render_request
from relay.proxy_protocol import SIGNATURE
from relay.tls import make_client_engine

from .conftest import start_echo, start_relay

SLOW = 0.001  # tokens per second: nothing refills during a test


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """The mock clock, following real time; tests jump it to show refills."""
    autojump_clock.autojump_threshold = math.inf
    autojump_clock.rate = 1.0
    return autojump_clock


def target(port: int) -> dict:
    return {
        "name": "build42",
        "kind": "gdbserver",
        "backend": f"tcp://127.0.0.1:{port}",
        "probe_interval": "0",
    }


def sample(metrics, name: str, **labels) -> float:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def relay_audit(config) -> list[dict]:
    records = []
    for path in sorted(Path(config.relay.audit_dir).glob("relay-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


async def connect_from(source: str, port: int, prefix: bytes = b"") -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    if prefix:
        await stream.send_all(prefix)
    return stream


async def attempt(
    port: int, ca: Path, token: str, *, source: str = "127.0.0.1", prefix: bytes = b""
) -> tuple[TunnelResponse | None, trio.abc.Stream]:
    """TLS, then a CONNECT; the answer, or ``None`` if the relay closed first."""
    raw = await connect_from(source, port, prefix)
    tls = make_client_engine(engine="stdlib", ca=ca).wrap(raw, "127.0.0.1")
    try:
        with trio.fail_after(20):
            await tls.do_handshake()
            await tls.send_all(render_request(method="CONNECT", target="build42", token=token))
            parser = ResponseParser()
            while (event := parser.next_event()) is NEED_DATA:
                parser.receive_data(await tls.receive_some(4096))
    except (trio.BrokenResourceError, RemoteProtocolError):
        await trio.aclose_forcefully(tls)
        return None, tls
    return event, tls


async def check_echo(tls: trio.abc.Stream) -> None:
    with trio.fail_after(20):
        await tls.send_all(b"ping")
        got = b""
        while len(got) < 4:
            got += await tls.receive_some(4096)
    assert got == b"ping"
    await tls.aclose()


# -- failed authentication -----------------------------------------------------------


async def test_a_thousand_bad_tokens_from_one_source_get_429_once_the_budget_is_spent(
    nursery, clock, make_config, token_for, pki, caplog
):
    caplog.set_level(logging.INFO)
    backend = await start_echo(nursery)
    config = make_config(
        [target(backend.port)],
        limits={
            "handshake_burst": 5000,
            "handshake_rate": SLOW,
            "auth_failure_burst": 20,
            "auth_failure_rate": SLOW,
        },
    )
    running = await start_relay(nursery, config, pki)
    bad = token_for(audience="someone-else")  # signed, but 401 bad_audience

    statuses: collections.Counter[int] = collections.Counter()
    retry_after: set[int] = set()
    for _ in range(1000):
        event, tls = await attempt(running.port, running.ca, bad)
        assert event is not None, "a failure over budget is answered, not cut off"
        statuses[event.status] += 1
        if event.status == 429:
            assert event.reason == "auth_rate"
            retry_after.add(int(event.headers["retry-after"]))
        await trio.aclose_forcefully(tls)
    assert statuses == {401: 20, 429: 980}
    assert retry_after and all(1 <= r <= 1000 for r in retry_after)
    assert sample(running.metrics, "dbgrelay_refusals_total", reason="auth_rate") == 980

    # Behind the same address, a valid token is still let in (an office NAT).
    event, tls = await attempt(running.port, running.ca, token_for())
    assert event is not None and event.status == 200
    await check_echo(tls)

    # The audit trail and the log hold the 20 failures and a few summaries,
    # not a record per attempt.
    records = relay_audit(config)
    assert sum(r.get("event") == "token.rejected" for r in records) == 20
    summaries = [r for r in records if r.get("event") == "connection.refused"]
    assert 1 <= len(summaries) <= 10
    # Each summary counts the refusals left out since the one before.
    assert sum(r.get("suppressed", 0) for r in summaries) + len(summaries) <= 980
    logged = [r.getMessage() for r in caplog.records]
    assert logged.count("token.rejected") <= 2 * 20  # relay log + audit logger
    assert logged.count("connection.refused") <= 2 * len(summaries)

    # Once Retry-After has passed, the source has one failure to spend again.
    clock.jump(max(retry_after))
    statuses.clear()
    for _ in range(2):
        event, tls = await attempt(running.port, running.ca, bad)
        statuses[event.status] += 1
        await trio.aclose_forcefully(tls)
    assert statuses == {401: 1, 429: 1}


async def test_the_failure_budget_is_per_source(nursery, clock, make_config, token_for, pki):
    backend = await start_echo(nursery)
    limits = {"auth_failure_burst": 2, "auth_failure_rate": SLOW}
    running = await start_relay(nursery, make_config([target(backend.port)], limits=limits), pki)
    bad = token_for(audience="someone-else")
    seen = []
    for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
        event, tls = await attempt(running.port, running.ca, bad, source=source)
        seen.append(event.status)
        await trio.aclose_forcefully(tls)
    assert seen == [401, 401, 429, 401]


async def test_handshake_rate_closes_before_tls(nursery, clock, make_config, token_for, pki):
    backend = await start_echo(nursery)
    limits = {"handshake_burst": 3, "handshake_rate": SLOW}
    running = await start_relay(nursery, make_config([target(backend.port)], limits=limits), pki)
    results = []
    for _ in range(5):
        event, tls = await attempt(running.port, running.ca, token_for())
        results.append(None if event is None else event.status)
        await trio.aclose_forcefully(tls)
    assert results == [200, 200, 200, None, None]
    assert sample(running.metrics, "dbgrelay_refusals_total", reason="handshake_rate") == 2
    event, tls = await attempt(running.port, running.ca, token_for(), source="127.0.0.2")
    assert event.status == 200
    await trio.aclose_forcefully(tls)
    clock.jump(1 / SLOW)
    event, tls = await attempt(running.port, running.ca, token_for())
    assert event.status == 200
    await trio.aclose_forcefully(tls)


# -- idle unauthenticated sockets ---------------------------------------------------------


def idle_socket(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


async def wait_closed(s: socket.socket) -> None:
    with trio.fail_after(20):
        await trio.lowlevel.wait_readable(s)
    try:
        assert s.recv(1, socket.MSG_DONTWAIT) == b""
    except ConnectionResetError:
        pass


def still_open(s: socket.socket) -> bool:
    try:
        s.recv(1, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


async def test_idle_sockets_over_the_per_source_cap_are_closed_and_others_still_connect(
    nursery, clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config(
        [target(backend.port)],
        handshake_timeout="1h",  # the idle ones would otherwise time out on their own
        limits={"max_unauthenticated_per_source": 8, "max_unauthenticated": 64},
    )
    running = await start_relay(nursery, config, pki)
    flood = [idle_socket("127.0.0.1", running.port) for _ in range(20)]
    try:
        for s in flood[8:]:
            await wait_closed(s)
        # A developer elsewhere still gets a tunnel at once.
        event, tls = await attempt(running.port, running.ca, token_for(), source="127.0.0.2")
        assert event is not None and event.status == 200
        await check_echo(tls)
        # From the flooding address, nothing more gets in, not even to TLS.
        event, _ = await attempt(running.port, running.ca, token_for(), source="127.0.0.1")
        assert event is None
        assert all(still_open(s) for s in flood[:8])
        assert (
            sample(running.metrics, "dbgrelay_refusals_total", reason="unauthenticated_per_source")
            == 13
        )
        assert sample(running.metrics, "dbgrelay_unauthenticated_connections") == 8
    finally:
        for s in flood:
            s.close()


async def test_the_total_cap_counts_every_source(nursery, clock, make_config, token_for, pki):
    backend = await start_echo(nursery)
    config = make_config(
        [target(backend.port)],
        handshake_timeout="1h",
        limits={"max_unauthenticated_per_source": 4, "max_unauthenticated": 6},
    )
    running = await start_relay(nursery, config, pki)
    flood = [idle_socket("127.0.0.1", running.port) for _ in range(4)]
    flood += [idle_socket("127.0.0.2", running.port) for _ in range(2)]
    try:
        late = idle_socket("127.0.0.3", running.port)
        flood.append(late)
        await wait_closed(late)
        assert sample(running.metrics, "dbgrelay_refusals_total", reason="unauthenticated_total")
        assert all(still_open(s) for s in flood[:6])
        # Once the idle ones go, room comes back.
        for s in flood[:6]:
            s.close()
        with trio.fail_after(20):
            while sample(running.metrics, "dbgrelay_unauthenticated_connections") != 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        event, tls = await attempt(running.port, running.ca, token_for(), source="127.0.0.3")
        assert event.status == 200
        await trio.aclose_forcefully(tls)
    finally:
        for s in flood:
            s.close()


# -- per-user cap -------------------------------------------------------------------------


async def test_one_token_cannot_exceed_the_per_user_cap(
    nursery, clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config([target(backend.port)], limits={"max_sessions_per_user": 2})
    running = await start_relay(nursery, config, pki)
    alice = token_for("alice")
    tunnels = [(await open_tunnel(running.settings(alice)))[0] for _ in range(2)]
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(alice))
    assert (info.value.status, info.value.reason) == (429, "user_sessions")
    assert "too many tunnels open" in info.value.message
    assert sample(running.metrics, "dbgrelay_refusals_total", reason="user_sessions") == 1
    # Others are not affected.
    bob, _, _ = await open_tunnel(running.settings(token_for("bob")))
    await bob.aclose()
    # Closing one of alice's tunnels makes room for her again.
    await tunnels.pop().aclose()
    with trio.fail_after(20):
        while sum(s.user == "alice" for s in running.relay.sessions.values()) > 1:  # noqa: ASYNC110
            await trio.sleep(0.01)
    again, _, _ = await open_tunnel(running.settings(alice))
    await again.aclose()
    for tls in tunnels:
        await tls.aclose()


# -- PROXY protocol v2 --------------------------------------------------------------------


def proxy_v4(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 7443) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body


LOCAL = SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


async def test_proxy_v2_gives_limits_and_audit_the_real_client(
    nursery, clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config(
        [target(backend.port)],
        proxy_protocol=True,
        proxy_trusted=["127.0.0.1/32"],
        limits={"auth_failure_burst": 2, "auth_failure_rate": SLOW},
    )
    running = await start_relay(nursery, config, pki)

    # A tunnel through the balancer is audited with the client's address.
    prefix = proxy_v4("198.51.100.7", 4242)
    event, tls = await attempt(running.port, running.ca, token_for(), prefix=prefix)
    assert event.status == 200
    await check_echo(tls)
    opened = [r for r in relay_audit(config) if r.get("event") == "token.accepted"]
    assert opened[-1]["client"] == "198.51.100.7:4242"

    # Limits count per client behind the balancer, not per balancer.
    bad = token_for(audience="someone-else")
    seen = []
    for client in ("198.51.100.7", "198.51.100.7", "198.51.100.7", "203.0.113.1"):
        event, tls = await attempt(running.port, running.ca, bad, prefix=proxy_v4(client, 1))
        seen.append(event.status)
        await trio.aclose_forcefully(tls)
    assert seen == [401, 401, 429, 401]

    # The balancer's own health check (LOCAL) is served as the balancer.
    event, tls = await attempt(running.port, running.ca, token_for(), prefix=LOCAL)
    assert event.status == 200
    await trio.aclose_forcefully(tls)


async def test_proxy_v2_from_an_untrusted_address_or_without_a_header_is_refused(
    nursery, clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config(
        [target(backend.port)], proxy_protocol=True, proxy_trusted=["127.0.0.1/32"]
    )
    running = await start_relay(nursery, config, pki)
    forged = proxy_v4("10.9.9.9", 1)
    event, _ = await attempt(
        running.port, running.ca, token_for(), source="127.0.0.2", prefix=forged
    )
    assert event is None
    assert sample(running.metrics, "dbgrelay_refusals_total", reason="proxy_untrusted") == 1
    # A trusted address that skips the header: its ClientHello is not a header.
    event, _ = await attempt(running.port, running.ca, token_for())
    assert event is None
    assert sample(running.metrics, "dbgrelay_refusals_total", reason="proxy_invalid") == 1
    # v1 text is refused too.
    event, _ = await attempt(
        running.port, running.ca, token_for(), prefix=b"PROXY TCP4 10.1.1.1 10.1.1.2 1 2\r\n"
    )
    assert event is None
    assert sample(running.metrics, "dbgrelay_refusals_total", reason="proxy_invalid") == 2
    assert not [r for r in relay_audit(config) if r.get("event") == "token.accepted"]


async def test_concurrent_opens_with_one_token_stay_within_the_per_user_cap(
    nursery, clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config([target(backend.port)], limits={"max_sessions_per_user": 2})
    running = await start_relay(nursery, config, pki)
    alice = token_for("alice")
    opened: list[trio.abc.Stream] = []
    refused: list[int] = []

    async def one() -> None:
        try:
            tls, _, _ = await open_tunnel(running.settings(alice))
        except RelayRefused as exc:
            refused.append(exc.status)
        else:
            opened.append(tls)

    async with trio.open_nursery() as inner:
        for _ in range(12):
            inner.start_soon(one)
    assert len(opened) == 2 and refused == [429] * 10
    for tls in opened:
        await tls.aclose()


async def test_failed_handshakes_and_garbage_requests_stop_being_audited_one_by_one(
    nursery, clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    limits = {"auth_failure_burst": 3, "auth_failure_rate": SLOW}
    config = make_config([target(backend.port)], limits=limits)
    running = await start_relay(nursery, config, pki)
    # Not TLS at all: the handshake fails.
    for _ in range(10):
        stream = await connect_from("127.0.0.1", running.port, b"GET / HTTP/1.0\r\n\r\n")
        with trio.fail_after(20):
            while await stream.receive_some(4096):
                pass
        await stream.aclose()
    records = relay_audit(config)
    assert sum(r.get("event") == "handshake.failed" for r in records) == 3
    assert sample(running.metrics, "dbgrelay_handshakes_total", outcome="tls_error") == 10
    # TLS, then a malformed request: 429 instead of 400, and no record each.
    raw = await connect_from("127.0.0.1", running.port)
    tls = make_client_engine(engine="stdlib", ca=running.ca).wrap(raw, "127.0.0.1")
    with trio.fail_after(20):
        await tls.do_handshake()
        await tls.send_all(b"BREW /pot HTTP/1.1\r\n\r\n")
        parser = ResponseParser()
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await tls.receive_some(4096))
    assert (event.status, event.reason) == (429, "auth_rate")
    assert "retry-after" in event.headers
    await trio.aclose_forcefully(tls)
    assert not [r for r in relay_audit(config) if r.get("event") == "tunnel.refused"]
    # Another address is unaffected: its bad token still gets a plain 401.
    event, tls = await attempt(running.port, running.ca, "x", source="127.0.0.2")
    assert (event.status, event.reason) == (401, "malformed")
    await trio.aclose_forcefully(tls)
