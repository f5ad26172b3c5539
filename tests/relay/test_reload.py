"""Reloading config, certificates and keys on a live relay, and draining it on shutdown."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from auth import init_pki
from config import load_config
from relay.admin import serve_admin
from relay.admin_client import AdminClient, AdminEndpoint, AdminError
from relay.connector import open_tunnel
from relay.metrics import Metrics
from relay.preamble import NEED_DATA, ResponseParser, render_request
from relay.server import open_relay, serve_relay
from relay.tls import make_client_engine

from .conftest import RunningRelay, start_echo, start_relay
from .test_admin import echo, receive_eof, relay_audit, session_end_record


def write_config(
    path: Path,
    *,
    tls_dir: Path,
    keydir: Path,
    targets: dict[str, int],
    listen: str = "127.0.0.1:0",
    extra: str = "",
) -> Path:
    """A relay config file: ``targets`` maps names to echo-server ports."""
    lines = [
        "[relay]",
        f"listen = [{json.dumps(listen)}]",
        'state_dir = "state"',
        extra,
        "[tls]",
        f"cert = {json.dumps(str(tls_dir / 'server.pem'))}",
        f"key = {json.dumps(str(tls_dir / 'server.key'))}",
        "[auth]",
        f"jwks = {json.dumps(str(keydir / 'jwks.json'))}",
        f"audit_key = {json.dumps(str(keydir / 'audit.key'))}",
        "[metrics]",
        'listen = ""',
    ]
    for name, port in targets.items():
        lines += [
            "[[targets]]",
            f"name = {json.dumps(name)}",
            'kind = "gdbserver"',
            f'backend = "tcp://127.0.0.1:{port}"',
            'probe_interval = "0"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tls_dir(tmp_path: Path, pki: Path) -> Path:
    """A private copy of the server certificate and key, safe to overwrite."""
    out = tmp_path / "tls"
    out.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki / name, out / name)
    return out


async def start_from_file(nursery: trio.Nursery, path: Path, pki: Path) -> RunningRelay:
    return await start_relay(nursery, load_config(path), pki)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    """The relay's log records for event ``name`` (the audit logger repeats some)."""
    return [r for r in caplog.records if r.name == "dbgrelay.relay" and r.getMessage() == name]


async def test_reload_adds_a_target_for_new_tunnels_and_keeps_live_ones(
    nursery, tmp_path, tls_dir, keydir, token_for, pki, caplog
):
    caplog.set_level(logging.INFO)
    one, two = await start_echo(nursery), await start_echo(nursery)
    path = write_config(
        tmp_path / "relay.toml", tls_dir=tls_dir, keydir=keydir, targets={"build42": one.port}
    )
    running = await start_from_file(nursery, path, pki)
    token = token_for("alice", ["build*"])
    live, sid, _ = await open_tunnel(running.settings(token))

    write_config(
        path,
        tls_dir=tls_dir,
        keydir=keydir,
        targets={"build42": one.port, "build43": two.port},
    )
    result = running.relay.reload(actor="test")

    assert result.ok and result.targets == ("build42", "build43")
    assert result.restart_needed == ()
    await echo(live, b"the live tunnel survives")
    fresh, _, _ = await open_tunnel(running.settings(token, target="build43"))
    await echo(fresh, b"the new target works")
    assert two.connections == 1
    (ok,) = events(caplog, "reload.ok")
    assert ok.targets == ["build42", "build43"] and ok.actor == "test"
    await fresh.aclose()
    await live.aclose()
    running.stop.set()


async def test_bad_config_is_refused_with_its_problems_and_the_old_one_stays(
    nursery, tmp_path, tls_dir, keydir, token_for, pki, caplog
):
    one = await start_echo(nursery)
    path = write_config(
        tmp_path / "relay.toml", tls_dir=tls_dir, keydir=keydir, targets={"build42": one.port}
    )
    running = await start_from_file(nursery, path, pki)
    live, _, _ = await open_tunnel(running.settings(token_for()))
    good = path.read_text()
    path.write_text(
        good.replace('state_dir = "state"', 'state_dir = "state"\nidle_timeot = "5s"')
        + '[[targets]]\nname = "build43"\nkind = "gdbsrv"\nbackend = "tcp://127.0.0.1:1"\n'
    )

    result = running.relay.reload(actor="test")

    assert not result.ok
    assert any("relay.idle_timeot" in p for p in result.problems), result.problems
    assert any("targets[1].kind" in p for p in result.problems), result.problems
    (failed,) = events(caplog, "reload.failed")
    assert failed.problems == list(result.problems)
    assert [t.name for t in running.relay.config.targets] == ["build42"]
    await echo(live, b"still alive")
    again, _, _ = await open_tunnel(running.settings(token_for()))
    await echo(again, b"new tunnels use the old config")
    (record,) = [r for r in relay_audit(running.relay.config) if r.get("event") == "reload.failed"]
    assert record["problems"] == list(result.problems)
    await again.aclose()
    await live.aclose()
    running.stop.set()


def served_certificate(port: int) -> bytes:
    """The DER certificate the relay presents to a new handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def der(pem_file: Path) -> bytes:
    text = pem_file.read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


async def test_replaced_certificate_is_used_for_new_handshakes_after_reload(
    nursery, tmp_path, tls_dir, keydir, token_for, pki
):
    one = await start_echo(nursery)
    path = write_config(
        tmp_path / "relay.toml", tls_dir=tls_dir, keydir=keydir, targets={"build42": one.port}
    )
    running = await start_from_file(nursery, path, pki)
    live, _, _ = await open_tunnel(running.settings(token_for()))
    old_der = der(tls_dir / "server.pem")
    assert await trio.to_thread.run_sync(served_certificate, running.port) == old_der

    renewed = tmp_path / "renewed"
    init_pki(renewed, ["127.0.0.1"])
    # A half-written certificate is refused and the old one stays in use.
    (tls_dir / "server.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    assert not running.relay.reload(actor="test").ok
    assert await trio.to_thread.run_sync(served_certificate, running.port) == old_der

    shutil.copy(renewed / "server.pem", tls_dir / "server.pem")
    shutil.copy(renewed / "server.key", tls_dir / "server.key")
    # Without a reload, nothing changes.
    assert await trio.to_thread.run_sync(served_certificate, running.port) == old_der
    assert running.relay.reload(actor="test").ok

    new_der = der(renewed / "server.pem")
    assert new_der != old_der
    assert await trio.to_thread.run_sync(served_certificate, running.port) == new_der
    await echo(live, b"the old handshake's tunnel still works")
    # Clients that trust the new CA connect; the relay's old CA no longer verifies it.
    settings = dataclasses.replace(
        running.settings(token_for()), engine=make_client_engine(ca=renewed / "ca.pem")
    )
    fresh, _, _ = await open_tunnel(settings)
    await echo(fresh, b"new")
    await fresh.aclose()
    await live.aclose()
    running.stop.set()


async def test_changed_listen_address_is_logged_as_needing_a_restart(
    nursery, tmp_path, tls_dir, keydir, token_for, pki, caplog
):
    one = await start_echo(nursery)
    path = write_config(
        tmp_path / "relay.toml", tls_dir=tls_dir, keydir=keydir, targets={"build42": one.port}
    )
    running = await start_from_file(nursery, path, pki)
    before = running.relay.config.relay.listen
    write_config(
        path,
        tls_dir=tls_dir,
        keydir=keydir,
        targets={"build42": one.port},
        listen="127.0.0.2:0",
        extra='max_sessions = 7\nshutdown_grace = "12s"',
    )

    result = running.relay.reload(actor="test")

    assert result.ok and result.restart_needed == ("relay.listen",)
    (warning,) = events(caplog, "reload.restart_needed")
    assert warning.keys == ["relay.listen"]
    # The bound address stays what the relay really listens on; the rest applies.
    assert running.relay.config.relay.listen == before
    assert running.relay.config.relay.max_sessions == 7
    assert running.relay.config.relay.shutdown_grace == 12
    tls, _, _ = await open_tunnel(running.settings(token_for()))
    await echo(tls, b"still listening on the old port")
    await tls.aclose()
    running.stop.set()


async def test_reload_through_the_admin_api_reports_and_audits_the_outcome(
    nursery, tmp_path, tls_dir, keydir, token_for, pki
):
    one, two = await start_echo(nursery), await start_echo(nursery)
    path = write_config(
        tmp_path / "relay.toml", tls_dir=tls_dir, keydir=keydir, targets={"build42": one.port}
    )
    running = await start_from_file(nursery, path, pki)
    await nursery.start(serve_admin, running.relay)
    client = AdminClient(AdminEndpoint.from_config(running.relay.config))
    write_config(
        path, tls_dir=tls_dir, keydir=keydir, targets={"build42": one.port, "build43": two.port}
    )

    answer = await client.reload()

    assert answer == {"ok": True, "targets": ["build42", "build43"], "restart_needed": []}
    path.write_text(path.read_text().replace('kind = "gdbserver"', 'kind = "gdbsrv"', 1))
    with pytest.raises(AdminError) as info:
        await client.reload()
    assert (info.value.status, info.value.reason) == (409, "reload_failed")
    assert any("targets[0].kind" in p for p in info.value.body["problems"])
    assert info.value.body["targets"] == ["build42", "build43"]  # still the last good config
    audited = [r for r in relay_audit(running.relay.config) if r.get("event") == "admin.reload"]
    assert [r["ok"] for r in audited] == [True, False]
    assert all(r["actor"].startswith("unix:uid=") for r in audited)
    running.stop.set()


# -- shutdown ----------------------------------------------------------------
#
# These run on trio's MockClock *without* autojump: time stands still unless
# the test jumps it, so real sockets work and the grace is measured exactly.


async def raw_tls(port: int, ca: Path) -> trio.abc.Stream:
    tls = make_client_engine(ca=ca).wrap(await trio.open_tcp_stream("127.0.0.1", port), "127.0.0.1")
    await tls.do_handshake()
    return tls


async def test_drain_refuses_new_connections_and_ends_tunnels_after_the_grace(
    nursery, mock_clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    config = make_config(
        [{"name": "build42", "kind": "gdbserver", "backend": f"tcp://127.0.0.1:{backend.port}",
          "probe_interval": "0"}],
        shutdown_grace="30s",
    )  # fmt: skip
    relay = open_relay(config, metrics=Metrics(version="test", targets=["build42"]))
    stop, done = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus) -> None:
        try:
            await serve_relay(relay, stop=stop, task_status=task_status)
        finally:
            relay.close()
            done.set()

    listeners = await nursery.start(run)
    port = listeners[0].socket.getsockname()[1]
    running = RunningRelay(relay, port, pki / "ca.pem", stop, relay.metrics)
    live, sid, _ = await open_tunnel(running.settings(token_for()))
    # Accepted before the stop, preamble not sent yet.
    early = await raw_tls(port, running.ca)

    stop.set()
    await trio.testing.wait_all_tasks_blocked()

    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
    await early.send_all(render_request(method="CONNECT", target="build42", token=token_for()))
    parser = ResponseParser()
    while (event := parser.next_event()) is NEED_DATA:
        parser.receive_data(await early.receive_some(4096))
    assert (event.status, event.reason) == (503, "shutting_down")

    mock_clock.jump(29)
    await echo(live, b"the tunnel keeps working during the grace")
    assert not done.is_set()
    mock_clock.jump(2)
    await receive_eof(live)
    await done.wait()
    end = session_end_record(config, sid)
    assert end["event"] == "session.closed" and end["reason"] == "shutdown"
    (stopped,) = [r for r in relay_audit(config) if r.get("event") == "relay.stopped"]
    assert stopped["sessions_left"] == 0


async def test_drain_finishes_early_when_the_last_tunnel_closes(
    nursery, mock_clock, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(
        nursery,
        make_config(
            [{"name": "build42", "kind": "gdbserver",
              "backend": f"tcp://127.0.0.1:{backend.port}", "probe_interval": "0"}],
            shutdown_grace="30s",
        ),
        pki,
    )  # fmt: skip
    live, sid, _ = await open_tunnel(running.settings(token_for()))
    running.stop.set()
    await trio.testing.wait_all_tasks_blocked()
    assert running.relay.draining and running.relay.sessions
    await live.aclose()
    await running.relay.wait_session_gone(sid)
    # No clock jump was needed: the relay stopped as soon as the tunnel closed.
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == 0
    records = relay_audit(running.relay.config)
    assert any(r.get("event") == "relay.stopped" for r in records)
    assert session_end_record(running.relay.config, sid)["reason"] == "client_closed"
