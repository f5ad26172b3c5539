"""A small HTTP/1.1 server on trio and h11.

It serves ``/metrics`` and ``/healthz`` for Prometheus and health checks (over
HTTPS with client certificates, and/or behind a bearer token, when
``[metrics]`` asks for it), and the admin JSON API on a Unix socket.  prometheus-client's own server runs in a
thread, outside the relay's task tree; this one is an ordinary trio service
started with ``nursery.start`` like every other listener.

The server is deliberately small: whole request bodies are read into memory
(bounded by ``max_body``), responses are sent in one piece with a
``Content-Length``, and keep-alive is supported.  It is not meant to face the
internet.
"""

from __future__ import annotations

import dataclasses
import errno
import hmac
import json
import logging
import os
import socket as stdlib_socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import h11
import trio

from config import MetricsSection, format_address, parse_listen_address

from .errors import LocalProtocolError

if TYPE_CHECKING:
    from .metrics import Metrics, NilMetrics

__all__ = [
    "HttpRequest",
    "HttpResponse",
    "Handler",
    "UnixSocketListener",
    "serve_http",
    "open_http_listeners",
    "metrics_handler",
    "metrics_tls_context",
    "load_bearer_token",
    "serve_metrics",
    "listener_address",
]

logger = logging.getLogger("dbgrelay.http")

_RECEIVE_SIZE = 16384
# After an error answer the peer may still be sending; closing with unread
# data makes the kernel send RST, which can destroy the answer before the
# peer reads it (RFC 9112 section 9.6).  So half-close and drain a little.
_LINGER_TIMEOUT = 1.0
_LINGER_BYTES = 65536
# Headers the server sets itself; a handler may not override them.
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One complete request.

    Attributes:
        method: ``GET``, ``POST``, ...
        target: The request target as sent (path and query).
        headers: Header names lower-cased; repeated headers joined with ``", "``.
        body: The whole body.
        peer: ``"ip:port"`` for TCP, ``"unix:pid=N,uid=N"`` for a Unix socket.
        credentials: ``(pid, uid, gid)`` of the connecting process as the
            kernel reports them (``SO_PEERCRED``) on a Unix socket, else None.
    """

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes
    peer: str
    credentials: tuple[int, int, int] | None = None

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.partition("?")[0]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response for :func:`serve_http` to send.

    Attributes:
        status: 200..599.
        body: The whole body; must be empty for 204.
        content_type: The ``Content-Type`` header.
        headers: Extra headers.  ``Content-Length``, ``Transfer-Encoding``
            and ``Connection`` are set by the server and refused here.

    Raises:
        ValueError: For a status outside 200..599, a body on a 204, or a
            header that is reserved or contains a line break.
    """

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.status, int) or not 200 <= self.status <= 599:
            raise ValueError(f"HttpResponse.status must be 200..599, got {self.status!r}")
        if self.status == 204 and self.body:
            raise ValueError("HttpResponse with status 204 must have an empty body")
        for name, value in [("content-type", self.content_type), *self.headers.items()]:
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"HttpResponse.headers must not set {name!r}: the server sets it")
            if any(c in f"{name}{value}" for c in "\r\n\0"):
                raise ValueError(f"HttpResponse header {name!r} contains a line break or NUL")


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def _json_error(status: int, error: str) -> HttpResponse:
    return HttpResponse(status, json.dumps({"error": error}).encode())


class _Reject(Exception):
    """The request cannot be served; answer ``response`` and close."""

    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status)
        self.response = response


async def serve_http(
    listeners: list[trio.abc.Listener],
    handler: Handler,
    *,
    request_timeout: float = 10.0,
    max_head: int = 16384,
    max_body: int = 65536,
    task_status: trio.TaskStatus[list[trio.abc.Listener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 on ``listeners`` until cancelled.

    Each connection runs in its own task and may carry several requests
    (keep-alive).  A malformed request is answered 400 (431 for an oversized
    head, 413 for an oversized body) and the connection closed.  Receiving a
    request, and sending its response, must each finish within
    ``request_timeout`` seconds or the connection is dropped without an
    answer; the same limit applies to an idle keep-alive connection.  The
    handler itself is not timed: it owns its own timeouts.  A handler that
    raises produces a 500 with a JSON error and a logged traceback
    (``http.handler_failed``); the server keeps running.

    Args:
        listeners: Listeners from :func:`open_http_listeners` (or any trio listener).
        handler: Called once per request.
        request_timeout: Seconds allowed to receive one request or send one response.
        max_head: Largest request line plus headers, in bytes.
        max_body: Largest request body, in bytes.
        task_status: Receives ``listeners`` once the server accepts connections.

    Resource handling:
        The listeners are closed when this returns or is cancelled; each
        connection is closed when its task ends.
    """

    async def serve_one(stream: trio.abc.Stream) -> None:
        await _serve_connection(
            stream,
            handler,
            request_timeout=request_timeout,
            max_head=max_head,
            max_body=max_body,
        )

    await trio.serve_listeners(serve_one, listeners, task_status=task_status)


async def _serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    request_timeout: float,
    max_head: int,
    max_body: int,
) -> None:
    peer = _peer_name(stream)
    credentials = peer_credentials(stream)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    linger = False
    try:
        while True:
            request: HttpRequest | None = None
            with trio.move_on_after(request_timeout) as scope:
                try:
                    request = await _receive_request(stream, conn, peer, max_head, max_body)
                    if request is not None and credentials is not None:
                        request = dataclasses.replace(request, credentials=credentials)
                except _Reject as reject:
                    logger.info(
                        "http.rejected", extra={"peer": peer, "status": reject.response.status}
                    )
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _send_response(stream, conn, reject.response, head_only=False)
                    linger = True
                    return
            if scope.cancelled_caught:
                logger.info("http.timeout", extra={"peer": peer})
                return
            if request is None:  # the peer closed between requests
                return

            try:
                response = await handler(request)
            except Exception:
                logger.exception(
                    "http.handler_failed",
                    extra={"peer": peer, "method": request.method, "path": request.path},
                )
                response = _json_error(500, "internal_error")

            with trio.move_on_after(request_timeout) as scope:
                await _send_response(stream, conn, response, head_only=request.method == "HEAD")
            if scope.cancelled_caught:
                logger.info("http.timeout", extra={"peer": peer})
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # h11 decided the connection must close (Connection: close, HTTP/1.0)
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away; nothing to answer
    except Exception:
        # A bug in this module: log it and keep serving other connections.
        logger.exception("http.crashed", extra={"peer": peer})
    finally:
        await _close(stream, linger=linger)


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.they_are_waiting_for_100_continue:
            await stream.send_all(conn.send(h11.InformationalResponse(status_code=100)))
        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))


async def _receive_request(
    stream: trio.abc.Stream, conn: h11.Connection, peer: str, max_head: int, max_body: int
) -> HttpRequest | None:
    """Read one whole request, or return None if the peer closed cleanly first.

    Raises:
        _Reject: The request is malformed or too large.
    """
    try:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        # h11 enforces max_incomplete_event_size only while the head is still
        # incomplete; a head that arrived in one read is measured here.
        head_size = len(event.method) + len(event.target) + 12
        head_size += sum(len(n) + len(v) + 4 for n, v in event.headers)
        if head_size > max_head:
            raise _Reject(_json_error(431, "header_too_large"))
        method = event.method.decode("ascii")
        target = event.target.decode("ascii")
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("ascii").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        # h11 has already checked Content-Length is digits (and repeats agree).
        length = headers.get("content-length")
        if length is not None and int(length.partition(",")[0]) > max_body:
            raise _Reject(_json_error(413, "body_too_large"))
        body = bytearray()
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:  # chunked bodies have no length up front
                    raise _Reject(_json_error(413, "body_too_large"))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # h11 raises on a truncated body, so this is unreachable in practice
                raise _Reject(_json_error(400, "bad_request"))
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        raise _Reject(
            _json_error(status, "header_too_large" if status == 431 else "bad_request")
        ) from exc
    return HttpRequest(method=method, target=target, headers=headers, body=bytes(body), peer=peer)


async def _send_response(
    stream: trio.abc.Stream, conn: h11.Connection, response: HttpResponse, *, head_only: bool
) -> None:
    headers = [("date", formatdate(usegmt=True))]
    if response.status != 204:
        headers.append(("content-type", response.content_type))
        headers.append(("content-length", str(len(response.body))))
    headers.extend(response.headers.items())
    try:
        reason = HTTPStatus(response.status).phrase.encode("ascii")
    except ValueError:
        reason = b""
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if response.body and not head_only:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _close(stream: trio.abc.Stream, *, linger: bool) -> None:
    """Close ``stream``; with ``linger``, half-close first and drain what the peer still sends."""
    try:
        if linger and isinstance(stream, trio.abc.HalfCloseableStream):
            with trio.move_on_after(_LINGER_TIMEOUT):
                try:
                    await stream.send_eof()
                    drained = 0
                    while drained < _LINGER_BYTES:
                        data = await stream.receive_some(_RECEIVE_SIZE)
                        if not data:
                            break
                        drained += len(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
    finally:
        await trio.aclose_forcefully(stream)


_SO_PEERCRED = getattr(stdlib_socket, "SO_PEERCRED", None)
# Windows has no AF_UNIX; a family that never matches keeps the checks simple.
_AF_UNIX = getattr(stdlib_socket, "AF_UNIX", None)


def peer_credentials(stream: trio.abc.Stream) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket.

    The kernel records them when the peer connects, so they cannot be
    forged by what the peer sends.  None for TCP, or where unsupported.
    """
    sock = getattr(stream, "socket", None)
    if sock is None or _SO_PEERCRED is None or sock.family != _AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(stdlib_socket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _peer_name(stream: trio.abc.Stream) -> str:
    stream = getattr(stream, "transport_stream", stream)  # HTTPS: the TCP stream under TLS
    sock = getattr(stream, "socket", None)
    if sock is None:
        # A named pipe (relay.npipe.PipeStream) names its client itself.
        return getattr(stream, "peer_name", "unknown")
    try:
        if sock.family == _AF_UNIX:
            if _SO_PEERCRED is None:
                return "unix"
            creds = sock.getsockopt(stdlib_socket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return f"unix:pid={pid},uid={uid}"
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"[{host}]:{port}" if sock.family == stdlib_socket.AF_INET6 else f"{host}:{port}"


class UnixSocketListener(trio.abc.Listener[trio.SocketStream]):
    """A listener on a Unix socket file that removes the file when closed.

    Build one with :func:`open_http_listeners`.  The file is removed on
    :meth:`aclose` only if it is still the one this listener created, so a
    newer process that replaced it keeps its socket.

    Attributes:
        socket: The listening trio socket.
        path: The socket file.
    """

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self._listener = trio.SocketListener(sock)
        self.socket = sock
        self.path = path
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    async def accept(self) -> trio.SocketStream:
        """Accept one connection."""
        return await self._listener.accept()

    async def aclose(self) -> None:
        """Stop listening and remove the socket file if it is still ours."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass
        await self._listener.aclose()


def _listen_error(listen: str, message: str) -> LocalProtocolError:
    return LocalProtocolError(f"listen address {listen!r}: {message}", reason="bad_listen")


async def open_http_listeners(listen: str) -> list[trio.abc.Listener]:
    """Open the listeners for one listen address.

    Args:
        listen: ``"HOST:PORT"`` (``"127.0.0.1:9464"``, ``"[::1]:9464"``; port
            0 picks a free port; a name like ``localhost`` may give one
            listener per address) or ``"unix:/path/to.sock"`` (also
            ``"unix:///path/to.sock"``).  A Unix socket
            file is created with mode 0600; a stale one left by a dead process
            is removed first.

    Returns:
        The listening listeners, ready for :func:`serve_http`.

    Raises:
        LocalProtocolError: With ``reason="bad_listen"`` when ``listen`` is
            malformed or the address cannot be bound.
    """
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if path.startswith("///"):  # unix:///run/x.sock, the URL form
            path = path[2:]
        if not path:
            raise _listen_error(listen, "expected unix:/path/to.sock with a path after 'unix:'")
        return [await _open_unix_listener(listen, path)]

    try:
        host, port = parse_listen_address(listen)
    except ValueError as exc:
        # The same parser and messages as the config's listen addresses.
        raise LocalProtocolError(str(exc), reason="bad_listen") from None
    try:
        return list(await trio.open_tcp_listeners(port, host=host))
    except OSError as exc:
        raise _listen_error(listen, f"cannot listen: {exc.strerror or exc}") from exc


async def _open_unix_listener(listen: str, path: str) -> UnixSocketListener:
    await _remove_stale_socket(listen, path)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        try:
            await sock.bind(path)
        except OSError as exc:
            raise _listen_error(listen, f"cannot bind: {exc.strerror or exc}") from exc
        # Nobody can connect before listen(), so restricting the mode here is
        # race-free without touching the process-wide umask.
        os.chmod(path, 0o600)
        sock.listen(stdlib_socket.SOMAXCONN)
        return UnixSocketListener(sock, path)
    except BaseException:
        sock.close()
        raise


async def _remove_stale_socket(listen: str, path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise _listen_error(
            listen, "the path exists and is not a socket; remove it or pick another"
        )
    probe = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise _listen_error(listen, f"cannot check the existing socket: {exc}") from exc
        else:
            raise _listen_error(listen, "another process is listening on it; stop it first")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def metrics_handler(
    metrics: Metrics | NilMetrics,
    *,
    bearer_token: str | None = None,
    unready: Callable[[], str | None] | None = None,
) -> Handler:
    """The handler for the metrics endpoint.

    ``GET /metrics`` returns the exposition, ``GET /healthz`` returns
    ``200 ok`` while the process serves (liveness), ``GET /readyz`` returns
    ``200 ready`` while the relay admits new tunnels and ``503`` with the
    reason while it would refuse them (readiness: a load balancer stops
    sending it new ones), other paths 404.  ``HEAD`` is served like ``GET``
    without a body (RFC 9110 section 9.3.2); other methods get 405.

    Args:
        metrics: What ``/metrics`` renders.
        bearer_token: When given, ``/metrics`` answers only requests with
            ``Authorization: Bearer <bearer_token>`` (RFC 6750), compared in
            constant time; others get 401 with ``WWW-Authenticate``.
            ``/healthz`` says nothing but "ok" and stays open for health checks,
            as does ``/readyz``.
        unready: Why the relay admits no new tunnels now (a reason code such
            as ``state_unavailable`` or ``draining``), or ``None`` while it
            does; without it ``/readyz`` answers like ``/healthz``.
    """
    expected = bearer_token.encode() if bearer_token is not None else None

    async def handle(request: HttpRequest) -> HttpResponse:
        path = request.path
        if path not in ("/metrics", "/healthz", "/readyz"):
            return _json_error(404, "not_found")
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(
                405,
                json.dumps({"error": "method_not_allowed"}).encode(),
                headers={"allow": "GET, HEAD"},
            )
        if path == "/healthz":
            return HttpResponse(200, b"ok\n", content_type="text/plain; charset=utf-8")
        if path == "/readyz":
            reason = unready() if unready is not None else None
            if reason is not None:
                body = f"unready: {reason}\n".encode()
                return HttpResponse(503, body, content_type="text/plain; charset=utf-8")
            return HttpResponse(200, b"ready\n", content_type="text/plain; charset=utf-8")
        if expected is not None:
            refusal = _check_bearer(request, expected)
            if refusal is not None:
                logger.info("metrics.unauthorized", extra={"peer": request.peer})
                return refusal
        body, content_type = metrics.render()
        return HttpResponse(200, body, content_type=content_type)

    return handle


def _check_bearer(request: HttpRequest, expected: bytes) -> HttpResponse | None:
    """None if the request carries the bearer token, else the 401 to send."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        challenge = 'Bearer realm="dbgrelay metrics"'
        error = "missing_token"
    else:
        given = credentials.strip().encode("latin-1")
        if hmac.compare_digest(given, expected):
            return None
        challenge = 'Bearer realm="dbgrelay metrics", error="invalid_token"'
        error = "invalid_token"
    return HttpResponse(
        401,
        json.dumps({"error": error}).encode(),
        headers={"www-authenticate": challenge},
    )


def load_bearer_token(path: Path) -> str:
    """Read the scrape token from ``[metrics] bearer_token_file``.

    Raises:
        LocalProtocolError: the file cannot be read, is empty, or holds more
            than one word.
    """
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalProtocolError(
            f"metrics.bearer_token_file {path}: {getattr(exc, 'strerror', None) or exc}; "
            "it must be a readable file holding one ASCII token",
            reason="bad_config",
        ) from exc
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise LocalProtocolError(
            f"metrics.bearer_token_file {path} must hold one token (printable ASCII, no "
            "spaces), for example from: openssl rand -hex 32",
            reason="bad_config",
        )
    return token


def metrics_tls_context(section: MetricsSection) -> ssl.SSLContext:
    """The HTTPS context of the metrics endpoint: the relay's hardened TLS
    settings, and a client certificate signed by ``client_ca`` required.

    Raises:
        LocalProtocolError: the certificate, key or CA cannot be loaded.
    """
    from .tls import make_server_engine

    assert section.tls_cert is not None and section.tls_key is not None
    engine = make_server_engine(
        engine="stdlib",
        cert=section.tls_cert,
        key=section.tls_key,
        client_ca=section.client_ca,
        require_client_cert=True,
    )
    return engine.context  # type: ignore[attr-defined,no-any-return]


async def serve_metrics(
    section: MetricsSection,
    metrics: Metrics | NilMetrics,
    *,
    unready: Callable[[], str | None] | None = None,
    task_status: trio.TaskStatus[list[trio.abc.Listener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` as ``[metrics]`` says, until cancelled.

    ``unready`` is as for :func:`metrics_handler`.

    Plain HTTP, or HTTPS that requires a client certificate (``tls_cert``,
    ``tls_key``, ``client_ca``), and/or a bearer token
    (``bearer_token_file``).  The TLS handshake runs within the request
    timeout, like the rest of a request.

    Raises:
        LocalProtocolError: a file cannot be used or the address cannot be
            bound; the message names the key.

    Resource handling:
        Binds the listeners itself and closes them when this returns.
    """
    assert section.listen is not None
    token = None
    if section.bearer_token_file is not None:
        token = load_bearer_token(section.bearer_token_file)
    context = metrics_tls_context(section) if section.tls else None
    listeners: list[trio.abc.Listener] = list(
        await open_http_listeners(format_address(section.listen))
    )
    if context is not None:
        listeners = [
            trio.SSLListener(lst, context, https_compatible=True)  # type: ignore[arg-type]
            for lst in listeners
        ]
    await serve_http(
        listeners,
        metrics_handler(metrics, bearer_token=token, unready=unready),
        task_status=task_status,
    )


def listener_address(listener: trio.abc.Listener) -> str:
    """``host:port`` a TCP listener (plain or TLS) is bound to."""
    inner = getattr(listener, "transport_listener", listener)
    return format_address(inner.socket.getsockname()[:2])  # type: ignore[attr-defined]
