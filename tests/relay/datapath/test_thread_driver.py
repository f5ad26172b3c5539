"""The data-plane thread and its hand-off, on loopback sockets with real TLS.

The thread reads its own clock, never trio's: these tests give it one they
move by hand (:class:`FakeClock`), so idle and close deadlines are tested
without waiting for them, and nothing here runs under the autojump clock
(bytes in a kernel buffer must never race a clock jump).
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import trio

from relay.datapath.pump import PumpResult, Traffic
from relay.datapath.thread_driver import DataPlane

from ..test_pump import (
    echo,
    receive_exactly,
    receive_until_eof,
    round_trips,
    socket_pair,
    talk,
    tls_pair,
)

pytestmark = pytest.mark.skipif(not DataPlane.available(), reason="the data plane needs epoll")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def plane(clock: FakeClock):
    plane = DataPlane(clock=clock)
    yield plane
    plane.close()


class Handed:
    """A tunnel handed to the plane: TLS from ``user``, plaintext to ``server``."""

    def __init__(self, user, client, backend, server) -> None:
        self.user, self.client, self.backend, self.server = user, client, backend, server
        self.traffic = Traffic()
        self.idle = trio.CancelScope()
        self.outer = trio.CancelScope()
        self.result: PumpResult | None = None
        self.done = trio.Event()

    async def run(self, plane: DataPlane, **kw) -> None:
        try:
            with self.outer, self.idle:
                self.result = await plane.run_pump(
                    self.client, self.backend, self.traffic, activity=self.idle, **kw
                )
        finally:
            self.done.set()


async def handed(engines, plane, nursery, *, plain: bool = False, **kw) -> Handed:
    if plain:
        user, client = await socket_pair()
    else:
        user, client = await tls_pair(engines, await socket_pair())
    backend, server = await socket_pair()
    tunnel = Handed(user, client, backend, server)
    nursery.start_soon(lambda: tunnel.run(plane, **kw))
    return tunnel


async def test_bytes_move_both_ways_and_the_tunnel_comes_back_closable(engines, plane, nursery):
    t = await handed(engines, plane, nursery, idle_timeout=300)
    nursery.start_soon(echo, t.server)
    with trio.fail_after(10):
        await round_trips(t, (1, 64, 1000, 70000, 300000))
    assert t.result == PumpResult("client_closed")
    assert t.traffic.to_backend == t.traffic.to_client == 371065
    await t.client.aclose()
    await t.backend.aclose()


async def test_the_backend_closing_ends_the_tunnel_after_its_last_bytes(engines, plane, nursery):
    t = await handed(engines, plane, nursery)
    with trio.fail_after(10):
        await t.server.send_all(b"last words")
        await t.server.aclose()
        await t.done.wait()
        # Back in trio: the session closes the TLS stream with close_notify.
        await t.client.aclose()
        assert await receive_until_eof(t.user) == b"last words"
    assert t.result == PumpResult("backend_closed")


async def test_half_close_then_the_close_timeout_on_the_planes_clock(
    engines, plane, clock, nursery
):
    t = await handed(engines, plane, nursery, plain=True, close_timeout=5)
    with trio.fail_after(10):
        await t.user.send_all(b"detach")
        await t.user.send_eof()
        assert await receive_until_eof(t.server) == b"detach"
        await t.server.send_all(b"OK")
        assert await receive_exactly(t.user, 2) == b"OK"
        assert not t.done.is_set()
        clock.now += 5
        plane.poke()
        await t.done.wait()
    assert t.result == PumpResult("client_closed")
    assert (t.traffic.to_backend, t.traffic.to_client) == (6, 2)


async def test_an_idle_tunnel_comes_back_with_its_activity_scope_cancelled(
    engines, plane, clock, nursery
):
    t = await handed(engines, plane, nursery, idle_timeout=300)
    nursery.start_soon(echo, t.server)
    with trio.fail_after(10):
        await t.user.send_all(b"x")
        assert await receive_exactly(t.user, 1) == b"x"
        clock.now += 299
        plane.poke()
        await t.user.send_all(b"y")  # traffic moves the deadline
        assert await receive_exactly(t.user, 1) == b"y"
        clock.now += 299
        plane.poke()
        assert not t.done.is_set()
        clock.now += 2
        plane.poke()
        await t.done.wait()
    assert t.idle.cancelled_caught and t.result is None
    assert t.traffic.to_backend == t.traffic.to_client == 2
    # The streams are trio's again and close cleanly.
    await t.client.aclose()
    assert await t.user.receive_some() == b""


async def test_a_tunnel_ended_from_trio_mid_transfer_is_taken_back(engines, plane, nursery):
    t = await handed(engines, plane, nursery)

    async def flood() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while True:
                await t.server.send_all(b"v" * 65536)

    nursery.start_soon(flood)
    with trio.fail_after(10):
        got = await t.user.receive_some(65536)
        assert got
        # As revocation, the maximum session or an admin end do: cancel.
        t.outer.cancel()
        await t.done.wait()
        assert t.outer.cancelled_caught and t.result is None
        # Everything the plane sent arrives, then close_notify: a clean end.
        rest = bytearray()

        async def drain() -> None:
            rest.extend(await receive_until_eof(t.user))

        async with trio.open_nursery() as closing:
            closing.start_soon(drain)
            await t.client.aclose()
            await t.backend.aclose()
        received = len(got) + len(rest)
    # Counted: the chunks written whole while the plane held the tunnel; the
    # rest of a chunk it was writing when taken back goes out with the close.
    assert 0 < t.traffic.to_client <= received <= t.traffic.to_client + 65536


async def test_a_tunnel_with_a_tap_stays_on_the_trio_driver(engines, plane, nursery):
    taps: list[tuple[str, bytes]] = []
    t = await handed(
        engines, plane, nursery, tap=lambda direction, data: taps.append((direction, data))
    )
    nursery.start_soon(echo, t.server)
    with trio.fail_after(10):
        await t.user.send_all(b"recorded")
        assert await receive_exactly(t.user, 8) == b"recorded"
        await t.user.aclose()
        await t.done.wait()
    assert taps == [("c2b", b"recorded"), ("b2c", b"recorded")]
    assert t.result == PumpResult("client_closed")


async def test_many_tunnels_share_the_thread(engines, plane, nursery):
    tunnels = [await handed(engines, plane, nursery) for _ in range(20)]
    for t in tunnels:
        nursery.start_soon(echo, t.server)

    with trio.fail_after(30):
        async with trio.open_nursery() as talking:
            for seed, t in enumerate(tunnels):
                talking.start_soon(talk, t.user, seed, 30)
        for t in tunnels:
            await t.done.wait()
    for t in tunnels:
        assert t.result == PumpResult("client_closed")
        assert t.traffic.to_backend == t.traffic.to_client > 0


async def test_short_writes_both_ways_wait_for_writable_sockets(engines, plane, nursery):
    t = await handed(engines, plane, nursery, plain=True)
    # Small send buffers on the plane's sockets: with slow readers, most of
    # its writes are short, and it must wait for each socket to drain.
    for stream in (t.client, t.backend):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    up, down = os.urandom(1 << 21), os.urandom(1 << 21)
    got: dict[str, bytes] = {}

    async def read(name: str, stream: trio.SocketStream, size: int) -> None:
        buf = bytearray()
        while len(buf) < size:
            buf += await stream.receive_some(1000)  # a slow reader
        got[name] = bytes(buf)

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            inner.start_soon(t.user.send_all, up)
            inner.start_soon(t.server.send_all, down)
            inner.start_soon(read, "server", t.server, len(up))
            inner.start_soon(read, "user", t.user, len(down))
        await t.user.send_eof()
        await t.server.aclose()
        await t.done.wait()
    assert got == {"server": up, "user": down}
    assert (t.traffic.to_backend, t.traffic.to_client) == (len(up), len(down))
