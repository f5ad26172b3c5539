"""Tests for the sans-IO tunnel preamble: literal bytes in, events or errors out."""

from __future__ import annotations

import base64
import random

import h11
import pytest

from relay.errors import LocalProtocolError, RemoteProtocolError
from relay.preamble import (
    NEED_DATA,
    PreambleParser,
    ResponseParser,
    TunnelRequested,
    TunnelResponse,
    render_established,
    render_preflight,
    render_refusal,
    render_request,
)

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
OTHER = "b3RoZXI.dG9rZW4.c2ln"
CLIENT_HELLO = (
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    + bytes(range(32))
    + b"\x20"
    + bytes(32)
    + b"\x00\x20\x13\x01\x13\x02"
)

CONNECT = (
    b"CONNECT build42 HTTP/1.1\r\n"
    b"Host: build42\r\n"
    b"User-Agent: dbgrelay-connect\r\n"
    b"Proxy-Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    b"\r\n"
)


def basic(credentials: str) -> bytes:
    return base64.b64encode(credentials.encode())


def parse(data: bytes, *, eof: bool = False, max_head: int = 8192):
    """Feed one chunk (and optionally EOF); return the event or raise."""
    parser = PreambleParser(max_head=max_head)
    parser.receive_data(data)
    if eof:
        parser.receive_data(b"")
    return parser.next_event()


def refusal_of(data: bytes, **kwargs) -> tuple[str, int]:
    with pytest.raises(RemoteProtocolError) as info:
        parse(data, **kwargs)
    return info.value.reason, info.value.status


def run(chunks: list[bytes], *, eof: bool = False, max_head: int = 8192):
    """Feed chunks one by one, calling next_event() after each, like the I/O layer.

    Returns ``(event, later)`` where ``later`` is what arrived after the event
    (tunnel bytes the I/O layer would pump), or ``(error, b"")``.
    """
    parser = PreambleParser(max_head=max_head)
    event = NEED_DATA
    for index, chunk in enumerate(chunks):
        if chunk:  # b"" would mean EOF; a socket never yields an empty chunk otherwise
            parser.receive_data(chunk)
        try:
            event = parser.next_event()
        except RemoteProtocolError as exc:
            return exc, b""
        if event is not NEED_DATA:
            return event, b"".join(chunks[index + 1 :])
    if eof:
        parser.receive_data(b"")
        try:
            event = parser.next_event()
        except RemoteProtocolError as exc:
            return exc, b""
    return event, b""


def splits(data: bytes):
    """Every two-chunk split, plus one byte at a time."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i : i + 1] for i in range(len(data))]


# --- accepted requests -------------------------------------------------------


def test_connect_with_proxy_bearer():
    event = parse(CONNECT)
    assert event == TunnelRequested(
        method="CONNECT",
        target="build42",
        token=TOKEN,
        token_source="proxy-bearer",
        host="build42",
        user_agent="dbgrelay-connect",
        trailing=b"",
    )


def test_authorization_bearer():
    event = parse(
        b"CONNECT t1 HTTP/1.1\r\nHost: t1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    )
    assert (event.token, event.token_source, event.user_agent) == (TOKEN, "bearer", None)


def test_proxy_basic_password_is_the_token():
    # What `curl --proxytunnel --proxy-user x:TOKEN` sends.
    data = (
        b"CONNECT build42:443 HTTP/1.1\r\nHost: build42:443\r\n"
        b"Proxy-Authorization: Basic " + basic(f"x:{TOKEN}") + b"\r\n"
        b"User-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
    )
    event = parse(data)
    assert (event.target, event.token, event.token_source) == ("build42", TOKEN, "proxy-basic")
    assert (event.host, event.user_agent) == ("build42:443", "curl/8.5.0")


def test_socat_http10_request_without_host_is_accepted():
    # socat's PROXY address sends HTTP/1.0 with no Host header.
    data = (
        b"CONNECT build42:9999 HTTP/1.0\r\n"
        b"Proxy-authorization: Basic " + basic(f"user:{TOKEN}") + b"\r\n\r\n"
    )
    event = parse(data)
    assert (event.method, event.target, event.host) == ("CONNECT", "build42", None)
    assert (event.token, event.token_source) == (TOKEN, "proxy-basic")


def test_basic_user_part_may_be_empty_and_password_split_at_first_colon():
    event = parse(
        b"CONNECT a HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic "
        + basic(f":{TOKEN}")
        + b"\r\n\r\n"
    )
    assert event.token == TOKEN


@pytest.mark.parametrize(
    ("proxy", "plain", "expected"),
    [
        (b"Bearer " + TOKEN.encode(), b"Bearer " + OTHER.encode(), (TOKEN, "proxy-bearer")),
        (b"Basic " + basic(f"u:{TOKEN}"), b"Bearer " + OTHER.encode(), (TOKEN, "proxy-basic")),
    ],
)
def test_proxy_authorization_wins_over_authorization(proxy, plain, expected):
    for order in (
        (b"Authorization", plain, b"Proxy-Authorization", proxy),
        (b"Proxy-Authorization", proxy, b"Authorization", plain),
    ):
        data = b"CONNECT a HTTP/1.1\r\nHost: a\r\n%s: %s\r\n%s: %s\r\n\r\n" % order
        event = parse(data)
        assert (event.token, event.token_source) == expected


@pytest.mark.parametrize("scheme", [b"bearer", b"BEARER", b"BeArEr"])
def test_bearer_scheme_is_case_insensitive(scheme):
    event = parse(
        b"CONNECT a HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
        + scheme
        + b" "
        + TOKEN.encode()
        + b"\r\n\r\n"
    )
    assert event.token == TOKEN


@pytest.mark.parametrize("scheme", [b"basic", b"BASIC"])
def test_basic_scheme_is_case_insensitive(scheme):
    event = parse(
        b"CONNECT a HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
        + scheme
        + b" "
        + basic(f"u:{TOKEN}")
        + b"\r\n\r\n"
    )
    assert event.token_source == "proxy-basic"


def test_no_credentials_gives_no_token():
    event = parse(b"CONNECT a HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (event.token, event.token_source) == (None, None)


def test_content_length_zero_is_not_a_body():
    event = parse(b"CONNECT a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nxy")
    assert event.trailing == b"xy"


def test_bare_lf_line_endings_are_tolerated():
    event = parse(b"CONNECT a HTTP/1.1\nHost: a\nAuthorization: Bearer " + TOKEN.encode() + b"\n\n")
    assert (event.target, event.token) == ("a", TOKEN)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"build42", "build42"),
        (b"build42:443", "build42"),
        (b"b:1", "b"),
        (b"Win-11_x64.lab", "Win-11_x64.lab"),
        (b"a" * 64, "a" * 64),
        (b"9", "9"),
    ],
)
def test_target_names_and_port_is_stripped(raw, name):
    assert parse(b"CONNECT " + raw + b" HTTP/1.1\r\nHost: x\r\n\r\n").target == name


def test_options_preflight():
    event = parse(
        b"OPTIONS build42 HTTP/1.1\r\nHost: build42\r\nProxy-Authorization: Bearer "
        + TOKEN.encode()
        + b"\r\n\r\n"
    )
    assert (event.method, event.target, event.token, event.trailing) == (
        "OPTIONS",
        "build42",
        TOKEN,
        b"",
    )


def test_options_with_port_and_no_token():
    event = parse(b"OPTIONS build42:9 HTTP/1.1\r\nHost: build42\r\n\r\n")
    assert (event.method, event.target, event.token) == ("OPTIONS", "build42", None)


def test_repr_never_shows_the_token():
    assert TOKEN not in repr(parse(CONNECT))


# --- trailing bytes ---------------------------------------------------------


def test_trailing_bytes_in_the_same_chunk():
    event = parse(CONNECT + b"\x00dbgsrv hello\r\n\r\nGET / HTTP/1.1\r\n")
    assert event.trailing == b"\x00dbgsrv hello\r\n\r\nGET / HTTP/1.1\r\n"


def test_trailing_bytes_in_a_later_chunk_before_next_event():
    parser = PreambleParser()
    parser.receive_data(CONNECT[:-1])
    assert parser.next_event() is NEED_DATA
    parser.receive_data(CONNECT[-1:])
    parser.receive_data(b"+$qSupported#37")
    assert parser.next_event().trailing == b"+$qSupported#37"


def test_trailing_bytes_then_eof_still_give_the_event():
    event = parse(CONNECT + b"last words", eof=True)
    assert event.trailing == b"last words"


def test_eof_right_after_a_complete_head_gives_the_event():
    assert parse(CONNECT, eof=True).trailing == b""


@pytest.mark.parametrize("trailing", [b"", b"\x16\x03\x01 tunnel bytes\r\n\r\n"])
def test_request_split_at_every_byte_boundary(trailing):
    expected = parse(CONNECT + trailing)
    for chunks in splits(CONNECT + trailing):
        event, later = run(chunks)
        assert event.method == expected.method
        assert event.target == expected.target
        assert event.token == expected.token
        assert event.host == expected.host
        assert event.user_agent == expected.user_agent
        assert event.trailing + later == trailing


def test_the_event_arrives_exactly_when_the_blank_line_completes():
    parser = PreambleParser()
    for byte in CONNECT[:-1]:
        parser.receive_data(bytes([byte]))
        assert parser.next_event() is NEED_DATA
    parser.receive_data(CONNECT[-1:])
    assert isinstance(parser.next_event(), TunnelRequested)


# --- refusals ---------------------------------------------------------------

HOST = b"Host: a\r\n"

REFUSALS = [
    # (request bytes, eof, reason, status)
    (b"GET / HTTP/1.1\r\n" + HOST + b"\r\n", False, "method_not_allowed", 405),
    (b"POST a HTTP/1.1\r\n" + HOST + b"\r\n", False, "method_not_allowed", 405),
    (b"connect a HTTP/1.1\r\n" + HOST + b"\r\n", False, "method_not_allowed", 405),
    (b"DELETE a:1 HTTP/1.1\r\n" + HOST + b"\r\n", False, "method_not_allowed", 405),
    (b"CONNECT /path HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT http://a/ HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT -a HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT .a HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT " + b"a" * 65 + b" HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT a:http HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT a: HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT a:123456 HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT [::1]:22 HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (b"CONNECT a/b HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_target", 400),
    (
        b"CONNECT a HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello",
        False,
        "bad_request",
        400,
    ),
    (
        b"CONNECT a HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        False,
        "bad_request",
        400,
    ),
    (
        b"CONNECT a HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\n",
        False,
        "bad_request",
        400,
    ),
    (b"OPTIONS a HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\n\r\nx", False, "bad_request", 400),
    (b"CONNECT a HTTP/1.1\r\n" + HOST + b"Content-Length: x\r\n\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/2.0\r\n" + HOST + b"\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/0.9\r\n" + HOST + b"\r\n", False, "bad_request", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/1.1\r\n\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/1.1\r\n" + HOST + HOST + b"\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/1.1\r\n" + HOST + b"No colon here\r\n\r\n", False, "bad_request", 400),
    (b"CONNECT  a HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/1.1 extra\r\n" + HOST + b"\r\n", False, "bad_request", 400),
    (b"CONNECT a\r\n" + HOST + b"\r\n", False, "bad_request", 400),
    (b"\r\nCONNECT a HTTP/1.1\r\n" + HOST + b"\r\n", False, "bad_request", 400),
    (b"SSH-2.0-OpenSSH_9.6\r\n", False, "bad_request", 400),
    (CLIENT_HELLO, False, "bad_request", 400),
    (b"\x00\x01\x02\x03", False, "bad_request", 400),
    (b"CONN\xc3\xa9CT a HTTP/1.1\r\n", False, "bad_request", 400),
    (b"CONNECT a HTTP/1.1\r\n" + HOST, True, "incomplete_request", 400),
    (b"CONNECT a HTTP/1.1", True, "incomplete_request", 400),
    (b"", True, "incomplete_request", 400),
    (
        b"CONNECT a HTTP/1.1\r\n" + HOST + b"X-Pad: " + b"p" * 9000 + b"\r\n\r\n",
        False,
        "head_too_large",
        400,
    ),
    (b"CONNECT " + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", False, "head_too_large", 400),
    (b"CONNECT a HTTP/1.1\r\n" + HOST + b"X-Pad: " + b"p" * 9000, True, "head_too_large", 400),
]

AUTH = b"CONNECT a HTTP/1.1\r\nHost: a\r\n"
MALFORMED_AUTH = [
    b"Proxy-Authorization: Basic !!!not-base64!!!\r\n",
    b"Proxy-Authorization: Basic " + basic(f"x:{TOKEN}")[:-2] + b"\r\n",  # padding cut
    b"Proxy-Authorization: Basic " + basic(TOKEN) + b"\r\n",  # no colon
    b"Proxy-Authorization: Basic " + basic("x:") + b"\r\n",  # empty password
    b"Proxy-Authorization: Basic " + basic("x:has space") + b"\r\n",
    b"Proxy-Authorization: Basic " + base64.b64encode("x:t\u00f6ken".encode()) + b"\r\n",
    b"Proxy-Authorization: Basic\r\n",
    b"Proxy-Authorization: Bearer\r\n",
    b"Proxy-Authorization:\r\n",
    b"Proxy-Authorization: Bearer a b\r\n",
    b"Proxy-Authorization: Bearer t\xc3\xb6ken\r\n",
    b"Proxy-Authorization: Negotiate YIIC\r\n",
    b"Authorization: Basic " + basic(f"x:{TOKEN}") + b"\r\n",
    b"Authorization: Bearer\r\n",
    b"Authorization: Bearer "
    + TOKEN.encode()
    + b"\r\nAuthorization: Bearer "
    + OTHER.encode()
    + b"\r\n",
    b"Proxy-Authorization: Bearer "
    + TOKEN.encode()
    + b"\r\nProxy-Authorization: Bearer "
    + TOKEN.encode()
    + b"\r\n",
    # Proxy-Authorization wins even when broken: no silent fallback.
    b"Proxy-Authorization: Basic ???\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n",
]
REFUSALS += [(AUTH + header + b"\r\n", False, "malformed_auth", 400) for header in MALFORMED_AUTH]


@pytest.mark.parametrize(("data", "eof", "reason", "status"), REFUSALS)
def test_refusal_in_one_chunk(data, eof, reason, status):
    assert refusal_of(data, eof=eof) == (reason, status)


@pytest.mark.parametrize(("data", "eof", "reason", "status"), REFUSALS)
def test_refusal_does_not_depend_on_how_bytes_are_split(data, eof, reason, status):
    cuts = range(len(data) + 1) if len(data) < 300 else range(0, len(data) + 1, 97)
    for cut in cuts:
        error, _ = run([data[:cut], data[cut:]], eof=eof)
        assert isinstance(error, RemoteProtocolError), cut
        assert (error.reason, error.status) == (reason, status), cut


def test_second_request_after_options_is_refused():
    # A preflight answers one request per connection.  Only bytes that are
    # already buffered with the head can be seen here; later ones are the I/O
    # layer's to discard when it closes the connection after the answer.
    second = b"CONNECT a HTTP/1.1\r\n" + HOST + b"\r\n"
    assert refusal_of(b"OPTIONS a HTTP/1.1\r\n" + HOST + b"\r\n" + second) == ("bad_request", 400)
    assert refusal_of(b"OPTIONS a HTTP/1.1\r\n" + HOST + b"\r\nx") == ("bad_request", 400)


def test_client_hello_is_refused_on_its_first_byte():
    parser = PreambleParser()
    parser.receive_data(CLIENT_HELLO[:1])
    with pytest.raises(RemoteProtocolError, match="TLS handshake") as info:
        parser.next_event()
    assert info.value.reason == "bad_request"


def test_non_http_first_line_is_refused_before_the_head_ends():
    parser = PreambleParser()
    parser.receive_data(b"SSH-2.0-OpenSSH_9.6\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        parser.next_event()
    assert info.value.reason == "bad_request"


def test_head_of_exactly_max_head_is_accepted_and_one_more_byte_is_not():
    head = b"CONNECT a HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    pad = 100 - len(head)
    fits = head.replace(b"X: ", b"X: " + b"p" * pad)
    assert len(fits) == 100
    assert parse(fits + b"tail", max_head=100).trailing == b"tail"
    too_big = fits.replace(b"X: ", b"X: p")
    for cut in range(len(too_big) + 1):
        error, _ = run([too_big[:cut], too_big[cut:]], max_head=100)
        assert error.reason == "head_too_large"


def test_large_trailing_data_does_not_count_against_the_head():
    assert len(parse(CONNECT + bytes(100_000), max_head=len(CONNECT)).trailing) == 100_000


def test_oversized_incomplete_head_is_refused_without_waiting_for_eof():
    parser = PreambleParser(max_head=64)
    parser.receive_data(b"CONNECT a HTTP/1.1\r\nX: " + b"p" * 64)
    with pytest.raises(RemoteProtocolError) as info:
        parser.next_event()
    assert info.value.reason == "head_too_large"


def test_partial_head_needs_data():
    parser = PreambleParser()
    parser.receive_data(b"CONNECT a HTTP/1.1\r\nHost: a\r\n")
    assert parser.next_event() is NEED_DATA
    assert parser.next_event() is NEED_DATA


def test_eof_mid_head():
    parser = PreambleParser()
    parser.receive_data(b"CONNECT a HTTP/1.1\r\nHo")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed the connection") as info:
        parser.next_event()
    assert (info.value.reason, info.value.status) == ("incomplete_request", 400)


def test_error_messages_never_quote_credentials():
    secret = "s3cr3t.t0k3n.value"
    bad_header_line = AUTH + b"Proxy-Authorization : Bearer " + secret.encode() + b"\r\n\r\n"
    bad_basic = AUTH + b"Proxy-Authorization: Basic " + secret.encode() + b"\r\n\r\n"
    spaced = AUTH + b"Authorization: Bearer " + secret.encode() + b" x\r\n\r\n"
    for data in (bad_header_line, bad_basic, spaced):
        with pytest.raises(RemoteProtocolError) as info:
            parse(data)
        assert secret not in str(info.value)
        assert info.value.__cause__ is None
        assert "\n" not in str(info.value)


def test_error_is_raised_again_on_later_calls():
    parser = PreambleParser()
    parser.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as first:
        parser.next_event()
    with pytest.raises(RemoteProtocolError) as second:
        parser.next_event()
    assert second.value is first.value


def test_parser_is_done_after_the_event():
    parser = PreambleParser()
    parser.receive_data(CONNECT)
    assert isinstance(parser.next_event(), TunnelRequested)
    with pytest.raises(LocalProtocolError):
        parser.next_event()
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"tunnel bytes belong elsewhere")


def test_data_after_eof_is_a_local_error():
    parser = PreambleParser()
    parser.receive_data(b"CONNECT")
    parser.receive_data(b"")
    parser.receive_data(b"")  # repeated EOF is fine
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b" a HTTP/1.1")


@pytest.mark.parametrize("max_head", [0, -1, 1.5, True, "8192"])
def test_max_head_must_be_a_positive_int(max_head):
    with pytest.raises(LocalProtocolError, match="max_head"):
        PreambleParser(max_head=max_head)


def test_random_bytes_only_give_need_data_or_remote_protocol_error():
    rng = random.Random(20240611)
    reasons = {
        "bad_request",
        "bad_target",
        "method_not_allowed",
        "malformed_auth",
        "head_too_large",
        "incomplete_request",
    }
    seeds = [
        CONNECT,
        b"OPTIONS a:1 HTTP/1.0\r\nProxy-Authorization: Basic " + basic(f"u:{TOKEN}") + b"\r\n\r\n",
    ]
    outcomes = set()
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.4:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(len(data))
                op = rng.random()
                if op < 0.4:
                    data[pos] = rng.getrandbits(8)
                elif op < 0.7:
                    data[pos:pos] = rng.choice(
                        [b"\r\n", b":", b" ", b"\x00", b"\n\n", b"\xff", b"=="]
                    )
                else:
                    del data[pos : pos + rng.randrange(1, 8)]
            data = bytes(data)
        parser = PreambleParser(max_head=rng.choice([64, 8192]))
        cut = rng.randrange(len(data) + 1)
        try:
            chunks = [data[:cut], data[cut:]]
            if rng.random() < 0.5:
                chunks.append(b"")  # EOF
            for chunk in chunks:
                if chunk or chunk is chunks[-1]:
                    parser.receive_data(chunk)
                result = parser.next_event()
                if result is not NEED_DATA:
                    assert isinstance(result, TunnelRequested)
                    outcomes.add("event")
                    break
            else:
                outcomes.add("need_data")
        except RemoteProtocolError as exc:
            assert exc.reason in reasons
            assert exc.status == 400 or (exc.reason, exc.status) == ("method_not_allowed", 405)
            outcomes.add(exc.reason)
    # The loop reached past the first-line check, not only early rejections.
    assert {"event", "bad_request", "head_too_large", "incomplete_request"} <= outcomes


# --- TunnelRequested validation ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "GET"},
        {"target": "build42:443"},
        {"target": "/x"},
        {"token": None},
        {"token_source": None},
        {"token_source": "cookie"},
        {"token": ""},
        {"token": "a b"},
        {"host": b"a"},
        {"trailing": "text"},
        {"method": "OPTIONS", "trailing": b"x"},
    ],
)
def test_tunnel_requested_validates_on_construction(kwargs):
    fields = {
        "method": "CONNECT",
        "target": "a",
        "token": TOKEN,
        "token_source": "bearer",
        "host": "a",
        "user_agent": None,
        "trailing": b"",
    }
    TunnelRequested(**fields)
    with pytest.raises(LocalProtocolError):
        TunnelRequested(**(fields | kwargs))


def test_tunnel_requested_is_frozen():
    event = parse(CONNECT)
    with pytest.raises(AttributeError):
        event.target = "other"


# --- server-side rendering ---------------------------------------------------


def test_render_refusal_exact_bytes():
    body = b"bad_target: request target '/x' is not a target name\n"
    assert render_refusal(400, "bad_target", "request target '/x' is not a target name") == (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"\r\n" + body
    )


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (401, b"Unauthorized"),
        (403, b"Forbidden"),
        (404, b"Not Found"),
        (405, b"Method Not Allowed"),
        (408, b"Request Timeout"),
        (502, b"Bad Gateway"),
        (503, b"Service Unavailable"),
    ],
)
def test_render_refusal_uses_standard_phrases(status, phrase):
    assert render_refusal(status, "x", "y").startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase))


def test_refusal_message_cannot_inject_headers_or_lines():
    wire = render_refusal(403, "forbidden", "no\r\nSet-Cookie: a=b\r\n\r\nHTTP/1.1 200 OK\n\x00")
    head, _, body = wire.partition(b"\r\n\r\n")
    assert b"Set-Cookie" not in head
    assert body.count(b"\n") == 1 and body.endswith(b"\n")
    parser = ResponseParser()
    parser.receive_data(wire)
    response = parser.next_event()
    assert (response.status, response.reason) == (403, "forbidden")
    assert "set-cookie" not in response.headers
    assert response.message == "no  Set-Cookie: a=b    HTTP/1.1 200 OK  "


def test_refusal_message_is_capped_at_200_characters():
    wire = render_refusal(400, "bad_request", "\u00e9" * 500)
    body = wire.partition(b"\r\n\r\n")[2]
    assert body == b"bad_request: " + "\u00e9".encode() * 200 + b"\n"
    assert int(wire.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (200, "ok"),
        (302, "x"),
        (499, "x"),
        (600, "x"),
        (400, "Bad"),
        (400, "has space"),
        (400, "a:b"),
        (400, ""),
    ],
)
def test_render_refusal_rejects_bad_status_or_reason(status, reason):
    with pytest.raises(LocalProtocolError):
        render_refusal(status, reason, "message")


def test_render_established_exact_bytes():
    assert render_established(session_id="3f2a9c", headers={"Dbgrelay-Target-Kind": "dbgsrv"}) == (
        b"HTTP/1.1 200 Connection established\r\n"
        b"Dbgrelay-Session: 3f2a9c\r\n"
        b"Dbgrelay-Target-Kind: dbgsrv\r\n"
        b"\r\n"
    )
    assert (
        render_established(session_id="s")
        == b"HTTP/1.1 200 Connection established\r\nDbgrelay-Session: s\r\n\r\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"session_id": ""},
        {"session_id": "a\r\nX: y"},
        {"session_id": "caf\u00e9"},
        {"session_id": "s", "headers": {"Content-Length": "0"}},
        {"session_id": "s", "headers": {"transfer-encoding": "chunked"}},
        {"session_id": "s", "headers": {"dbgrelay-session": "other"}},
        {"session_id": "s", "headers": {"X-A": "1\r\nX-B: 2"}},
        {"session_id": "s", "headers": {"Bad Name": "1"}},
        {"session_id": "s", "headers": {"X-A": " padded "}},
        {"session_id": "s", "headers": {"X-A": "1", "x-a": "2"}},
    ],
)
def test_render_established_rejects_bad_headers(kwargs):
    with pytest.raises(LocalProtocolError):
        render_established(**kwargs)


def test_render_preflight_exact_bytes():
    assert render_preflight(headers={"Dbgrelay-Target-Kind": "gdbserver"}) == (
        b"HTTP/1.1 200 OK\r\n"
        b"Dbgrelay-Target-Kind: gdbserver\r\n"
        b"Content-Length: 0\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


def test_render_preflight_rejects_framing_headers():
    with pytest.raises(LocalProtocolError):
        render_preflight(headers={"Connection": "keep-alive"})


# --- client side --------------------------------------------------------------


def _established_by_h11(session_id: str, extra: list[tuple[str, str]]) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n")
    conn.next_event()
    conn.next_event()
    headers = [("Dbgrelay-Session", session_id), *extra]
    return conn.send(
        h11.Response(status_code=200, reason="Connection established", headers=headers)
    )


@pytest.mark.parametrize(
    "extra",
    [{}, {"Dbgrelay-Target-Kind": "dbgsrv"}, {"X-A": "1", "X-B": "dbgrelay-session-id-mark"}],
)
def test_render_established_is_what_h11_renders_for_each_session(extra):
    # The head is rendered once per set of extra headers and reused; each
    # session must still get its own id, exactly where h11 puts it.
    for session_id in ("3f2a9c", "s", "dbgrelay-session-id-mark", "x" * 200, "a b"):
        assert render_established(session_id=session_id, headers=extra) == _established_by_h11(
            session_id, list(extra.items())
        )


def test_render_request_gives_each_token_its_own_head():
    # Rendered heads are reused: a new token (a refreshed one) must not get
    # the old head.
    first = render_request(method="CONNECT", target="build42", token="aaa.bbb.ccc")
    second = render_request(method="CONNECT", target="build42", token="ddd.eee.fff")
    assert b"Bearer aaa.bbb.ccc\r\n" in first and b"Bearer ddd.eee.fff\r\n" in second
    assert render_request(method="CONNECT", target="build42", token="aaa.bbb.ccc") == first
    assert render_request(method="OPTIONS", target="build42", token="aaa.bbb.ccc") != first


def test_render_request_exact_bytes():
    assert render_request(method="CONNECT", target="build42", token=TOKEN) == (
        b"CONNECT build42 HTTP/1.1\r\n"
        b"Host: build42\r\n"
        b"User-Agent: dbgrelay-connect\r\n"
        b"Proxy-Authorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize("method", ["CONNECT", "OPTIONS"])
def test_render_request_round_trips_through_the_server_parser(method):
    wire = render_request(
        method=method,
        target="build42:443",
        token=TOKEN,
        host="relay.example",
        user_agent="dbgrelay-connect/0.1",
    )
    event = parse(wire)
    assert event == TunnelRequested(
        method=method,
        target="build42",
        token=TOKEN,
        token_source="proxy-bearer",
        host="relay.example",
        user_agent="dbgrelay-connect/0.1",
        trailing=b"",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "GET"},
        {"target": "/x"},
        {"target": "a b"},
        {"token": ""},
        {"token": "abc\r\nX: y"},
        {"host": "a\r\nX: y"},
        {"user_agent": "ua\n"},
    ],
)
def test_render_request_rejects_bad_arguments(kwargs):
    args = {"method": "CONNECT", "target": "a", "token": TOKEN} | kwargs
    with pytest.raises(LocalProtocolError) as info:
        render_request(**args)
    assert "abc" not in str(info.value)


def response_of(wire: bytes, *, method: str = "CONNECT", eof: bool = False) -> TunnelResponse:
    parser = ResponseParser(method=method)
    parser.receive_data(wire)
    if eof:
        parser.receive_data(b"")
    return parser.next_event()


def test_established_round_trip_with_first_tunnel_bytes():
    wire = render_established(session_id="3f2a9c", headers={"Dbgrelay-Target-Kind": "dbgsrv"})
    response = response_of(wire + b"\x01\x02first bytes")
    assert response == TunnelResponse(
        status=200,
        reason=None,
        message=None,
        headers={"dbgrelay-session": "3f2a9c", "dbgrelay-target-kind": "dbgsrv"},
        trailing=b"\x01\x02first bytes",
    )


def test_established_split_at_every_byte_boundary():
    wire = render_established(session_id="s9") + b"tunnel"
    for chunks in splits(wire):
        parser = ResponseParser()
        pending = list(chunks)
        response = NEED_DATA
        while response is NEED_DATA:
            chunk = pending.pop(0)
            if chunk:
                parser.receive_data(chunk)
            response = parser.next_event()
        assert response.status == 200
        assert response.headers["dbgrelay-session"] == "s9"
        assert response.trailing + b"".join(pending) == b"tunnel"


def test_refusal_round_trip_waits_for_the_whole_body():
    wire = render_refusal(
        401, "token_expired", "the token expired at 2024-06-11T10:00:00Z; ask for a new one"
    )
    parser = ResponseParser()
    for byte in wire[:-1]:
        parser.receive_data(bytes([byte]))
        assert parser.next_event() is NEED_DATA
    parser.receive_data(wire[-1:])
    response = parser.next_event()
    assert (response.status, response.reason) == (401, "token_expired")
    assert response.message == "the token expired at 2024-06-11T10:00:00Z; ask for a new one"
    assert response.headers["connection"] == "close"


def test_preflight_round_trip():
    response = response_of(
        render_preflight(headers={"Dbgrelay-Target-Kind": "kdsrv"}), method="OPTIONS"
    )
    assert (response.status, response.reason, response.message) == (200, None, None)
    assert response.headers["dbgrelay-target-kind"] == "kdsrv"


def test_refusal_to_options_round_trip():
    response = response_of(
        render_refusal(401, "token_invalid", "signature does not verify"), method="OPTIONS"
    )
    assert (response.status, response.reason, response.message) == (
        401,
        "token_invalid",
        "signature does not verify",
    )


def test_foreign_refusal_body_gives_the_line_without_a_reason():
    wire = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 23\r\nX-A: 1\r\nx-a: 2\r\n\r\nupstream is down\r\nmore\r\n"
    response = response_of(wire)
    assert (response.status, response.reason, response.message) == (502, None, "upstream is down")
    assert response.headers["x-a"] == "1, 2"


def test_refusal_body_framed_by_connection_close_waits_for_eof():
    parser = ResponseParser()
    parser.receive_data(b"HTTP/1.0 403 Forbidden\r\n\r\nforbidden: not on the allow list\n")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"")
    response = parser.next_event()
    assert (response.status, response.reason, response.message) == (
        403,
        "forbidden",
        "not on the allow list",
    )


def test_informational_responses_are_skipped():
    response = response_of(b"HTTP/1.1 100 Continue\r\n\r\n" + render_established(session_id="s"))
    assert response.status == 200


def test_long_refusal_body_is_read_but_not_kept():
    body = b"bad_request: " + b"x" * 50_000 + b"\n"
    wire = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    parser = ResponseParser(max_head=1024)
    parser.receive_data(wire)
    response = parser.next_event()
    assert (response.status, response.reason, len(response.message)) == (400, "bad_request", 200)


@pytest.mark.parametrize(
    ("wire", "eof"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False),
        (b"\x16\x03\x03\x00\x02\x02\x28", False),
        (b"HTTP/1.1 abc OK\r\n\r\n", False),
        (b"HTTP/1.1 200 Connection established\r\nBad header\r\n\r\n", False),
        (b"HTTP/1.1 200 Connection est", True),
        (b"", True),
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 50\r\n\r\nshort", True),
        (b"HTTP/1.1 200 OK\r\nX: " + b"p" * 9000 + b"\r\n\r\n", False),
    ],
)
def test_malformed_responses_are_bad_response(wire, eof):
    parser = ResponseParser()
    parser.receive_data(wire)
    if eof:
        parser.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        parser.next_event()
    assert (info.value.reason, info.value.status) == ("bad_response", 502)
    with pytest.raises(RemoteProtocolError):
        parser.next_event()


def test_response_parser_is_done_after_the_event():
    parser = ResponseParser()
    parser.receive_data(render_established(session_id="s"))
    parser.next_event()
    with pytest.raises(LocalProtocolError):
        parser.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        parser.next_event()


def test_response_parser_rejects_bad_arguments():
    with pytest.raises(LocalProtocolError):
        ResponseParser(method="GET")
    with pytest.raises(LocalProtocolError):
        ResponseParser(max_head=0)


def test_tunnel_response_validates_on_construction():
    TunnelResponse(status=200, reason=None, message=None, headers={}, trailing=b"")
    for kwargs in (
        {"status": 100},
        {"status": True},
        {"reason": "Bad Code"},
        {"headers": {"X-A": "1"}},
        {"trailing": "x"},
    ):
        fields = {
            "status": 200,
            "reason": None,
            "message": None,
            "headers": {},
            "trailing": b"",
        } | kwargs
        with pytest.raises(LocalProtocolError):
            TunnelResponse(**fields)
