"""The relay on real loopback sockets with real TLS: tunnels, refusals, audit."""

from __future__ import annotations

import base64
import gc
import json
import socket
import ssl
import struct
import time
import warnings
from pathlib import Path

import jwt
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from relay.audit import verify_file
from relay.connector import RelayRefused, open_tunnel, preflight
from relay.datapath.thread_driver import shared_plane
from relay.preamble import (
    NEED_DATA,
    ResponseParser,
    TunnelRequested,
    TunnelResponse,
    render_request,
)
from relay.tls import make_client_engine

from .conftest import session_files, start_echo, start_relay

# The whole suite runs on both TLS engines.
pytestmark = pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])


def gdb_target(name: str, port: int, **extra) -> dict:
    return {
        "name": name,
        "kind": "gdbserver",
        "backend": f"tcp://127.0.0.1:{port}",
        "probe_interval": "0",
    } | extra


async def raw_request(
    port: int, ca: Path, data: bytes, engine: str = "stdlib"
) -> tuple[TunnelResponse, trio.abc.Stream]:
    """Send arbitrary bytes after TLS and parse the relay's answer."""
    client = make_client_engine(engine=engine, ca=ca)
    tls = client.wrap(await trio.open_tcp_stream("127.0.0.1", port), "127.0.0.1")
    await tls.do_handshake()
    await tls.send_all(data)
    parser = ResponseParser()
    while (event := parser.next_event()) is NEED_DATA:
        parser.receive_data(await tls.receive_some(4096))
    return event, tls


def sample(metrics, name: str, **labels) -> float:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def eventually(check) -> None:
    """Wait (at most 5 s) until ``check()`` is true.

    The relay counts a refusal after the peer has seen it, and metrics have
    no event to wait on, so this polls.
    """
    with trio.fail_after(5):
        while not check():  # noqa: ASYNC110 - nothing to wait on but the metric itself
            await trio.sleep(0.01)


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_tunnel_moves_bytes_both_ways_and_writes_a_verified_audit(
    nursery, make_config, token_for, pki, keydir
):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    tls, session_id, first = await open_tunnel(running.settings(token_for()))
    assert first == b""
    payload = bytes(range(256)) * 300  # several TLS records
    await tls.send_all(payload)
    got = bytearray()
    while len(got) < len(payload):
        got += await tls.receive_some(65536)
    assert got == payload
    await tls.aclose()
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()

    files = list((config.relay.audit_dir).glob(f"*/{session_id}.jsonl"))
    assert len(files) == 1
    records = audit_records(files[0])
    events = [r.get("event") for r in records[1:]]
    assert events[0] == "session.opened" and events[-1] == "session.closed"
    assert events.count("session.opened") == 1 and events.count("session.closed") == 1
    opened, closed = records[1], records[-1]
    assert opened["user"] == "alice" and opened["target"] == "build42"
    assert opened["tls_version"] in ("TLSv1.2", "TLSv1.3") and opened["session_id"] == session_id
    assert closed["reason"] == "client_closed"
    assert closed["bytes_to_backend"] == len(payload) == closed["bytes_to_client"]
    from auth import load_audit_pubkey

    report = verify_file(files[0], pubkey=load_audit_pubkey(keydir / "audit.pub"))
    assert report.ok and report.signed, report.problems
    # Metrics mirror the session.
    m = running.metrics
    assert sample(m, "dbgrelay_sessions_total", target="build42", outcome="client_closed") == 1
    assert sample(
        m, "dbgrelay_tunnel_bytes_total", target="build42", direction="to_backend"
    ) == len(payload)
    assert sample(m, "dbgrelay_tunnel_bytes_total", target="build42", direction="to_client") == len(
        payload
    )
    running.stop.set()


async def test_on_the_data_plane_thread_a_tunnel_moves_bytes_and_ends_from_trio(
    nursery, make_config, token_for, pki
):
    # relay.data_plane = "thread": the tunnel is handed over after the 200,
    # and an end decided in trio (here an admin's) takes it back, with every
    # byte counted in the audit record.
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)], data_plane="thread")
    running = await start_relay(nursery, config, pki)
    handed_over = shared_plane().handed_over
    tls, session_id, _ = await open_tunnel(running.settings(token_for()))
    payload = bytes(range(256)) * 300
    await tls.send_all(payload)
    got = bytearray()
    while len(got) < len(payload):
        got += await tls.receive_some(65536)
    assert got == payload
    running.relay.sessions[session_id].end("ended_by_admin")
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    assert await tls.receive_some(65536) == b""  # close_notify: a clean end
    await tls.aclose()

    [file] = (config.relay.audit_dir).glob(f"*/{session_id}.jsonl")
    closed = audit_records(file)[-1]
    assert closed["event"] == "session.closed" and closed["reason"] == "ended_by_admin"
    assert closed["bytes_to_backend"] == len(payload) == closed["bytes_to_client"]
    assert shared_plane().handed_over == handed_over + 1


async def test_a_client_cut_without_close_notify_is_audited_as_a_client_error(
    nursery, make_config, token_for, pki
):
    # Both engines alike: a TCP close with no TLS close_notify cannot be told
    # apart from a connection cut mid-stream (RFC 8446 section 6.1), so it is
    # not a clean close.
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    tls, session_id, _ = await open_tunnel(running.settings(token_for()))
    await tls.send_all(b"ping")
    got = b""
    while len(got) < 4:
        got += await tls.receive_some(65536)
    await trio.aclose_forcefully(tls.transport_stream)  # FIN, no close_notify
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()

    [file] = (config.relay.audit_dir).glob(f"*/{session_id}.jsonl")
    closed = audit_records(file)[-1]
    assert closed["event"] == "session.closed"
    assert closed["reason"] == "client_error"
    assert "without a TLS close_notify" in closed["error"]
    assert closed["bytes_to_backend"] == 4 == closed["bytes_to_client"]
    m = running.metrics
    assert sample(m, "dbgrelay_sessions_total", target="build42", outcome="client_error") == 1


async def test_bytes_sent_right_behind_the_request_head_reach_the_backend(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    head = render_request(method="CONNECT", target="build42", token=token_for())
    event, tls = await raw_request(running.port, running.ca, head + b"$qSupported#37")
    assert event.status == 200
    got = bytearray(event.trailing)
    while len(got) < 14:
        got += await tls.receive_some(100)
    assert bytes(got) == b"$qSupported#37"
    # Only those bytes outlive the request: its token and headers are not
    # kept for the tunnel's life (a thousand open tunnels, a thousand copies).
    assert len(running.relay.sessions) == 1
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, TunnelRequested)] == []
    await tls.aclose()
    running.stop.set()


async def test_proxy_basic_credentials_carry_the_token(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    basic = base64.b64encode(b"x:" + token_for().encode()).decode()
    head = (
        f"CONNECT build42:443 HTTP/1.1\r\nHost: build42:443\r\n"
        f"Proxy-Authorization: Basic {basic}\r\n\r\n"
    ).encode()
    event, tls = await raw_request(running.port, running.ca, head)
    assert event.status == 200
    await tls.send_all(b"ping")
    assert await tls.receive_some(10) == b"ping"
    await tls.aclose()
    running.stop.set()


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("missing", 401, "missing"),
        ("garbage", 401, "malformed"),
        ("expired", 401, "expired"),
        ("not_yet_valid", 401, "not_yet_valid"),
        ("wrong_audience", 401, "bad_audience"),
        ("wrong_issuer", 401, "bad_issuer"),
        ("foreign_key", 401, "unknown_kid"),
        ("tampered", 401, "bad_signature"),
        ("not_granted", 403, "not_granted"),
        ("not_in_allow", 403, "not_allowed"),
        ("unknown_target", 404, "unknown_target"),
        ("revoked", 401, "revoked"),
    ],
)
async def test_refused_tokens_never_reach_the_backend(
    nursery, make_config, token_for, pki, tmp_path, case, status, reason
):
    backend = await start_echo(nursery)
    config = make_config(
        [
            gdb_target("build42", backend.port),
            gdb_target("locked", backend.port, allow=["bob"]),
        ]
    )
    running = await start_relay(nursery, config, pki)
    now = time.time()
    target = "build42"
    token: str | None
    if case == "missing":
        token = None
    elif case == "garbage":
        token = "not-a-jwt"
    elif case == "expired":
        token = token_for(now=now - 7200, ttl=60)
    elif case == "not_yet_valid":
        token = token_for(now=now + 3600)
    elif case == "wrong_audience":
        token = token_for(audience="someone-else")
    elif case == "wrong_issuer":
        token = token_for(issuer="someone-else")
    elif case == "foreign_key":
        from auth import init_keys, issue_token, load_signing_key

        other = init_keys(tmp_path / "other")
        token = issue_token(
            load_signing_key(other.signing_key),
            user="alice",
            targets=["build42"],
            ttl=60,
            issuer="dbgrelay",
            audience="dbgrelay",
            now=now,
        )
    elif case == "tampered":
        head, payload, sig = token_for().split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["targets"] = ["*"]
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        token = f"{head}.{forged}.{sig}"
    elif case == "not_granted":
        token = token_for(targets=["other"])
    elif case == "not_in_allow":
        token, target = token_for(targets=["locked"]), "locked"
    elif case == "unknown_target":
        token, target = token_for(targets=["build*"]), "build99"
    else:
        token = token_for()
        from auth import peek_unverified

        running.relay.store.revoke(peek_unverified(token)["jti"], now=now)
        running.relay.refresh_revocations()

    if token is None:
        data = b"CONNECT build42 HTTP/1.1\r\nHost: build42\r\n\r\n"
    else:
        data = render_request(method="CONNECT", target=target, token=token)
    event, tls = await raw_request(running.port, running.ca, data)
    assert (event.status, event.reason) == (status, reason)
    assert await tls.receive_some(100) == b""  # the relay closed the tunnel
    assert backend.connections == 0
    await eventually(
        lambda: sample(running.metrics, "dbgrelay_auth_failures_total", reason=reason) == 1
    )
    # The refusal is in the relay's audit file with its reason, and never the token.
    relay_file = next(config.relay.audit_dir.glob("relay-*.jsonl"))
    text = relay_file.read_text()
    assert f'"reason":"{reason}"' in text.replace(" ", "")
    if token:
        assert token not in text
    running.stop.set()


async def test_unknown_target_is_not_revealed_to_a_token_without_a_matching_grant(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    data = render_request(
        method="CONNECT", target="secret-box", token=token_for(targets=["build42"])
    )
    event, tls = await raw_request(running.port, running.ca, data)
    assert (event.status, event.reason) == (403, "not_granted")
    await tls.aclose()
    running.stop.set()


async def test_malformed_preamble_gets_400(nursery, make_config, pki):
    running = await start_relay(nursery, make_config([]), pki)
    event, tls = await raw_request(running.port, running.ca, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert event.status == 405
    event, tls = await raw_request(running.port, running.ca, b"\x16\x03\x01garbage\r\n\r\n")
    assert (event.status, event.reason) == (400, "bad_request")
    running.stop.set()


async def test_unreachable_backend_gets_502(nursery, make_config, token_for, pki):
    # A port nobody listens on: bind one, then close it.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    config = make_config([gdb_target("build42", dead, connect_timeout="2s")])
    running = await start_relay(nursery, config, pki)
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token_for()))
    assert (info.value.status, info.value.reason) == (502, "backend_unreachable")
    assert sample(running.metrics, "dbgrelay_backend_connect_errors_total", target="build42") == 1
    # The session existed (token valid), so it has its own audit file with the reason.
    (session_file,) = session_files(config.relay.audit_dir)
    assert audit_records(session_file)[-1]["reason"] == "backend_unreachable"
    running.stop.set()


async def test_relay_full_gets_503(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    running = await start_relay(
        nursery, make_config([gdb_target("build42", backend.port)], max_sessions=1), pki
    )
    first, _, _ = await open_tunnel(running.settings(token_for()))
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token_for()))
    assert (info.value.status, info.value.reason) == (503, "relay_full")
    await first.aclose()
    running.stop.set()


async def test_unwritable_audit_dir_refuses_sessions_with_503(
    nursery, make_config, token_for, pki, tmp_path
):
    backend = await start_echo(nursery)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the audit folder should be")
    config = make_config([gdb_target("build42", backend.port)], audit_dir=str(blocker / "audit"))
    running = await start_relay(nursery, config, pki)
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token_for()))
    assert (info.value.status, info.value.reason) == (503, "audit_unavailable")
    assert backend.connections == 0
    assert sample(running.metrics, "dbgrelay_audit_write_errors_total") >= 1
    running.stop.set()


async def test_preflight_reports_the_target_kind_without_touching_the_backend(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config(
        [
            {
                "name": "kd1",
                "kind": "kdsrv",
                "backend": f"tcp://127.0.0.1:{backend.port}",
                "kd_transport": "net:port=50000,key=1.2.3.4",
                "probe_interval": "0",
            }
        ]
    )
    running = await start_relay(nursery, config, pki)
    headers = await preflight(running.settings(token_for(targets=["kd1"]), target="kd1"))
    assert headers["dbgrelay-target-kind"] == "kdsrv"
    assert headers["dbgrelay-kd-transport"] == "net:port=50000,key=1.2.3.4"
    assert backend.connections == 0
    running.stop.set()


async def test_tls_below_1_2_is_refused(nursery, make_config, pki, engine):
    running = await start_relay(nursery, make_config([]), pki)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with warnings.catch_warnings():  # offering TLS 1.1 is the point of this test
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", running.port), ctx, server_hostname="127.0.0.1"
    )
    with pytest.raises(trio.BrokenResourceError) as info:
        await stream.do_handshake()
    # Both engines send the alert before closing, so the client knows why.
    assert "PROTOCOL_VERSION" in str(info.value.__cause__).upper()
    await eventually(
        lambda: sample(running.metrics, "dbgrelay_handshakes_total", outcome="tls_error") == 1
    )
    running.stop.set()


async def test_tls_1_3_and_alpn_are_negotiated(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    tls, _, _ = await open_tunnel(running.settings(token_for()))
    info = tls.tls_info()
    assert info.version == "TLSv1.3" and info.alpn == "http/1.1"
    await tls.aclose()
    running.stop.set()


async def test_backend_closing_ends_the_tunnel_after_its_last_bytes(
    nursery, make_config, token_for, pki
):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def say_bye(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.aclose()

    await nursery.start(trio.serve_listeners, say_bye, listeners)
    port = listeners[0].socket.getsockname()[1]
    config = make_config([gdb_target("build42", port)])
    running = await start_relay(nursery, config, pki)
    tls, session_id, first = await open_tunnel(running.settings(token_for()))
    got = bytearray(first)
    while data := await tls.receive_some(100):
        got += data
    assert bytes(got) == b"bye"
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    (session_file,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    assert audit_records(session_file)[-1]["reason"] == "backend_closed"
    running.stop.set()


async def start_resetting_backend(nursery, *, after: trio.Event | None = None):
    """A server that accepts and then resets (RST) each connection: at once, or once
    ``after`` is set.  Returns its port and an event set after each reset."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    reset = trio.Event()

    async def drop(stream: trio.SocketStream) -> None:
        if after is not None:
            await after.wait()
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
        reset.set()

    await nursery.start(trio.serve_listeners, drop, listeners)
    return listeners[0].socket.getsockname()[1], reset


async def test_backend_that_resets_before_the_tunnel_opens_gets_502(
    nursery, make_config, token_for, pki
):
    port, reset = await start_resetting_backend(nursery)
    config = make_config([gdb_target("build42", port)])
    running = await start_relay(nursery, config, pki)
    opened = running.relay.open_backend

    async def open_after_the_reset(backend, *, connect_timeout):
        stream = await opened(backend, connect_timeout=connect_timeout)
        # The RST has reached this socket once it is readable: from here the
        # relay's check sees it, without any assumption about timing.
        await reset.wait()
        await trio.lowlevel.wait_readable(stream.socket)
        return stream

    running.relay.open_backend = open_after_the_reset
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token_for()))
    assert (info.value.status, info.value.reason) == (502, "backend_reset")
    assert info.value.message == "the debug server dropped the connection before the tunnel opened"
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    (session_file,) = session_files(config.relay.audit_dir)
    events = [r.get("event") for r in audit_records(session_file)]
    assert "backend.failed" in events and "backend.connected" not in events
    assert audit_records(session_file)[-1]["reason"] == "backend_reset"
    assert sample(running.metrics, "dbgrelay_backend_connect_errors_total", target="build42") == 1
    running.stop.set()


async def test_backend_reset_after_the_200_before_any_byte_is_named_in_the_end_record(
    nursery, make_config, token_for, pki
):
    go = trio.Event()
    port, reset = await start_resetting_backend(nursery, after=go)
    config = make_config([gdb_target("build42", port)])
    running = await start_relay(nursery, config, pki)
    tls, session_id, _ = await open_tunnel(running.settings(token_for()))
    go.set()
    with trio.fail_after(5):
        try:
            assert await tls.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass
        await running.relay.wait_no_sessions()
    (session_file,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    assert audit_records(session_file)[-1]["reason"] == "backend_reset"
    running.stop.set()


@pytest.mark.parametrize(
    "claims",
    [{"exp": 10**400}, {"nbf": 10**400}, {"iat": 10**400}, {"exp": -(10**400)}],
    ids=["exp", "nbf", "iat", "negative-exp"],
)
async def test_signed_token_with_an_absurd_time_claim_gets_401_malformed(
    nursery, make_config, pki, keydir, claims
):
    # exp = 10**400 used to pass verification and raise OverflowError in the
    # session: no status line, audit reason "error".
    from auth import load_signing_key

    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    key = load_signing_key(keydir / "signing.key")
    now = int(time.time())
    payload = {
        "iss": "dbgrelay",
        "aud": "dbgrelay",
        "sub": "mallory",
        "jti": "a" * 32,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "targets": ["build42"],
    } | claims
    token = jwt.encode(payload, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
    event, tls = await raw_request(
        running.port, running.ca, render_request(method="CONNECT", target="build42", token=token)
    )
    assert (event.status, event.reason) == (401, "malformed")
    assert event.message == "the token is malformed; ask an admin for a new one"
    assert await tls.receive_some(100) == b""
    assert backend.connections == 0
    await eventually(
        lambda: sample(running.metrics, "dbgrelay_auth_failures_total", reason="malformed") == 1
    )
    relay_file = next(config.relay.audit_dir.glob("relay-*.jsonl"))
    (rejected,) = [r for r in audit_records(relay_file) if r.get("event") == "token.rejected"]
    assert rejected["reason"] == "malformed" and rejected["status"] == 401
    assert not list(session_files(config.relay.audit_dir))  # no session began
    running.stop.set()


async def test_token_expired_within_the_leeway_gets_401_expired(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config(
        [
            gdb_target("build42", backend.port),
            gdb_target("lenient", backend.port, end_on_token_expiry=False),
        ]
    )
    running = await start_relay(nursery, config, pki)
    # Expired 10 s ago: inside the default 30 s leeway, so the token verifies.
    token = token_for(targets=["build42", "lenient"], now=time.time() - 70, ttl=60)
    event, tls = await raw_request(
        running.port, running.ca, render_request(method="CONNECT", target="build42", token=token)
    )
    assert (event.status, event.reason) == (401, "expired")
    assert event.message == "the token has expired; ask an admin for a new one"
    assert backend.connections == 0
    # A target that lets tunnels outlive their token still takes it.
    lenient, _, _ = await open_tunnel(running.settings(token, target="lenient"))
    await lenient.send_all(b"ping")
    assert await lenient.receive_some(10) == b"ping"
    await lenient.aclose()
    running.stop.set()
