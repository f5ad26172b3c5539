"""Tests for relay.httpd over real loopback and Unix sockets.

Timeout tests run over in-memory streams with the autojump clock instead, so
production-sized timeouts pass in milliseconds without racing the kernel.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from relay.errors import LocalProtocolError
from relay.httpd import (
    HttpRequest,
    HttpResponse,
    UnixSocketListener,
    metrics_handler,
    open_http_listeners,
    serve_http,
)
from relay.metrics import Metrics, NilMetrics


@asynccontextmanager
async def running(handler, listen="127.0.0.1:0", **kwargs):
    async with trio.open_nursery() as nursery:
        listeners = await open_http_listeners(listen)
        listeners = await nursery.start(partial(serve_http, listeners, handler, **kwargs))
        yield listeners
        nursery.cancel_scope.cancel()


async def request(stream, conn, method, target, *, headers=(), body=b""):
    """Send one request with the h11 client and return (response, body)."""
    head = [("host", "test"), *headers]
    if body or method == "POST":
        head.append(("content-length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=target, headers=head))
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    response = None
    chunks = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return response, b"".join(chunks)
        else:
            raise AssertionError(f"unexpected {event!r}")


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, val in response.headers:
        if key == name:
            return val
    return None


async def read_to_eof(stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


class Recorder:
    """A handler that records requests and echoes them back as JSON."""

    def __init__(self):
        self.requests: list[HttpRequest] = []

    async def __call__(self, req: HttpRequest) -> HttpResponse:
        self.requests.append(req)
        payload = {"method": req.method, "target": req.target, "body": req.body.decode()}
        return HttpResponse(200, json.dumps(payload).encode(), headers={"x-seen": "1"})


async def test_keep_alive_serves_two_requests_on_one_connection():
    handler = Recorder()
    async with running(handler) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        conn = h11.Connection(h11.CLIENT)
        first, body1 = await request(stream, conn, "GET", "/one?x=1")
        conn.start_next_cycle()
        second, body2 = await request(
            stream, conn, "POST", "/two", headers=[("X-Token-Id", "abc")], body=b"hello"
        )
        client_host, client_port = stream.socket.getsockname()[:2]
        await stream.aclose()
    assert first.status_code == 200 and second.status_code == 200
    assert json.loads(body1) == {"method": "GET", "target": "/one?x=1", "body": ""}
    assert json.loads(body2) == {"method": "POST", "target": "/two", "body": "hello"}
    assert header(second, b"x-seen") == b"1"
    assert header(second, b"content-type") == b"application/json"
    one, two = handler.requests
    assert one.path == "/one"
    assert two.headers["x-token-id"] == "abc"
    # Same connection both times: the peer's port did not change.
    assert one.peer == two.peer == f"{client_host}:{client_port}"


async def test_chunked_body_is_assembled():
    handler = Recorder()
    async with running(handler) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        await stream.send_all(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        raw = await read_to_eof(stream)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert handler.requests[0].body == b"abcde"


async def test_bad_request_is_answered_400_and_closed():
    handler = Recorder()
    async with running(handler) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n" + b"x" * 5000)
        raw = await read_to_eof(stream)
        # The server is still up for the next client.
        stream2 = await trio.testing.open_stream_to_socket_listener(listeners[0])
        response, _ = await request(stream2, h11.Connection(h11.CLIENT), "GET", "/")
        await stream2.aclose()
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert raw.endswith(b'{"error": "bad_request"}')
    assert response.status_code == 200
    assert len(handler.requests) == 1


async def test_oversized_head_431_and_body_413():
    handler = Recorder()
    async with running(handler, max_head=1024, max_body=100) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        raw_head = await read_to_eof(stream)

        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n")
        raw_length = await read_to_eof(stream)

        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        chunk = b"40\r\n" + b"z" * 64 + b"\r\n"
        await stream.send_all(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2
        )
        raw_chunked = await read_to_eof(stream)
    assert raw_head.startswith(b"HTTP/1.1 431 ")
    assert raw_length.startswith(b"HTTP/1.1 413 ")
    assert raw_chunked.startswith(b"HTTP/1.1 413 ")
    assert handler.requests == []


async def test_handler_exception_gives_500_logs_traceback_and_keeps_serving(caplog):
    calls = []

    async def handler(req: HttpRequest) -> HttpResponse:
        calls.append(req.path)
        if req.path == "/boom":
            raise RuntimeError("handler bug")
        return HttpResponse(200, b"{}")

    async with running(handler) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        conn = h11.Connection(h11.CLIENT)
        crashed, body = await request(stream, conn, "GET", "/boom")
        conn.start_next_cycle()
        after, _ = await request(stream, conn, "GET", "/fine")
        await stream.aclose()
    assert crashed.status_code == 500
    assert json.loads(body) == {"error": "internal_error"}
    assert b"handler bug" not in body
    assert after.status_code == 200
    assert calls == ["/boom", "/fine"]
    [record] = [r for r in caplog.records if r.message == "http.handler_failed"]
    assert record.name == "dbgrelay.http"
    assert record.levelno == logging.ERROR
    assert record.exc_info[0] is RuntimeError
    assert record.path == "/boom"


async def test_metrics_endpoint_routes():
    async with running(metrics_handler(NilMetrics())) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        conn = h11.Connection(h11.CLIENT)
        results = {}
        for method, target in [
            ("GET", "/healthz"),
            ("GET", "/nope"),
            ("POST", "/metrics"),
            ("HEAD", "/metrics"),
            ("GET", "/metrics?name[]=x"),
        ]:
            results[method, target] = await request(stream, conn, method, target)
            conn.start_next_cycle()
        await stream.aclose()
    health, health_body = results["GET", "/healthz"]
    assert (health.status_code, health_body) == (200, b"ok\n")
    assert results["GET", "/nope"][0].status_code == 404
    not_allowed, _ = results["POST", "/metrics"]
    assert not_allowed.status_code == 405
    assert header(not_allowed, b"allow") == b"GET, HEAD"
    head, head_body = results["HEAD", "/metrics"]
    assert head.status_code == 200 and head_body == b""
    assert results["GET", "/metrics?name[]=x"][0].status_code == 200


async def test_metrics_endpoint_serves_current_values():
    metrics = Metrics(version="9.9.9", targets=["win"])
    metrics.session_opened("win")
    metrics.add_bytes("win", to_backend=1234, to_client=56789)
    metrics.auth_failure("bad_signature")
    async with running(metrics_handler(metrics)) as listeners:
        stream = await trio.testing.open_stream_to_socket_listener(listeners[0])
        conn = h11.Connection(h11.CLIENT)
        response, body = await request(stream, conn, "GET", "/metrics")
        conn.start_next_cycle()
        metrics.session_closed("win", outcome="revoked", duration=42.0)
        _, body_after = await request(stream, conn, "GET", "/metrics")
        await stream.aclose()
    assert response.status_code == 200
    assert header(response, b"content-type").startswith(b"text/plain; version=")

    def parse(raw: bytes) -> dict:
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(raw.decode())
            for s in family.samples
        }

    first, second = parse(body), parse(body_after)
    win = frozenset({("target", "win")})
    assert first["dbgrelay_sessions_active", win] == 1
    assert first["dbgrelay_tunnel_bytes_total", win | {("direction", "to_backend")}] == 1234
    assert first["dbgrelay_tunnel_bytes_total", win | {("direction", "to_client")}] == 56789
    assert first["dbgrelay_auth_failures_total", frozenset({("reason", "bad_signature")})] == 1
    assert first["dbgrelay_build_info", frozenset({("version", "9.9.9")})] == 1
    assert second["dbgrelay_sessions_active", win] == 0
    assert second["dbgrelay_sessions_total", win | {("outcome", "revoked")}] == 1
    assert second["dbgrelay_session_duration_seconds_sum", win] == 42.0


async def test_unix_socket_mode_0600_and_peer_credentials(tmp_path):
    path = tmp_path / "admin.sock"
    handler = Recorder()
    async with running(handler, listen=f"unix:{path}") as listeners:
        [listener] = listeners
        assert isinstance(listener, UnixSocketListener)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        stream = await trio.open_unix_socket(str(path))
        response, _ = await request(stream, h11.Connection(h11.CLIENT), "GET", "/admin")
        await stream.aclose()
    assert response.status_code == 200
    assert handler.requests[0].peer == f"unix:pid={os.getpid()},uid={os.getuid()}"
    # Closing the listener removed its socket file.
    assert not path.exists()


async def test_unix_socket_replaces_stale_file_but_not_a_live_one(tmp_path):
    path = tmp_path / "admin.sock"
    # A socket file left behind by a dead process: bound, never listening, closed.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    [listener] = await open_http_listeners(f"unix://{path}")  # the URL form
    assert listener.path == str(path)
    try:
        with pytest.raises(LocalProtocolError, match="another process is listening") as info:
            await open_http_listeners(f"unix:{path}")
        assert info.value.reason == "bad_listen"
        assert path.exists()
    finally:
        await listener.aclose()


async def test_unix_socket_refuses_to_delete_a_regular_file(tmp_path):
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    with pytest.raises(LocalProtocolError, match="exists and is not a socket"):
        await open_http_listeners(f"unix:{path}")
    assert path.read_text() == "keep me"


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("9464", 'missing ":PORT"'),
        (":9464", "missing host"),
        ("::1:9464", "put IPv6 addresses in brackets"),
        ("127.0.0.1:http", "port must be a number from 0 to 65535"),
        ("127.0.0.1:70000", "port must be a number from 0 to 65535"),
        ("bad host:9464", "is not an IP address or a host name"),
        ("unix:", "with a path after"),
        ("unix:/nonexistent-dir/x/admin.sock", "cannot bind"),
    ],
)
async def test_bad_listen_addresses(listen, message):
    with pytest.raises(LocalProtocolError, match=message) as info:
        await open_http_listeners(listen)
    assert info.value.reason == "bad_listen"
    assert listen in str(info.value)


async def test_tcp_port_in_use_is_a_clear_error():
    [listener] = await open_http_listeners("127.0.0.1:0")
    try:
        port = listener.socket.getsockname()[1]
        with pytest.raises(LocalProtocolError, match="cannot listen"):
            await open_http_listeners(f"127.0.0.1:{port}")
    finally:
        await listener.aclose()


async def test_ipv6_bracketed_host():
    try:
        listeners = await open_http_listeners("[::1]:0")
    except LocalProtocolError:
        pytest.skip("IPv6 loopback is not available on this machine")
    [listener] = listeners
    assert listener.socket.getsockname()[0] == "::1"
    await listener.aclose()


def test_response_validation():
    with pytest.raises(ValueError, match="200..599"):
        HttpResponse(101, b"")
    with pytest.raises(ValueError, match="204"):
        HttpResponse(204, b"x")
    with pytest.raises(ValueError, match="(?i)content-length"):
        HttpResponse(200, b"", headers={"Content-Length": "5"})
    with pytest.raises(ValueError, match="line break"):
        HttpResponse(200, b"", headers={"x-a": "1\r\nx-b: 2"})


class MemoryListener(trio.abc.Listener):
    """Hands the server in-memory streams, so the autojump clock is safe."""

    def __init__(self):
        self._send, self._receive = trio.open_memory_channel(0)

    async def connect(self):
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self):
        return await self._receive.receive()

    async def aclose(self):
        await self._receive.aclose()


async def test_slow_request_is_dropped_after_request_timeout(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="dbgrelay.http")
    listener = MemoryListener()
    handler = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_http, [listener], handler, request_timeout=10.0))
        client = await listener.connect()
        start = trio.current_time()
        await client.send_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n")  # head never finishes
        assert await read_to_eof(client) == b""
        assert 10.0 <= trio.current_time() - start < 10.5
        nursery.cancel_scope.cancel()
    assert handler.requests == []
    assert any(r.message == "http.timeout" for r in caplog.records)


async def test_idle_keep_alive_connection_is_closed(autojump_clock):
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_http, [listener], Recorder(), request_timeout=10.0))
        client = await listener.connect()
        conn = h11.Connection(h11.CLIENT)
        response, _ = await request(client, conn, "GET", "/")
        assert response.status_code == 200
        start = trio.current_time()
        assert await read_to_eof(client) == b""
        assert 10.0 <= trio.current_time() - start < 10.5
        nursery.cancel_scope.cancel()


async def test_slow_handler_is_not_cut_off(autojump_clock):
    async def handler(req: HttpRequest) -> HttpResponse:
        await trio.sleep(60)
        return HttpResponse(200, b'{"slow": true}')

    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_http, [listener], handler, request_timeout=10.0))
        client = await listener.connect()
        response, body = await request(client, h11.Connection(h11.CLIENT), "GET", "/")
        nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert body == b'{"slow": true}'
