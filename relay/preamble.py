"""The tunnel preamble: one HTTP/1.1 request head and its answer (sans-IO).

After the TLS handshake the client sends a request head and nothing else::

    CONNECT build42 HTTP/1.1
    Host: build42
    Proxy-Authorization: Bearer <jwt>

``CONNECT`` opens a tunnel to the named target; ``OPTIONS`` with the same
target form is a preflight that checks the token and reports the target's
kind without touching the backend.  The relay answers with
:func:`render_established`, :func:`render_preflight` or
:func:`render_refusal`; the connector builds the request with
:func:`render_request` and reads the answer with :class:`ResponseParser`.

Both parsers work like :class:`h11.Connection`: ``receive_data(b)`` buffers
(``b""`` means end of file) and ``next_event()`` returns an event or
:data:`NEED_DATA`.  Nothing here does I/O or imports trio.

The token may come as ``Proxy-Authorization: Bearer``, ``Authorization:
Bearer`` or ``Proxy-Authorization: Basic base64(<anything>:<jwt>)``, so that
tools which only know proxy passwords (``curl --proxytunnel --proxy-user
x:TOKEN``, socat's ``proxyauth=x:TOKEN``) can chain through the relay.
For the same reason HTTP/1.0 requests are accepted: socat's proxy client
sends ``CONNECT name:port HTTP/1.0`` without a ``Host`` header.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import h11

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "NEED_DATA",
    "METHODS",
    "TOKEN_SOURCES",
    "DEFAULT_MAX_HEAD",
    "TunnelRequested",
    "PreambleParser",
    "TunnelResponse",
    "ResponseParser",
    "render_request",
    "render_refusal",
    "render_established",
    "render_preflight",
]

#: Returned by ``next_event()`` when more bytes are needed.  This is
#: :data:`h11.NEED_DATA` itself, so either name compares equal with ``is``.
NEED_DATA = h11.NEED_DATA

#: The request methods the relay understands: open a tunnel, or preflight.
METHODS = frozenset({"CONNECT", "OPTIONS"})

#: Where a token was found: ``Proxy-Authorization: Bearer``, ``Authorization:
#: Bearer`` or ``Proxy-Authorization: Basic`` (the password part).
TOKEN_SOURCES = frozenset({"proxy-bearer", "bearer", "proxy-basic"})

#: Default cap on the request head (request line, headers and blank line).
DEFAULT_MAX_HEAD = 8192

# A target name, optionally followed by a port that tools such as curl and
# socat always append (``build42:443``).  The port is accepted and ignored.
_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_RE = re.compile(_NAME_PATTERN)
_TARGET_RE = re.compile(rf"(?P<name>{_NAME_PATTERN})(?::[0-9]{{1,5}})?")

# RFC 9110 section 5.6.2 (token) and RFC 9112 section 3 (request-line).
_TCHAR = r"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_VCHAR = r"[\x21-\x7e]"
_REQUEST_LINE_RE = re.compile(rf"{_TCHAR}+ {_VCHAR}+ HTTP/[0-9]\.[0-9]".encode("ascii"))
# Every prefix of a valid request line (plus its CR) matches this, so a peer
# that is clearly not speaking HTTP (a TLS ClientHello, an SSH banner, random
# bytes) is refused on its first bytes instead of holding the connection until
# the head limit or the handshake timeout.  It is looser than the full check,
# which runs as soon as the first line is complete.
_REQUEST_LINE_PREFIX_RE = re.compile(
    rf"(?:{_TCHAR}+(?: {_VCHAR}*(?: [HTP/0-9.]{{0,8}})?)?)?\r?".encode("ascii")
)
# The blank line that ends a head, as h11 finds it (bare LF tolerated).
_HEAD_END_RE = re.compile(rb"\n\r?\n")

# RFC 9110 section 11.2: credentials = auth-scheme [ 1*SP token68 ].
_CREDENTIALS_RE = re.compile(rf"(?P<scheme>{_TCHAR}+)(?: +(?P<value>\S+))? *")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")

# Header names and values we are willing to write (RFC 9110 section 5.5,
# without obs-text: everything we send is ASCII).
_FIELD_NAME_RE = re.compile(rf"{_TCHAR}+")
_FIELD_VALUE_RE = re.compile(r"(?:[\x21-\x7e](?:[ \t]*[\x21-\x7e])*)?")
_REASON_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REFUSAL_LINE_RE = re.compile(r"(?P<reason>[a-z][a-z0-9_]{0,63}): ?(?P<message>.*)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_MAX_MESSAGE = 200
_PREFIX_CHECK = 256
_NO_HEADERS: Mapping[str, str] = types.MappingProxyType({})
# Framing headers are ours to set; letting callers add them could make the
# peer misread where the head ends (RFC 9110 section 9.3.6 forbids both on a
# 2xx answer to CONNECT).
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
_SESSION_HEADER = "Dbgrelay-Session"
# Stands for the session id in the cached head of a 200 (render_established).
_SESSION_MARK = "dbgrelay-session-id-mark"
# h11 only writes a response once it has read a request (it needs the request
# method to pick the framing), and it only reads a response once it has sent
# one.  The render functions and ResponseParser therefore prime a throwaway
# connection with a canonical request of the right method for this name.
_PRIMER = "dbgrelay"


def _show(value: str | bytes, limit: int = 64) -> str:
    """Quote peer-supplied text for a one-line message, shortened."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    if len(value) > limit:
        value = value[:limit] + "..."
    return repr(value)


def _text(value: bytes) -> str:
    """Decode a header value from the wire without ever failing."""
    return value.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """A complete, well-formed request head: the client wants a tunnel or a preflight.

    The token is only extracted here, not verified; ``repr()`` leaves it out
    so the event can be logged.

    Args:
        method: ``"CONNECT"`` (open a tunnel) or ``"OPTIONS"`` (preflight).
        target: The target name, with any ``:port`` suffix removed.
        token: The bearer token, or ``None`` when no credentials were sent.
        token_source: One of :data:`TOKEN_SOURCES`; ``None`` exactly when
            ``token`` is ``None``.
        host: The ``Host`` header (absent in HTTP/1.0 requests such as socat's).
        user_agent: The ``User-Agent`` header, if any.
        trailing: Bytes the client sent after the head, before reading our
            answer: the first tunnel bytes.  Always empty for ``OPTIONS``.

    Raises:
        LocalProtocolError: A field is invalid (a bug in the caller).
    """

    method: str
    target: str
    token: str | None = field(repr=False)
    token_source: str | None
    host: str | None = None
    user_agent: str | None = None
    trailing: bytes = b""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LocalProtocolError(
                f"TunnelRequested.method must be CONNECT or OPTIONS, got {_show(self.method)}",
                reason="bad_event",
            )
        if not isinstance(self.target, str) or not _NAME_RE.fullmatch(self.target):
            raise LocalProtocolError(
                f"TunnelRequested.target must match {_NAME_PATTERN}, got {_show(str(self.target))}",
                reason="bad_event",
            )
        if (self.token is None) != (self.token_source is None):
            raise LocalProtocolError(
                "TunnelRequested.token and token_source must both be set or both be None",
                reason="bad_event",
            )
        if self.token is not None:
            if not isinstance(self.token, str) or not _TOKEN68_RE.fullmatch(self.token):
                raise LocalProtocolError(
                    "TunnelRequested.token must be a non-empty token68 string",
                    reason="bad_event",
                )
            if self.token_source not in TOKEN_SOURCES:
                raise LocalProtocolError(
                    f"TunnelRequested.token_source must be one of {sorted(TOKEN_SOURCES)}, "
                    f"got {_show(str(self.token_source))}",
                    reason="bad_event",
                )
        for name in ("host", "user_agent"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LocalProtocolError(
                    f"TunnelRequested.{name} must be a str or None", reason="bad_event"
                )
        if not isinstance(self.trailing, bytes):
            raise LocalProtocolError("TunnelRequested.trailing must be bytes", reason="bad_event")
        if self.method == "OPTIONS" and self.trailing:
            raise LocalProtocolError(
                "TunnelRequested.trailing must be empty for OPTIONS", reason="bad_event"
            )


def _bad_request(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason="bad_request", status=400)


def _malformed_auth(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason="malformed_auth", status=400)


def _single_header(request: h11.Request, name: bytes) -> bytes | None:
    values = [value for key, value in request.headers if key == name]
    if len(values) > 1:
        raise _malformed_auth(
            f"request has {len(values)} {name.decode('ascii').title()} headers; send exactly one"
        )
    return values[0] if values else None


def _parse_credentials(header: str, raw: bytes) -> tuple[str, str]:
    """Split ``Scheme value`` and return ``(scheme lower-cased, value)``.

    Messages never quote ``raw``: it is a credential.
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _malformed_auth(
            f"{header} header is not ASCII; send '{header}: Bearer <token>'"
        ) from None
    match = _CREDENTIALS_RE.fullmatch(text)
    if match is None or match["value"] is None:
        raise _malformed_auth(
            f"{header} header is not '<scheme> <credentials>'; send '{header}: Bearer <token>'"
        )
    return match["scheme"].lower(), match["value"]


def _bearer_token(header: str, value: str) -> str:
    if not _TOKEN68_RE.fullmatch(value):
        raise _malformed_auth(
            f"{header}: Bearer credentials are not a token; send the token exactly as issued"
        )
    return value


def _basic_token(value: str) -> str:
    """The password part of ``base64(<anything>:<token>)``."""
    try:
        decoded = base64.b64decode(value, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        raise _malformed_auth(
            "Proxy-Authorization: Basic credentials are not base64 of ASCII "
            "'<user>:<token>'; pass the token as the proxy password"
        ) from None
    user, colon, password = decoded.partition(":")
    if not colon:
        raise _malformed_auth(
            "Proxy-Authorization: Basic credentials have no ':'; "
            "send base64('<user>:<token>') with the token as the password"
        )
    if not _TOKEN68_RE.fullmatch(password):
        raise _malformed_auth(
            "Proxy-Authorization: Basic password is empty or not a token; "
            "pass the token exactly as issued as the proxy password"
        )
    return password


def _extract_token(request: h11.Request) -> tuple[str | None, str | None]:
    """Return ``(token, token_source)``; Proxy-Authorization wins when present."""
    proxy = _single_header(request, b"proxy-authorization")
    plain = _single_header(request, b"authorization")
    if proxy is not None:
        scheme, value = _parse_credentials("Proxy-Authorization", proxy)
        if scheme == "bearer":
            return _bearer_token("Proxy-Authorization", value), "proxy-bearer"
        if scheme == "basic":
            return _basic_token(value), "proxy-basic"
        raise _malformed_auth(
            "Proxy-Authorization scheme is not Bearer or Basic; "
            "send 'Proxy-Authorization: Bearer <token>'"
        )
    if plain is not None:
        scheme, value = _parse_credentials("Authorization", plain)
        if scheme == "bearer":
            return _bearer_token("Authorization", value), "bearer"
        raise _malformed_auth(
            "Authorization scheme is not Bearer; send 'Authorization: Bearer <token>' "
            "or use Proxy-Authorization"
        )
    return None, None


class PreambleParser:
    """Server side: reads one request head from a freshly accepted tunnel.

    Feed bytes with :meth:`receive_data` and call :meth:`next_event` until it
    returns a :class:`TunnelRequested`.  The parser then has done its job:
    later bytes belong to the tunnel and must not be fed to it.  Checks run
    in a fixed order (request line syntax, head size, header syntax, HTTP
    version, method, target, body, credentials), so the outcome does not
    depend on how the bytes were split into chunks.

    Args:
        max_head: Largest request head accepted, in bytes, counting the
            request line, the headers and the blank line.

    Raises:
        LocalProtocolError: ``max_head`` is not a positive integer.
    """

    def __init__(self, *, max_head: int = DEFAULT_MAX_HEAD) -> None:
        if isinstance(max_head, bool) or not isinstance(max_head, int) or max_head <= 0:
            raise LocalProtocolError(
                f"max_head must be a positive number of bytes, got {max_head!r}",
                reason="bad_argument",
            )
        self._max_head = max_head
        self._buffer = bytearray()
        self._closed = False
        self._first_line_ok = False
        # Where the next search for the first LF and for the blank line that
        # ends the head may start, so that a head trickling in one byte at a
        # time costs linear time, as in h11's receive buffer.
        self._line_search_from = 0
        self._head_search_from = 0
        self._finished = False
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the client closed its side.

        Raises:
            LocalProtocolError: Data after end of file, or after the event
                was already returned (those bytes belong to the tunnel).
        """
        if self._finished:
            raise LocalProtocolError(
                "the preamble was already parsed; later bytes belong to the tunnel",
                reason="parser_finished",
            )
        if not data:
            self._closed = True
            return
        if self._closed:
            raise LocalProtocolError("received data after end of file", reason="data_after_eof")
        self._buffer += data

    def next_event(self) -> TunnelRequested | type[h11.NEED_DATA]:
        """Parse what has been received so far.

        Returns:
            A :class:`TunnelRequested` once the head is complete and valid,
            otherwise :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: The client sent something we refuse; its
                ``reason`` and ``status`` are meant for :func:`render_refusal`.
                Calling again raises the same error.
            LocalProtocolError: Called again after returning the event.
        """
        if self._error is not None:
            raise self._error
        if self._finished:
            raise LocalProtocolError(
                "the preamble was already returned; call next_event() only until it is",
                reason="parser_finished",
            )
        try:
            event = self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if event is not NEED_DATA:
            self._finished = True
            self._buffer = bytearray()
        return event

    def _check_first_line(self) -> None:
        if self._first_line_ok:
            return
        end = self._buffer.find(b"\n", self._line_search_from)
        if end == -1:
            self._line_search_from = len(self._buffer)
            # Any prefix of a viable line is viable, so looking at a bounded
            # prefix keeps this cheap without refusing anything valid.
            if not _REQUEST_LINE_PREFIX_RE.fullmatch(self._buffer[:_PREFIX_CHECK]):
                raise self._not_http()
            return
        line = bytes(self._buffer[:end])
        if line.endswith(b"\r"):
            line = line[:-1]
        if not _REQUEST_LINE_RE.fullmatch(line):
            raise self._not_http()
        self._first_line_ok = True

    def _not_http(self) -> RemoteProtocolError:
        if self._buffer[:1] == b"\x16":
            return _bad_request(
                "client sent a TLS handshake where the request head belongs; "
                "the connector must speak HTTP inside one TLS layer, not TLS twice"
            )
        return _bad_request(
            "request line is not 'METHOD <target> HTTP/1.1'; send 'CONNECT <name> HTTP/1.1'"
        )

    def _next_event(self) -> TunnelRequested | type[h11.NEED_DATA]:
        self._check_first_line()
        match = _HEAD_END_RE.search(self._buffer, self._head_search_from)
        if match is None:
            self._head_search_from = max(0, len(self._buffer) - 2)
        head_len = match.end() if match else len(self._buffer)
        if head_len > self._max_head:
            raise RemoteProtocolError(
                f"request head is larger than {self._max_head} bytes; send only the "
                "request line, Host and the credentials",
                reason="head_too_large",
                status=400,
            )
        if match is None:
            if self._closed:
                what = "before the request head" if not self._buffer else "in the request head"
                raise RemoteProtocolError(
                    f"client closed the connection {what}; "
                    "send a complete head ending with a blank line",
                    reason="incomplete_request",
                    status=400,
                )
            return NEED_DATA
        return self._parse_head()

    def _parse_head(self) -> TunnelRequested:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        conn.receive_data(bytes(self._buffer))
        if self._closed:
            conn.receive_data(b"")
        try:
            request = conn.next_event()
        except h11.RemoteProtocolError:
            # h11's message quotes the offending line, which may carry a
            # credential, so it is neither chained nor repeated here.
            raise _explain_bad_head(bytes(self._buffer)) from None
        assert isinstance(request, h11.Request)  # the head is complete
        if request.http_version not in (b"1.0", b"1.1"):
            raise _bad_request(
                f"HTTP version {request.http_version.decode('ascii')} is not supported; "
                "send HTTP/1.1"
            )
        method = request.method.decode("ascii")
        if method not in METHODS:
            raise RemoteProtocolError(
                f"method {_show(method)} is not allowed; use CONNECT to open a tunnel "
                "or OPTIONS to check a token",
                reason="method_not_allowed",
                status=405,
            )
        target_match = _TARGET_RE.fullmatch(request.target.decode("ascii"))
        if target_match is None:
            raise RemoteProtocolError(
                f"request target {_show(request.target)} is not a target name; send "
                f"'{method} <name>[:port] HTTP/1.1' with name matching {_NAME_PATTERN}",
                reason="bad_target",
                status=400,
            )
        for name, value in request.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and int(value) > 0):
                raise _bad_request(
                    f"{method} request carries a body ({name.decode('ascii')}); send the head only"
                )
        token, token_source = _extract_token(request)
        try:
            end = conn.next_event()
        except h11.RemoteProtocolError:  # pragma: no cover - no body was announced
            raise _bad_request("request body framing is invalid; send the head only") from None
        assert isinstance(end, h11.EndOfMessage)
        trailing, _ = conn.trailing_data
        if method == "OPTIONS" and trailing:
            raise _bad_request(
                "bytes followed the OPTIONS request; a preflight connection answers "
                "exactly one request"
            )
        host = _single_value(request, b"host")
        user_agent = _single_value(request, b"user-agent")
        return TunnelRequested(
            method=method,
            target=target_match["name"],
            token=token,
            token_source=token_source,
            host=host,
            user_agent=user_agent,
            trailing=trailing,
        )


def _explain_bad_head(data: bytes) -> RemoteProtocolError:
    """Say why h11 refused a complete head, without quoting any header value."""
    head = data[: _HEAD_END_RE.search(data).start()]
    lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    names = [line.partition(b":")[0].strip().lower() for line in lines[1:]]
    if b"transfer-encoding" in names:
        return _bad_request("request carries a body (transfer-encoding); send the head only")
    hosts = names.count(b"host")
    if hosts > 1:
        return _bad_request(f"request has {hosts} Host headers; send exactly one")
    if hosts == 0 and lines[0].endswith(b"HTTP/1.1"):
        return _bad_request("HTTP/1.1 request has no Host header; send 'Host: <name>'")
    return _bad_request(
        "request head has a malformed header line; send 'Name: value' lines "
        "ending with a blank line"
    )


def _single_value(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return _text(value)
    return None


def _check_headers(headers: Mapping[str, str], reserved: frozenset[str]) -> list[tuple[str, str]]:
    """Validate extra response or request headers before handing them to h11."""
    seen: set[str] = set()
    out = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
            raise LocalProtocolError(
                f"header name {_show(str(name))} is not an HTTP token", reason="bad_header"
            )
        lower = name.lower()
        if lower in reserved:
            raise LocalProtocolError(
                f"header {name} is set by the preamble renderer and cannot be overridden",
                reason="bad_header",
            )
        if lower in seen:
            raise LocalProtocolError(f"header {name} is given twice", reason="bad_header")
        seen.add(lower)
        if not isinstance(value, str) or not _FIELD_VALUE_RE.fullmatch(value):
            raise LocalProtocolError(
                f"header {name} value must be printable ASCII without CR/LF or "
                "surrounding whitespace",
                reason="bad_header",
            )
        out.append((name, value))
    return out


def _primed_server(method: str) -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(f"{method} {_PRIMER} HTTP/1.1\r\nHost: {_PRIMER}\r\n\r\n".encode("ascii"))
    conn.next_event()  # the Request
    conn.next_event()  # its EndOfMessage
    return conn


def _sanitize_message(message: str) -> str:
    return _CONTROL_RE.sub(" ", str(message))[:_MAX_MESSAGE]


def render_refusal(
    status: int, reason: str, message: str, *, headers: Mapping[str, str] = _NO_HEADERS
) -> bytes:
    """Render a complete refusal: status line, headers and a one-line body.

    The body is ``"<reason>: <message>\\n"``.  Control characters in
    ``message`` (CR and LF included) become spaces, so a message built from
    peer input cannot add headers or lines; it is cut at 200 characters.

    Args:
        status: An HTTP error status with a standard phrase (400 to 599).
        reason: The machine-readable code, such as ``"bad_target"``.
        message: A short explanation for the person at the other end.
        headers: Extra headers, such as ``Retry-After`` on a 429; framing
            headers cannot be overridden.

    Returns:
        The response bytes, ending with ``Connection: close`` framing.

    Raises:
        LocalProtocolError: ``status`` or ``reason`` is invalid.
    """
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = None
    if isinstance(status, bool) or phrase is None or not 400 <= status <= 599:
        raise LocalProtocolError(
            f"refusal status must be a standard 4xx or 5xx code, got {status!r}",
            reason="bad_argument",
        )
    if not isinstance(reason, str) or not _REASON_CODE_RE.fullmatch(reason):
        raise LocalProtocolError(
            f"refusal reason must match {_REASON_CODE_RE.pattern}, got {_show(str(reason))}",
            reason="bad_argument",
        )
    extra = _check_headers(headers, _FRAMING_HEADERS | {"content-type"})
    body = f"{reason}: {_sanitize_message(message)}\n".encode()
    conn = _primed_server("CONNECT")
    head = conn.send(
        h11.Response(
            status_code=status,
            reason=phrase,
            headers=[
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                *extra,
            ],
        )
    )
    return head + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())


def render_established(*, session_id: str, headers: Mapping[str, str] = _NO_HEADERS) -> bytes:
    """Render the ``200 Connection established`` answer to a ``CONNECT``.

    The answer has no body: the next byte on the wire is tunnel data.

    Args:
        session_id: Written as the ``Dbgrelay-Session`` header.
        headers: Extra headers; framing headers and ``Dbgrelay-Session``
            cannot be overridden.

    Returns:
        The response head.

    Raises:
        LocalProtocolError: A header name or value is invalid.
    """
    if not isinstance(session_id, str) or not session_id:
        raise LocalProtocolError("session_id must be a non-empty str", reason="bad_argument")
    _check_headers({_SESSION_HEADER: session_id}, _FRAMING_HEADERS)
    extra = _check_headers(headers, _FRAMING_HEADERS | {_SESSION_HEADER.lower()})
    before, after = _established_head(tuple(extra))
    return before + session_id.encode("ascii") + after


@functools.lru_cache(maxsize=16)
def _established_head(extra: tuple[tuple[str, str], ...]) -> tuple[bytes, bytes]:
    """The ``200`` head h11 renders with ``extra``, split where the session id goes.

    Rendering through h11 costs a connection and a parsed request each time
    (a few percent of a tunnel's set-up); every tunnel's head differs from
    the last only in the session id, a checked header value that h11 writes
    as it is.  The split is at the session header's own line, which no extra
    header can repeat (the name is reserved, and no value holds CR or LF).
    """
    head = _render_established([(_SESSION_HEADER, _SESSION_MARK), *extra])
    name = f"\r\n{_SESSION_HEADER}: ".encode("ascii")
    line = name + _SESSION_MARK.encode("ascii") + b"\r\n"
    before, found, after = head.partition(line)
    if not found or line in after:
        raise AssertionError(f"h11 did not render {line!r} once")
    return before + name, b"\r\n" + after


def _render_established(headers: list[tuple[str, str]]) -> bytes:
    conn = _primed_server("CONNECT")
    # A 2xx to CONNECT switches h11 to SWITCHED_PROTOCOL: it writes the head
    # only and adds no framing headers (RFC 9110 section 9.3.6).
    return conn.send(
        h11.Response(status_code=200, reason="Connection established", headers=headers)
    )


def render_preflight(*, headers: Mapping[str, str]) -> bytes:
    """Render the ``200 OK`` answer to an ``OPTIONS`` preflight.

    Args:
        headers: Headers such as ``Dbgrelay-Target-Kind``; framing headers are
            set here (``Content-Length: 0`` and ``Connection: close``, since
            a preflight connection answers one request).

    Returns:
        The complete response.

    Raises:
        LocalProtocolError: A header name or value is invalid.
    """
    extra = _check_headers(headers, _FRAMING_HEADERS)
    conn = _primed_server("OPTIONS")
    head = conn.send(
        h11.Response(
            status_code=200,
            reason="OK",
            headers=[*extra, ("Content-Length", "0"), ("Connection", "close")],
        )
    )
    return head + conn.send(h11.EndOfMessage())


def render_request(
    *,
    method: str,
    target: str,
    token: str,
    host: str | None = None,
    user_agent: str = "dbgrelay-connect",
) -> bytes:
    """Render the client's request head (connector side).

    Args:
        method: ``"CONNECT"`` or ``"OPTIONS"``.
        target: The target name, optionally with ``:port``.
        token: The token, sent as ``Proxy-Authorization: Bearer <token>``.
        host: The ``Host`` header; defaults to ``target``.
        user_agent: The ``User-Agent`` header.

    Returns:
        The request head, ending with the blank line.

    Raises:
        LocalProtocolError: An argument is invalid.  The message never
            quotes the token.
    """
    return _render_request(method, target, token, host, user_agent)


# A connector sends the same head for every tunnel until its token changes:
# rendered once, it costs no h11 connection per tunnel.
@functools.lru_cache(maxsize=4)
def _render_request(
    method: str, target: str, token: str, host: str | None, user_agent: str
) -> bytes:
    if method not in METHODS:
        raise LocalProtocolError(
            f"method must be CONNECT or OPTIONS, got {_show(str(method))}", reason="bad_argument"
        )
    if not isinstance(target, str) or not _TARGET_RE.fullmatch(target):
        raise LocalProtocolError(
            f"target must be a name matching {_NAME_PATTERN} with an optional :port, "
            f"got {_show(str(target))}",
            reason="bad_argument",
        )
    if not isinstance(token, str) or not _TOKEN68_RE.fullmatch(token):
        raise LocalProtocolError(
            "token is empty or contains characters a token cannot have; "
            "use the token exactly as issued",
            reason="bad_argument",
        )
    headers = _check_headers(
        {"Host": target if host is None else host, "User-Agent": user_agent}, frozenset()
    )
    headers.append(("Proxy-Authorization", f"Bearer {token}"))
    conn = h11.Connection(h11.CLIENT)
    return conn.send(h11.Request(method=method, target=target, headers=headers))


@dataclass(frozen=True, slots=True)
class TunnelResponse:
    """The relay's answer, as the connector sees it.

    Args:
        status: The HTTP status code.
        reason: For a refusal, the code before ``":"`` in its body
            (``"bad_target"``); otherwise ``None``.
        message: For a refusal, the rest of the body's first line (or the
            whole line when it has no code); otherwise ``None``.
        headers: Response headers with lower-cased names; repeated headers
            are joined with ``", "``.
        trailing: Bytes after the response.  After a 200 to ``CONNECT`` these
            are the first tunnel bytes.

    Raises:
        LocalProtocolError: A field is invalid (a bug in the caller).
    """

    status: int
    reason: str | None
    message: str | None
    headers: Mapping[str, str]
    trailing: bytes = b""

    def __post_init__(self) -> None:
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise LocalProtocolError("TunnelResponse.status must be an int", reason="bad_event")
        if not 200 <= self.status <= 599:
            raise LocalProtocolError(
                f"TunnelResponse.status must be a final status (200-599), got {self.status}",
                reason="bad_event",
            )
        if self.reason is not None and not _REASON_CODE_RE.fullmatch(self.reason):
            raise LocalProtocolError(
                f"TunnelResponse.reason must match {_REASON_CODE_RE.pattern}", reason="bad_event"
            )
        if any(name != name.lower() for name in self.headers):
            raise LocalProtocolError(
                "TunnelResponse.headers names must be lower-case", reason="bad_event"
            )
        if not isinstance(self.trailing, bytes):
            raise LocalProtocolError("TunnelResponse.trailing must be bytes", reason="bad_event")


def _bad_response(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason="bad_response", status=502)


class ResponseParser:
    """Connector side: reads the relay's answer to one request.

    For a 2xx answer to ``CONNECT`` the event comes as soon as the head is
    complete; for anything else :meth:`next_event` waits for the whole body
    (a refusal is one short line).

    Args:
        method: The method of the request that was sent.
        max_head: Largest response head accepted, in bytes.  Bodies beyond
            this size are read but not kept.

    Raises:
        LocalProtocolError: An argument is invalid.
    """

    def __init__(self, *, method: str = "CONNECT", max_head: int = DEFAULT_MAX_HEAD) -> None:
        if method not in METHODS:
            raise LocalProtocolError(
                f"method must be CONNECT or OPTIONS, got {_show(str(method))}",
                reason="bad_argument",
            )
        if isinstance(max_head, bool) or not isinstance(max_head, int) or max_head <= 0:
            raise LocalProtocolError(
                f"max_head must be a positive number of bytes, got {max_head!r}",
                reason="bad_argument",
            )
        self._max_body = max_head
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self._conn.send(h11.Request(method=method, target=_PRIMER, headers=[("Host", _PRIMER)]))
        self._conn.send(h11.EndOfMessage())
        self._max_head = max_head
        # Bytes fed to h11 and bytes it has consumed as response heads: h11
        # only enforces its limit while a head is incomplete, so a complete
        # oversized head in one chunk is measured here instead.
        self._received = 0
        self._head_end = 0
        self._response: h11.Response | None = None
        self._body = bytearray()
        self._finished = False
        self._closed = False
        self._error: RemoteProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the relay closed its side.

        Raises:
            LocalProtocolError: Data after end of file, or after the event
                was already returned.
        """
        if self._finished:
            raise LocalProtocolError(
                "the response was already parsed; later bytes belong to the tunnel",
                reason="parser_finished",
            )
        if data and self._closed:
            raise LocalProtocolError("received data after end of file", reason="data_after_eof")
        if not data:
            self._closed = True
        self._received += len(data)
        self._conn.receive_data(data)

    def next_event(self) -> TunnelResponse | type[h11.NEED_DATA]:
        """Parse what has been received so far.

        Returns:
            A :class:`TunnelResponse`, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: The answer is not valid HTTP (reason
                ``bad_response``, status 502).  Calling again raises it again.
            LocalProtocolError: Called again after returning the event.
        """
        if self._error is not None:
            raise self._error
        if self._finished:
            raise LocalProtocolError(
                "the response was already returned; call next_event() only until it is",
                reason="parser_finished",
            )
        try:
            event = self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if event is not NEED_DATA:
            self._finished = True
        return event

    def _next_event(self) -> TunnelResponse | type[h11.NEED_DATA]:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._response is None and self._closed:
                    raise _bad_response(
                        "relay closed the connection before a complete response head"
                    ) from exc
                if self._response is None:
                    raise _bad_response(f"relay sent an invalid response head: {exc}") from exc
                raise _bad_response(f"relay sent an invalid response body: {exc}") from exc
            if event is NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.InformationalResponse | h11.Response):
                self._check_head_size()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                self._response = event
                if self._conn.their_state is h11.SWITCHED_PROTOCOL:
                    return self._finish()
                continue
            if isinstance(event, h11.Data):
                room = self._max_body - len(self._body)
                self._body += event.data[: max(room, 0)]
                continue
            if isinstance(event, h11.EndOfMessage):
                return self._finish()
            raise _bad_response(  # pragma: no cover - h11 raises before this
                f"unexpected {type(event).__name__} while reading the response"
            )

    def _check_head_size(self) -> None:
        head_end = self._received - len(self._conn.trailing_data[0])
        if head_end - self._head_end > self._max_head:
            raise _bad_response(f"relay sent a response head larger than {self._max_head} bytes")
        self._head_end = head_end

    def _finish(self) -> TunnelResponse:
        response = self._response
        assert response is not None
        headers: dict[str, str] = {}
        for name, value in response.headers:
            key = name.decode("ascii")
            headers[key] = f"{headers[key]}, {_text(value)}" if key in headers else _text(value)
        reason = message = None
        if not 200 <= response.status_code < 300:
            line = _text(bytes(self._body)).split("\n", 1)[0].rstrip("\r")
            match = _REFUSAL_LINE_RE.fullmatch(line)
            if match is not None:
                reason, message = match["reason"], match["message"][:_MAX_MESSAGE]
            elif line:
                message = line[:_MAX_MESSAGE]
        trailing, _ = self._conn.trailing_data
        return TunnelResponse(
            status=response.status_code,
            reason=reason,
            message=message,
            headers=types.MappingProxyType(headers),
            trailing=trailing,
        )
