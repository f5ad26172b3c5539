"""Connecting to TCP backends: numeric addresses skip the resolver."""

from __future__ import annotations

import socket

import pytest
import trio

from config import TcpBackend
from relay.backends import BackendError, open_backend


async def _listener() -> tuple[trio.SocketListener, int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listeners[0], listeners[0].socket.getsockname()[1]


async def test_a_numeric_address_is_one_plain_connect_with_nodelay(monkeypatch):
    def no_resolver(*args, **kwargs):
        raise AssertionError("trio.open_tcp_stream used for a numeric address")

    monkeypatch.setattr(trio, "open_tcp_stream", no_resolver)
    listener, port = await _listener()
    async with listener:
        stream = await open_backend(TcpBackend("127.0.0.1", port), connect_timeout=5)
        async with stream:
            server = await listener.accept()
            async with server:
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                await stream.send_all(b"hello")
                assert await server.receive_some(5) == b"hello"


async def test_a_host_name_goes_through_the_resolver(monkeypatch):
    used = []
    real = trio.open_tcp_stream

    async def counting(host, port, **kwargs):
        used.append(host)
        return await real(host, port, **kwargs)

    monkeypatch.setattr(trio, "open_tcp_stream", counting)
    listener, port = await _listener()
    async with listener:
        stream = await open_backend(TcpBackend("localhost", port), connect_timeout=5)
        async with stream:
            assert used == ["localhost"]
            assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_refused_numeric_connect_is_backend_unreachable(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        probe = socket.socket(family)
        probe.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} on this machine")
    port = probe.getsockname()[1]
    probe.close()  # bound, never listened: the port refuses
    with pytest.raises(BackendError) as info:
        await open_backend(TcpBackend(host, port), connect_timeout=5)
    assert info.value.reason == "backend_unreachable"
    assert f":{port}" in str(info.value)
