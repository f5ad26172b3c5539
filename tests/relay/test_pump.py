"""The pump's trio driver, the one production runs, on memory streams and on sockets.

The first half drives it over trio's memory streams (real TLS on top of the
client's where it matters) under the autojump clock, so production timeouts
pass in milliseconds.  The second half drives it over loopback sockets with
real TLS, where it reads and writes the sockets without blocking, on the
real clock, or on a mock clock that only moves when the test jumps it (bytes
in a kernel buffer must never race an autojump).  The state machine itself
is tested byte by byte in ``tests/relay/datapath/test_pump.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import struct

import pytest
import trio
import trio.testing

from relay.pump import PumpResult, Traffic, run_pump

MIB = 1024 * 1024


# -- TLS material -----------------------------------------------------------------


async def tls_pair(engines, transport_pair) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A handshaken (client, server) pair of one engine's TLS streams over ``transport_pair``.

    Both engines' streams read an EOF without ``close_notify`` as an error, so
    a test can tell a clean close from a cut.
    """
    server_engine, client_engine = engines
    raw_client, raw_server = transport_pair
    client = client_engine.wrap(raw_client, "127.0.0.1")
    server = server_engine.wrap(raw_server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    connecting = trio.socket.socket()
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connecting.connect, listener.getsockname())
            accepted, _ = await listener.accept()
    return trio.SocketStream(connecting), trio.SocketStream(accepted)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some(size - len(got))
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while chunk := await stream.receive_some(65536):
        got += chunk
    return bytes(got)


class Tunnel:
    """The pump between a developer (``user``) and a debug server (``server``).

    ``client`` and ``backend`` are the pump's own ends of those connections.
    """

    def __init__(self, user, client, backend, server) -> None:
        self.user, self.client, self.backend, self.server = user, client, backend, server
        self.traffic = Traffic()
        self.taps: list[tuple[str, bytes]] = []
        self.result: PumpResult | None = None
        self.idle = trio.CancelScope()
        self.done = trio.Event()

    async def run(self, **kw) -> None:
        try:
            with self.idle:
                self.result = await run_pump(
                    self.client,
                    self.backend,
                    self.traffic,
                    activity=self.idle,
                    tap=lambda direction, data: self.taps.append((direction, data)),
                    **kw,
                )
        finally:
            self.done.set()


async def memory_tunnel(engines, nursery, **kw) -> Tunnel:
    """A pump on memory streams: TLS from the user, plaintext to the server."""
    user, client = await tls_pair(engines, trio.testing.memory_stream_pair())
    backend, server = trio.testing.memory_stream_pair()
    tunnel = Tunnel(user, client, backend, server)
    nursery.start_soon(lambda: tunnel.run(**kw))
    return tunnel


async def socket_tunnel(engines, nursery, **kw) -> Tunnel:
    """A pump on loopback sockets: TLS from the user, plaintext to the server."""
    user, client = await tls_pair(engines, await socket_pair())
    backend, server = await socket_pair()
    tunnel = Tunnel(user, client, backend, server)
    nursery.start_soon(lambda: tunnel.run(**kw))
    return tunnel


async def round_trips(t, sizes: tuple[int, ...]) -> None:
    """Echo random messages of ``sizes`` through tunnel ``t``, then close it from the user."""
    for size in sizes:
        data = os.urandom(size)
        await t.user.send_all(data)
        assert await receive_exactly(t.user, size) == data
    await t.user.aclose()
    await t.done.wait()


async def talk(user: trio.abc.Stream, seed: int, rounds: int) -> None:
    """Send messages of many sizes through an echoing tunnel, check each, then close."""
    for i in range(rounds):
        message = bytes([seed]) * (1 + (seed * 97 + i * 31) % 3000)
        await user.send_all(message)
        assert await receive_exactly(user, len(message)) == message
    await user.aclose()


async def echo(stream: trio.abc.Stream) -> None:
    """Echo until EOF, then close."""
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


# -- pump semantics on memory streams -------------------------------------------------


async def test_bytes_move_both_ways_and_are_counted_and_tapped(engines, nursery, autojump_clock):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    await t.user.send_all(b"ping")
    assert await receive_exactly(t.server, 4) == b"ping"
    await t.server.send_all(b"pong!")
    assert await receive_exactly(t.user, 5) == b"pong!"
    assert (t.traffic.to_backend, t.traffic.to_client) == (4, 5)
    assert t.taps == [("c2b", b"ping"), ("b2c", b"pong!")]


async def test_idle_timeout_fires_exactly_idle_timeout_after_the_last_byte(
    engines, nursery, autojump_clock
):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    await t.user.send_all(b"x")
    await receive_exactly(t.server, 1)
    await trio.sleep(299.9)
    assert not t.done.is_set()
    await t.server.send_all(b"y")  # traffic either way restarts the timer
    await receive_exactly(t.user, 1)
    last_byte = trio.current_time()
    await trio.sleep_until(last_byte + 299.9)
    assert not t.done.is_set()
    await t.done.wait()
    assert trio.current_time() == pytest.approx(last_byte + 300, abs=1e-6)
    assert t.idle.cancelled_caught and t.result is None


async def test_a_busy_tunnel_is_never_idle(engines, nursery, autojump_clock):
    t = await memory_tunnel(engines, nursery, idle_timeout=60)
    for _ in range(30):  # 30 minutes, a byte every 59 s
        await t.user.send_all(b".")
        await receive_exactly(t.server, 1)
        await trio.sleep(59)
    assert not t.done.is_set()


async def test_one_sweeper_ends_every_idle_tunnel_on_time(engines, nursery, autojump_clock):
    from relay.datapath.trio_driver import _SWEEPER

    tunnels = [await memory_tunnel(engines, nursery, idle_timeout=t) for t in (300, 100, 200)]
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    sweeper = _SWEEPER.get()
    assert len(sweeper) == 3
    # One task watches them all: no tunnel runs a timer task of its own.
    timers = [n for n in _task_names() if n.startswith(("relay.", "dbgrelay")) and "idle" in n]
    assert timers == ["dbgrelay idle sweeper"]
    ended = []
    for t in sorted(tunnels, key=lambda t: id(t)):
        nursery.start_soon(lambda t=t: _note_end(t, ended))
    await trio.sleep(301)
    assert sorted(ended) == [
        pytest.approx(start + 100, abs=1e-6),
        pytest.approx(start + 200, abs=1e-6),
        pytest.approx(start + 300, abs=1e-6),
    ]
    assert all(t.idle.cancelled_caught for t in tunnels)
    assert len(sweeper) == 0


def _task_names() -> list[str]:
    names, todo = [], [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        names.append(task.name)
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return names


async def _note_end(t: Tunnel, ended: list[float]) -> None:
    await t.done.wait()
    ended.append(trio.current_time())


async def test_after_the_client_closes_the_backend_may_answer_for_close_timeout(
    nursery, autojump_clock
):
    # Plaintext both ways, so the client can half-close.
    user, client = trio.testing.memory_stream_pair()
    backend, server = trio.testing.memory_stream_pair()
    t = Tunnel(user, client, backend, server)
    nursery.start_soon(lambda: t.run(idle_timeout=3600, close_timeout=5))
    await user.send_all(b"last request")
    await user.send_eof()
    assert await receive_until_eof(server) == b"last request"  # EOF passed on
    await trio.sleep(4.9)
    await server.send_all(b"late reply")
    assert await receive_exactly(user, 10) == b"late reply"
    await t.done.wait()
    assert trio.current_time() == pytest.approx(5, abs=1e-6)
    assert t.result == PumpResult("client_closed")
    assert t.traffic.to_client == 10 and not t.idle.cancelled_caught


async def test_backend_closing_ends_the_tunnel_after_its_last_bytes(
    engines, nursery, autojump_clock
):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    await t.server.send_all(b"bye")
    await t.server.aclose()
    await t.done.wait()
    assert t.result == PumpResult("backend_closed")
    assert await receive_exactly(t.user, 3) == b"bye"


async def test_garbage_from_the_client_is_a_client_error(engines, nursery, autojump_clock):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    # Write beneath the user's TLS layer: a record no TLS stack accepts.
    await t.user.transport_stream.send_all(b"\x17\x03\x03\x00\x05hello")
    await t.done.wait()
    assert t.result is not None and t.result.reason == "client_error"
    assert t.result.detail  # the TLS error's text, for the audit record


async def test_a_backend_that_stops_reading_is_a_backend_error(engines, nursery, autojump_clock):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    await t.server.receive_stream.aclose()  # still sending, no longer reading
    await t.user.send_all(b"anyone there?")
    await t.done.wait()
    assert t.result is not None and t.result.reason == "backend_error"


async def test_a_backend_stream_that_fails_under_the_pump_is_a_backend_error(
    engines, nursery, autojump_clock
):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    await trio.testing.wait_all_tasks_blocked()
    # The pump is waiting to receive from the backend; its stream fails under it.
    await t.backend.receive_stream.aclose()
    await t.done.wait()
    assert t.result is not None and t.result.reason == "backend_error"
    assert t.result.detail


async def test_a_client_that_stops_reading_is_a_client_error(engines, nursery, autojump_clock):
    t = await memory_tunnel(engines, nursery, idle_timeout=300)
    await t.user.transport_stream.receive_stream.aclose()
    await t.server.send_all(b"reply to nobody")
    await t.done.wait()
    assert t.result is not None and t.result.reason == "client_error"


# -- the stdlib TLS stream ------------------------------------------------------------


async def test_tls_stream_is_a_well_behaved_trio_stream(engines):
    async def stream_maker():
        return await tls_pair(engines, trio.testing.memory_stream_pair())

    async def clogged_stream_maker():
        return await tls_pair(engines, trio.testing.lockstep_stream_pair())

    await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


async def test_tls_stream_over_sockets_is_a_well_behaved_trio_stream(engines):
    async def stream_maker():
        return await tls_pair(engines, await socket_pair())

    await trio.testing.check_two_way_stream(stream_maker, None)


async def test_tls_stream_reads_a_cut_as_an_error_and_close_notify_as_the_end(engines):
    # The same on both engines: a cut is never mistaken for a clean close.
    for cut in (True, False):
        peer, ours = await tls_pair(engines, trio.testing.memory_stream_pair())
        await peer.send_all(b"last words")
        if cut:
            await trio.aclose_forcefully(peer.transport_stream)
        else:
            await peer.aclose()
        assert await receive_exactly(ours, 10) == b"last words"
        if cut:
            with pytest.raises(trio.BrokenResourceError, match="without a TLS close_notify"):
                await ours.receive_some()
        else:
            assert await ours.receive_some() == b""
        await ours.aclose()


async def test_closing_sends_close_notify_even_when_cancelled(engines):
    peer, ours = await tls_pair(engines, await socket_pair())
    await trio.aclose_forcefully(ours)  # cancelled at once
    # The peer raises on an EOF without close_notify.
    assert await peer.receive_some() == b""
    await peer.aclose()


# -- the pump on loopback sockets -----------------------------------------------------


async def test_over_sockets_moves_64_mib_intact(engines, nursery):
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    payload = os.urandom(MIB)
    expected = hashlib.sha256()
    received = hashlib.sha256()

    async def send() -> None:
        for i in range(64):
            block = payload[i:] + payload[:i]  # 64 different MiB
            expected.update(block)
            await t.user.send_all(block)

    async def sink() -> None:
        left = 64 * MIB
        while left:
            data = await t.server.receive_some(min(left, 1 << 20))
            received.update(data)
            left -= len(data)

    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            inner.start_soon(send)
            inner.start_soon(sink)
    assert received.digest() == expected.digest()
    assert t.traffic.to_backend == 64 * MIB
    assert ("c2b", payload[:100]) == (t.taps[0][0], t.taps[0][1][:100])
    assert sum(len(data) for _, data in t.taps) == 64 * MIB


async def test_over_sockets_no_os_read_or_write_touches_a_socket(engines, nursery, monkeypatch):
    # os.read/os.write on a socket do not exist on Windows: the driver must
    # use the socket's own calls, the way the relay runs everywhere.
    def refuse(name, real):
        def call(fd, *args):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise AssertionError(f"os.{name} called on a socket")
            return real(fd, *args)

        return call

    for name in ("read", "readv", "write", "writev"):
        monkeypatch.setattr(os, name, refuse(name, getattr(os, name)))
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    nursery.start_soon(echo, t.server)
    with trio.fail_after(10):
        await round_trips(t, (1, 100, 70000))
    assert t.result == PumpResult("client_closed")
    assert t.traffic.to_backend == t.traffic.to_client == 70101


async def test_over_sockets_ping_pong_of_every_size(engines, nursery):
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    nursery.start_soon(echo, t.server)
    sent = 0
    with trio.fail_after(30):
        for size in [1, 2, 63, 64, 1000, 16383, 16384, 16385, 65535, 65536, 65537, 200_000]:
            for _ in range(3):
                message = os.urandom(size)
                await t.user.send_all(message)
                assert await receive_exactly(t.user, size) == message
                sent += size
    assert (t.traffic.to_backend, t.traffic.to_client) == (sent, sent)
    await t.user.aclose()
    await t.done.wait()
    assert t.result == PumpResult("client_closed")


async def test_over_sockets_bytes_behind_the_handshake_are_not_lost(engines, nursery):
    # Records that arrive before the pump starts wait inside the TLS object,
    # not in the socket: the pump must not wait for the socket first.
    user, client = await tls_pair(engines, await socket_pair())
    backend, server = await socket_pair()
    await user.send_all(b"early")
    await trio.testing.wait_all_tasks_blocked()
    assert await client.receive_some(1) == b"e"  # leaves "arly" decrypted but unread
    t = Tunnel(user, client, backend, server)
    nursery.start_soon(t.run)
    with trio.fail_after(5):
        assert await receive_exactly(server, 4) == b"arly"


async def test_over_sockets_cancelled_mid_transfer_leaves_both_streams_closable(engines, nursery):
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        # Ends when the pump's side closes with bytes unread (a reset).
        with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError):
            while True:
                await t.server.send_all(b"z" * 65536)
                sent += 65536

    nursery.start_soon(flood)
    # The user does not read, so the pump ends up waiting with bytes queued.
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert 0 < t.traffic.to_client < sent
    t.idle.cancel()
    await t.done.wait()
    got = b""

    async def read_all() -> None:
        nonlocal got
        got = await receive_until_eof(t.user)  # strict: an EOF needs close_notify

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(read_all)
            await t.client.aclose()  # sends what was queued, then close_notify
            await t.backend.aclose()
    # Everything the pump counted arrived, in whole records, then a clean close.
    assert len(got) >= t.traffic.to_client and set(got) == {ord("z")}
    assert t.result is None and t.idle.cancelled_caught


async def test_over_sockets_idle_timeout_on_a_frozen_clock(engines, nursery, mock_clock):
    # mock_clock only moves when jumped: bytes go through the kernel in real
    # time while trio's clock stands still.
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    nursery.start_soon(echo, t.server)
    await t.user.send_all(b"x")
    assert await receive_exactly(t.user, 1) == b"x"
    mock_clock.jump(299.9)
    await trio.testing.wait_all_tasks_blocked()
    assert not t.done.is_set()
    await t.user.send_all(b"y")  # the last byte, at 299.9
    assert await receive_exactly(t.user, 1) == b"y"
    mock_clock.jump(299.9)
    await trio.testing.wait_all_tasks_blocked()
    assert not t.done.is_set()
    mock_clock.jump(0.1)  # 300 s after the last byte
    await t.done.wait()
    assert t.idle.cancelled_caught and t.result is None


async def test_over_sockets_half_close_between_plain_sockets(nursery):
    user, client = await socket_pair()
    backend, server = await socket_pair()
    t = Tunnel(user, client, backend, server)
    nursery.start_soon(lambda: t.run(close_timeout=30))
    await user.send_all(b"request")
    await user.send_eof()
    with trio.fail_after(5):
        assert await receive_until_eof(server) == b"request"
        await server.send_all(b"reply after EOF")
        await server.aclose()
        assert await receive_exactly(user, 15) == b"reply after EOF"
        await t.done.wait()
    assert t.result == PumpResult("client_closed")
    assert (t.traffic.to_backend, t.traffic.to_client) == (7, 15)


async def test_over_sockets_backend_reset_is_a_backend_error(engines, nursery):
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    # Close with SO_LINGER 0: the kernel sends RST instead of FIN.
    t.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await t.server.aclose()
    await t.user.send_all(b"x" * 100_000)
    with trio.fail_after(5):
        await t.done.wait()
    assert t.result is not None and t.result.reason == "backend_error"
    assert "reset" in (t.result.detail or "").lower()


async def test_over_sockets_garbage_from_the_client_is_a_client_error(engines, nursery):
    t = await socket_tunnel(engines, nursery, idle_timeout=300)
    await t.user.transport_stream.send_all(b"\x17\x03\x03\x00\x05hello")
    with trio.fail_after(5):
        await t.done.wait()
    assert t.result is not None and t.result.reason == "client_error"
    assert t.result.detail  # OpenSSL's reason, whatever its wording


async def test_over_sockets_serves_many_tunnels_at_once(engines, nursery):
    talkers = [await socket_tunnel(engines, nursery, idle_timeout=300) for _ in range(30)]
    victims = [await socket_tunnel(engines, nursery, idle_timeout=300) for _ in range(10)]
    for t in talkers:
        nursery.start_soon(echo, t.server)

    async def flood(t: Tunnel) -> None:
        # Bulk towards a user that reads, until the tunnel is cancelled.
        with contextlib.suppress(trio.BrokenResourceError):
            while not t.done.is_set():
                await t.server.send_all(b"v" * 65536)

    async def drain(t: Tunnel) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await receive_until_eof(t.user)

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for t in victims:
                inner.start_soon(flood, t)
                inner.start_soon(drain, t)
            async with trio.open_nursery() as talking:
                for seed, t in enumerate(talkers):
                    talking.start_soon(talk, t.user, seed, 50)
                # The victims end (cancelled, as by an idle timeout) mid-transfer:
                # once each has delivered a chunk, however loaded the machine.
                while not all(t.traffic.to_client for t in victims):  # noqa: ASYNC110
                    await trio.sleep(0.001)
                for t in victims:
                    t.idle.cancel()
            for t in victims:
                await t.done.wait()
                await t.client.aclose()
                await t.backend.aclose()
            for t in talkers:
                await t.done.wait()
    for t in talkers:
        assert t.result == PumpResult("client_closed")
        assert t.traffic.to_backend == t.traffic.to_client > 0
    for t in victims:
        assert t.idle.cancelled_caught and t.traffic.to_client > 0


async def test_over_sockets_failing_tap_is_raised_to_the_caller(engines):
    user, client = await tls_pair(engines, await socket_pair())
    backend, server = await socket_pair()

    def tap(direction: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    await user.send_all(b"recorded")
    with trio.fail_after(5), pytest.raises(ExceptionGroup) as info:
        await run_pump(client, backend, Traffic(), tap=tap)
    assert info.value.subgroup(OSError) is not None
    assert "No space left" in str(info.value.exceptions[0])
    for stream in (user, client, backend, server):
        await stream.aclose()


class Corked(trio.abc.Stream):
    """A transport whose sends can be held back and then written in one piece.

    With ``held`` set to ``b""``, sends collect there; the test writes them to
    the socket itself, so records the TLS stream produced in separate calls
    reach the pump in one read.  ``aclose`` leaves the socket open.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.held: bytes | None = None

    async def send_all(self, data) -> None:
        if self.held is None:
            await self.inner.send_all(data)
        else:
            self.held += bytes(data)
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def corked_tunnel(engines, nursery) -> tuple[Tunnel, Corked]:
    raw_user, raw_client = await socket_pair()
    corked = Corked(raw_user)
    user, client = await tls_pair(engines, (corked, raw_client))
    backend, server = await socket_pair()
    tunnel = Tunnel(user, client, backend, server)
    nursery.start_soon(lambda: tunnel.run(idle_timeout=300))
    return tunnel, corked


async def test_over_sockets_reports_an_error_behind_good_records_at_once(engines, nursery):
    t, corked = await corked_tunnel(engines, nursery)
    corked.held = b""
    await t.user.send_all(b"data")
    held, corked.held = corked.held + b"\x17\x03\x03\x00\x05hello", None
    # A good record and a forged one in one write; the socket then stays quiet.
    await corked.inner.send_all(held)
    with trio.fail_after(5):
        assert await receive_exactly(t.server, 4) == b"data"
        await t.done.wait()
    assert t.result is not None and t.result.reason == "client_error"
    await corked.inner.aclose()


async def test_over_sockets_sees_close_notify_behind_data_at_once(engines, nursery):
    t, corked = await corked_tunnel(engines, nursery)
    corked.held = b""
    await t.user.send_all(b"data")
    await t.user.aclose()  # close_notify, held back; the TCP connection stays open
    held, corked.held = corked.held, None
    await corked.inner.send_all(held)
    with trio.fail_after(5):
        assert await receive_until_eof(t.server) == b"data"
    await t.server.aclose()
    with trio.fail_after(5):
        await t.done.wait()
    assert t.result == PumpResult("client_closed")
    await corked.inner.aclose()
