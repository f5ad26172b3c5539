"""The admin API on a real relay: over its Unix socket and over loopback TCP with tokens."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from auth import peek_unverified
from config import AdminSection
from relay.admin import serve_admin
from relay.admin_client import AdminClient, AdminEndpoint, AdminError, AdminUnavailable
from relay.connector import RelayRefused, open_tunnel

from .conftest import RunningRelay, start_echo, start_relay
from .test_relay import audit_records, gdb_target, sample


async def start_admin(nursery: trio.Nursery, running: RunningRelay) -> AdminEndpoint:
    """Serve the relay's admin API; return where it listens (the real TCP port if any)."""
    listeners = await nursery.start(serve_admin, running.relay)
    config = running.relay.config
    if config.admin.unix_path is not None:
        return AdminEndpoint(unix_path=config.admin.unix_path)
    return AdminEndpoint(address=listeners[0].socket.getsockname()[:2])


async def echo(tls: trio.abc.Stream, data: bytes) -> None:
    await tls.send_all(data)
    got = bytearray()
    while len(got) < len(data):
        got += await tls.receive_some(65536)
    assert got == data


async def receive_eof(tls: trio.abc.Stream) -> None:
    """The relay closed the tunnel: EOF (close_notify) or a broken stream."""
    with trio.fail_after(5):
        try:
            while await tls.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass


async def raw_http(endpoint: AdminEndpoint, head: bytes) -> tuple[int, dict[str, str], dict]:
    """Send literal request bytes; return status, headers and JSON body."""
    if endpoint.unix_path is not None:
        stream = await trio.open_unix_socket(str(endpoint.unix_path))
    else:
        stream = await trio.open_tcp_stream(*endpoint.address)
    async with stream:
        await stream.send_all(head)
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head_part, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    headers = {
        name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])
    }
    return int(lines[0].split()[1]), headers, json.loads(body)


def relay_audit(config) -> list[dict]:
    records: list[dict] = []
    for path in sorted(config.relay.audit_dir.glob("relay-*.jsonl")):
        records += audit_records(path)
    return records


def session_end_record(config, session_id: str) -> dict:
    (path,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    return audit_records(path)[-1]


async def test_unix_socket_is_owner_only_and_lists_live_sessions_with_bytes(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    # On the trio driver, a pump that has moved the echo has counted it by the
    # time every task is blocked; a data-plane thread counts on its own time.
    config = make_config([gdb_target("build42", backend.port)], data_plane="trio")
    running = await start_relay(nursery, config, pki)
    endpoint = await start_admin(nursery, running)
    assert stat.S_IMODE(os.stat(endpoint.unix_path).st_mode) == 0o600
    client = AdminClient(endpoint)
    assert (await client.sessions()) == []

    token = token_for("alice")
    tls, sid, _ = await open_tunnel(running.settings(token))
    await echo(tls, b"x" * 1000)
    await echo(tls, b"y" * 234)
    await trio.testing.wait_all_tasks_blocked()  # the pump has counted what it moved

    (listed,) = await client.sessions()
    assert listed["id"] == sid
    assert listed["user"] == "alice" and listed["target"] == "build42"
    assert listed["jti"] == peek_unverified(token)["jti"]
    assert listed["bytes_to_backend"] == 1234 and listed["bytes_to_client"] == 1234
    assert listed["tls_version"] == "TLSv1.3" and listed["ending"] is None
    assert (await client.session(sid)) | {"duration": 0} == listed | {"duration": 0}
    health = await client.health()
    assert health["status"] == "ok" and health["sessions"] == 1
    assert health["targets"] == ["build42"]
    assert health["state"] == {"backend": "sqlite"}
    await tls.aclose()
    running.stop.set()


@pytest.mark.parametrize("how", ["DELETE", "POST end"])
async def test_ending_a_session_closes_its_tunnel_with_reason_ended_by_admin(
    nursery, make_config, token_for, pki, how
):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    endpoint = await start_admin(nursery, running)
    tls, sid, _ = await open_tunnel(running.settings(token_for("alice")))
    other, other_sid, _ = await open_tunnel(running.settings(token_for("bob")))
    await echo(tls, b"ping")

    if how == "DELETE":
        answer = await AdminClient(endpoint).end_session(sid)
    else:
        from relay.admin_client import admin_request

        answer = await admin_request(endpoint, "POST", f"/v1/sessions/{sid}/end")

    # The answer comes once the end record is on disk.
    assert answer == {
        "id": sid,
        "user": "alice",
        "target": "build42",
        "reason": "ended_by_admin",
        "closed": True,
    }
    await receive_eof(tls)
    end = session_end_record(config, sid)
    assert end["event"] == "session.closed" and end["reason"] == "ended_by_admin"
    assert end["bytes_to_backend"] == 4
    (ended,) = [r for r in relay_audit(config) if r.get("event") == "admin.session_ended"]
    assert ended["session_id"] == sid and ended["user"] == "alice"
    assert ended["actor"] == f"unix:uid={os.getuid()}"
    assert (
        sample(
            running.metrics, "dbgrelay_sessions_total", target="build42", outcome="ended_by_admin"
        )
        == 1
    )
    # The other tunnel is untouched.
    await echo(other, b"still here")
    assert [s["id"] for s in await AdminClient(endpoint).sessions()] == [other_sid]
    await other.aclose()
    running.stop.set()


async def test_revoking_a_token_ends_its_live_tunnels_and_refuses_it(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    client = AdminClient(await start_admin(nursery, running))
    alice, bob = token_for("alice"), token_for("bob")
    jti = peek_unverified(alice)["jti"]
    first, sid1, _ = await open_tunnel(running.settings(alice))
    second, sid2, _ = await open_tunnel(running.settings(alice))
    kept, kept_sid, _ = await open_tunnel(running.settings(bob))

    answer = await client.revoke_token(jti, reason="laptop stolen")

    assert answer == {
        "jti": jti,
        "revoked": True,
        "new": True,
        "sessions_ended": sorted([sid1, sid2]),
    }
    await receive_eof(first)
    await receive_eof(second)
    await echo(kept, b"bob keeps working")
    with trio.fail_after(5):
        await running.relay.wait_session_gone(sid1)
        await running.relay.wait_session_gone(sid2)
    assert session_end_record(config, sid1)["reason"] == "revoked"
    assert session_end_record(config, sid2)["reason"] == "revoked"
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(alice))
    assert (info.value.status, info.value.reason) == (401, "revoked")
    (record,) = [r for r in relay_audit(config) if r.get("event") == "token.revoked"]
    assert record["jti"] == jti and record["reason"] == "laptop stolen"
    assert record["actor"] == f"unix:uid={os.getuid()}"
    assert record["sessions_ended"] == sorted([sid1, sid2])
    # Revoking again is not an error, and nothing else ends.
    again = await client.revoke_token(jti)
    assert again["new"] is False and again["sessions_ended"] == []
    assert [s["id"] for s in await client.sessions()] == [kept_sid]
    await kept.aclose()
    running.stop.set()


async def test_revoking_a_user_ends_every_tunnel_of_theirs(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    config = make_config([gdb_target("build42", backend.port)])
    running = await start_relay(nursery, config, pki)
    client = AdminClient(await start_admin(nursery, running))
    a1, sid1, _ = await open_tunnel(running.settings(token_for("alice")))
    a2, sid2, _ = await open_tunnel(running.settings(token_for("alice")))
    kept, kept_sid, _ = await open_tunnel(running.settings(token_for("bob")))

    answer = await client.revoke_user("alice", reason="left the team")

    assert answer["user"] == "alice" and answer["sessions_ended"] == sorted([sid1, sid2])
    await receive_eof(a1)
    await receive_eof(a2)
    await echo(kept, b"ok")
    with trio.fail_after(5):
        await running.relay.wait_session_gone(sid1)
        await running.relay.wait_session_gone(sid2)
    assert session_end_record(config, sid1)["reason"] == "revoked"
    assert session_end_record(config, sid2)["reason"] == "revoked"
    (record,) = [r for r in relay_audit(config) if r.get("event") == "token.revoked"]
    assert record["user"] == "alice" and record["sessions_ended"] == sorted([sid1, sid2])
    assert [s["id"] for s in await client.sessions()] == [kept_sid]
    await kept.aclose()
    running.stop.set()


async def test_errors_are_json_with_a_reason_and_the_right_status(nursery, make_config, pki):
    running = await start_relay(nursery, make_config([]), pki)
    endpoint = await start_admin(nursery, running)
    client = AdminClient(endpoint)

    with pytest.raises(AdminError) as info:
        await client.session("aaaaaaaaaaaa")
    assert (info.value.status, info.value.reason) == (404, "unknown_session")
    with pytest.raises(AdminError) as info:
        await client.end_session("../../etc")
    assert (info.value.status, info.value.reason) == (404, "unknown_session")

    status, headers, body = await raw_http(
        endpoint, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert (status, body["reason"]) == (404, "not_found") and body["error"]
    status, headers, body = await raw_http(
        endpoint, b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert (status, body["reason"]) == (405, "method_not_allowed")
    assert headers["allow"] == "GET, HEAD"
    status, headers, body = await raw_http(
        endpoint,
        b"POST /v1/tokens/abc/revoke HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 9\r\n\r\nnot json!",
    )
    assert (status, body["reason"]) == (400, "bad_json")
    status, headers, body = await raw_http(
        endpoint,
        b"POST /v1/users/bob/revoke HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b'Content-Length: 14\r\n\r\n{"reason": 42}',
    )
    assert (status, body["reason"]) == (400, "bad_reason")
    # Neither malformed request revoked anything.
    assert running.relay.store.list_tokens() == []
    running.stop.set()


async def test_client_reports_a_relay_that_is_not_running(tmp_path: Path):
    client = AdminClient(AdminEndpoint(unix_path=tmp_path / "admin.sock"))
    with pytest.raises(AdminUnavailable) as info:
        await client.health()
    assert "not running" in str(info.value) and str(tmp_path / "admin.sock") in str(info.value)


async def tcp_relay(nursery, make_config, token_for, pki, backend_port):
    config = make_config([gdb_target("build42", backend_port)])
    config = dataclasses.replace(config, admin=AdminSection(listen=("127.0.0.1", 0)))
    running = await start_relay(nursery, config, pki)
    endpoint = await start_admin(nursery, running)
    return running, endpoint


async def test_tcp_admin_requires_an_admin_token(nursery, make_config, token_for, pki):
    backend = await start_echo(nursery)
    running, endpoint = await tcp_relay(nursery, make_config, token_for, pki, backend.port)
    tunnel_token = token_for("alice")
    admin_token = token_for("root", targets=[], scope="admin")

    status, headers, body = await raw_http(
        endpoint, b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert (status, body["reason"]) == (401, "missing")
    assert headers["www-authenticate"].startswith("Bearer")
    for token, status, reason in [
        ("not-a-jwt", 401, "malformed"),
        (token_for("root", targets=[], scope="admin", audience="elsewhere"), 401, "bad_audience"),
        (tunnel_token, 403, "not_admin"),
    ]:
        with pytest.raises(AdminError) as info:
            await AdminClient(dataclasses.replace(endpoint, token=token)).sessions()
        assert (info.value.status, info.value.reason) == (status, reason)

    tls, sid, _ = await open_tunnel(running.settings(tunnel_token))
    admin = AdminClient(dataclasses.replace(endpoint, token=admin_token))
    assert [s["id"] for s in await admin.sessions()] == [sid]
    assert (await admin.end_session(sid))["closed"] is True
    await receive_eof(tls)
    (ended,) = [
        r for r in relay_audit(running.relay.config) if r.get("event") == "admin.session_ended"
    ]
    assert ended["actor"] == "root" and ended["actor_jti"] == peek_unverified(admin_token)["jti"]

    # A revoked admin token stops working at once.
    await admin.revoke_token(peek_unverified(admin_token)["jti"])
    with pytest.raises(AdminError) as info:
        await admin.health()
    assert (info.value.status, info.value.reason) == (401, "revoked")
    running.stop.set()
