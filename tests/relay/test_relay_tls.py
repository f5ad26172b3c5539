"""TLS policy at the relay: client certificates, revocation, post-quantum key exchange."""

from __future__ import annotations

import dataclasses
import json
import ssl
from pathlib import Path

import pytest
import trio

from auth import issue_client_cert
from relay.connector import ConnectFailed, RelayRefused, open_tunnel
from relay.tls import make_client_engine

from .conftest import start_echo, start_relay
from .test_relay import eventually, sample


def target(port: int, **extra) -> dict:
    return {
        "name": "build42",
        "kind": "dbgsrv",
        "backend": f"tcp://127.0.0.1:{port}",
        "probe_interval": "0",
    } | extra


@pytest.fixture(scope="module")
def alice_cert(pki: Path, tmp_path_factory: pytest.TempPathFactory):
    return issue_client_cert(pki, "alice", tmp_path_factory.mktemp("alice"))


def mtls(pki: Path) -> dict:
    return {"engine": "pyopenssl", "client_ca": str(pki / "ca.pem"), "require_client_cert": True}


async def test_client_certificate_is_required_and_recorded(
    nursery, make_config, token_for, pki, alice_cert
):
    backend = await start_echo(nursery)
    config = make_config([target(backend.port)], tls=mtls(pki))
    running = await start_relay(nursery, config, pki)
    settings = running.settings(token_for())
    with_cert = make_client_engine(
        engine="pyopenssl", ca=pki / "ca.pem", cert=alice_cert.cert, key=alice_cert.key
    )
    tls, session_id, _ = await open_tunnel(dataclasses.replace(settings, engine=with_cert))
    await tls.send_all(b"hi")
    assert await tls.receive_some(10) == b"hi"
    await tls.aclose()
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    opened = json.loads(path.read_text().splitlines()[1])
    assert "alice" in opened["client_cert"]
    assert int(opened["client_cert_serial"]) == alice_cert.serial
    running.stop.set()


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
async def test_client_without_certificate_gets_certificate_required_alert(
    engine, nursery, make_config, pki
):
    config = make_config([], tls=mtls(pki) | {"engine": engine})
    running = await start_relay(nursery, config, pki)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", running.port), ctx, server_hostname="127.0.0.1"
    )
    with pytest.raises(trio.BrokenResourceError) as info:
        await stream.do_handshake()
        await stream.receive_some(10)  # TLS 1.3: the alert follows the client's Finished
    assert "CERTIFICATE_REQUIRED" in str(info.value.__cause__).upper()
    running.stop.set()


async def test_revoked_client_certificate_is_refused_during_the_handshake(
    nursery, make_config, token_for, pki, alice_cert
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([target(backend.port)], tls=mtls(pki)), pki)
    running.relay.store.revoke_serial(alice_cert.serial, now=0)
    running.relay.refresh_revocations()
    client = make_client_engine(
        engine="pyopenssl", ca=pki / "ca.pem", cert=alice_cert.cert, key=alice_cert.key
    )
    tls = client.wrap(await trio.open_tcp_stream("127.0.0.1", running.port), "127.0.0.1")
    with pytest.raises(trio.BrokenResourceError):
        await tls.do_handshake()
        await tls.receive_some(10)
    assert backend.connections == 0
    assert running.relay.sessions == {}
    running.stop.set()


async def alice_over_mtls(engine, nursery, make_config, token_for, pki, alice_cert):
    """An echo backend, a relay requiring client certificates, and alice's connector settings."""
    backend = await start_echo(nursery)
    config = make_config([target(backend.port)], tls=mtls(pki) | {"engine": engine})
    running = await start_relay(nursery, config, pki)
    client = make_client_engine(
        engine=engine, ca=pki / "ca.pem", cert=alice_cert.cert, key=alice_cert.key
    )
    settings = dataclasses.replace(running.settings(token_for()), engine=client)
    return backend, config, running, settings


def relay_events(config) -> list[dict]:
    (path,) = config.relay.audit_dir.glob("relay-*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
async def test_revoked_client_certificate_never_reaches_a_backend(
    engine, nursery, make_config, token_for, pki, alice_cert
):
    # The attack: a developer whose certificate was revoked still holds a valid token.
    backend, config, running, settings = await alice_over_mtls(
        engine, nursery, make_config, token_for, pki, alice_cert
    )
    running.relay.store.revoke_serial(alice_cert.serial, now=0)
    running.relay.refresh_revocations()
    with pytest.raises(ConnectFailed):
        await open_tunnel(settings)
    assert backend.connections == 0
    assert running.relay.sessions == {}
    if engine == "stdlib":
        # No hook inside the stdlib handshake: refused right after it, before the request.
        assert sample(running.metrics, "dbgrelay_handshakes_total", outcome="cert_revoked") == 1
        failed = [e for e in relay_events(config) if e.get("event") == "handshake.failed"]
        assert [(e["reason"], e["serial"]) for e in failed] == [
            ("cert_revoked", str(alice_cert.serial))
        ]
    running.stop.set()


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
async def test_revoking_a_client_certificate_ends_its_live_tunnel(
    engine, nursery, make_config, token_for, pki, alice_cert
):
    _, config, running, settings = await alice_over_mtls(
        engine, nursery, make_config, token_for, pki, alice_cert
    )
    tls, session_id, _ = await open_tunnel(settings)
    await tls.send_all(b"hi")
    assert await tls.receive_some(10) == b"hi"
    running.relay.store.revoke_serial(alice_cert.serial, now=0)
    running.relay.refresh_revocations()
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    closed = json.loads(path.read_text().splitlines()[-1])
    assert closed["reason"] == "revoked"
    await tls.aclose()
    running.stop.set()


async def test_require_pq_refuses_classical_key_exchange(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    config = make_config([target(backend.port)], tls={"engine": "pyopenssl", "require_pq": True})
    running = await start_relay(nursery, config, pki)
    settings = running.settings(token_for())
    classical = dataclasses.replace(
        settings, engine=make_client_engine(engine="stdlib", ca=pki / "ca.pem")
    )
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(classical)
    assert (info.value.status, info.value.reason) == (403, "pq_required")
    assert backend.connections == 0

    tls, session_id, _ = await open_tunnel(settings)  # the pyopenssl client offers X25519MLKEM768
    assert tls.tls_info().group == "X25519MLKEM768"
    await tls.aclose()
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    opened = json.loads(path.read_text().splitlines()[1])
    assert (opened["tls_group"], opened["tls_version"]) == ("X25519MLKEM768", "TLSv1.3")
    assert sample(running.metrics, "dbgrelay_tls_sessions_total", group="X25519MLKEM768") >= 1
    running.stop.set()


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
async def test_certificate_revoked_between_handshake_and_request_is_refused(
    engine, nursery, make_config, token_for, pki, alice_cert
):
    from relay.preamble import NEED_DATA, ResponseParser, render_request

    backend, config, running, settings = await alice_over_mtls(
        engine, nursery, make_config, token_for, pki, alice_cert
    )
    tls = settings.engine.wrap(await trio.open_tcp_stream("127.0.0.1", running.port), "127.0.0.1")
    await tls.do_handshake()
    # The relay has finished its side of the handshake, and its check after it, ...
    await eventually(
        lambda: sample(running.metrics, "dbgrelay_handshakes_total", outcome="ok") == 1
    )
    # ... when the certificate is revoked, before the CONNECT arrives.
    running.relay.store.revoke_serial(alice_cert.serial, now=0)
    running.relay.refresh_revocations()
    await tls.send_all(render_request(method="CONNECT", target="build42", token=settings.token))
    parser = ResponseParser()
    while (event := parser.next_event()) is NEED_DATA:
        parser.receive_data(await tls.receive_some(4096))
    assert (event.status, event.reason) == (403, "cert_revoked")
    assert backend.connections == 0
    assert running.relay.sessions == {}
    running.stop.set()


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
async def test_a_revoked_certificate_cannot_resume_its_tls_session(
    engine, nursery, make_config, token_for, pki, alice_cert
):
    # The attack: resume a session made while the certificate was good; a
    # resumed handshake does not check the certificate again.
    backend, config, running, settings = await alice_over_mtls(
        engine, nursery, make_config, token_for, pki, alice_cert
    )
    tls, _, _ = await open_tunnel(settings)
    await tls.aclose()
    running.relay.store.revoke_serial(alice_cert.serial, now=0)
    running.relay.refresh_revocations()
    ((_, session),) = settings.tls_sessions.values()
    tls = settings.engine.wrap(
        await trio.open_tcp_stream("127.0.0.1", running.port), "127.0.0.1", session=session
    )
    await tls.do_handshake()
    assert tls.tls_info().resumed
    try:
        await tls.send_all(b"CONNECT build42 HTTP/1.1\r\n\r\n")
        assert await tls.receive_some(100) == b""  # closed without an answer
    except trio.BrokenResourceError:
        pass
    assert backend.connections == 1
    await eventually(
        lambda: sample(running.metrics, "dbgrelay_handshakes_total", outcome="cert_revoked") == 1
    )
    running.stop.set()
