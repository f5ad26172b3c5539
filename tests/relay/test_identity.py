"""IdP tokens through a real relay: a real OpenID provider on loopback (HTTPS, trustme CA).

Time: these tests use trio's ``MockClock`` without autojump (the ``mock_clock``
fixture) because real sockets are involved: the clock moves only when a test
calls ``mock_clock.jump``, and the test then waits for the relay's fetch to
complete (``IdentityKeys.wait_attempt``), never for real time.  The relay's
wall clock is ``T0 + trio.current_time()``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from auth import issue_token, load_signing_key
from config import Config, config_from_dict
from relay.connector import RelayRefused, open_tunnel, preflight
from relay.metrics import Metrics
from relay.server import open_relay, serve_relay
from relay.tls import make_client_engine

from ..idp import FakeIdP
from .conftest import RunningRelay, start_echo

T0 = 1_800_000_000.0
REFRESH = 3600.0
COOLDOWN = 300.0
STALENESS = 86400.0


@pytest.fixture(scope="session")
def idp_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def idp_ca_file(idp_ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "idp-ca.pem"
    idp_ca.cert_pem.write_to_path(str(path))
    return path


def wall() -> float:
    return T0 + trio.current_time()


def identity_config(
    tmp_path: Path,
    pki: Path,
    keydir: Path,
    idp: FakeIdP,
    idp_ca_file: Path,
    *,
    targets: list[dict[str, Any]],
    oidc: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
) -> Config:
    data = {
        "relay": {"listen": ["127.0.0.1:0"], "state_dir": str(tmp_path / "state")},
        "tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")} | (tls or {}),
        "auth": {"jwks": str(keydir / "jwks.json"), "leeway": "0s"},
        "identity": {
            "oidc": [
                {
                    "issuer": idp.issuer,
                    "audience": "dbgrelay",
                    "ca": str(idp_ca_file),
                    "refresh_interval": f"{REFRESH:g}s",
                    "unknown_kid_cooldown": f"{COOLDOWN:g}s",
                    "max_staleness": f"{STALENESS:g}s",
                }
                | (oidc or {})
            ]
        }
        | (identity or {}),
        "metrics": {"listen": ""},
        "targets": targets,
    }
    return config_from_dict(data, base_dir=tmp_path)


async def start(nursery: trio.Nursery, config: Config, pki: Path) -> RunningRelay:
    metrics = Metrics(version="test", targets=[t.name for t in config.targets])
    relay = open_relay(config, metrics=metrics, wall_clock=wall)
    relay.fsync_in_thread = False
    stop = trio.Event()

    async def run(task_status: trio.TaskStatus) -> None:
        try:
            await serve_relay(relay, stop=stop, task_status=task_status)
        finally:
            relay.close()

    listeners = await nursery.start(run)
    return RunningRelay(
        relay=relay,
        port=listeners[0].socket.getsockname()[1],
        ca=pki / "ca.pem",
        stop=stop,
        metrics=metrics,
    )


def settings_for(running: RunningRelay, token: str, target: str, engine: Any = None):
    settings = running.settings(token, target)
    return settings if engine is None else dataclasses.replace(settings, engine=engine)


async def echo_through(
    running: RunningRelay, token: str, target: str = "build42", engine: Any = None
) -> str:
    """Open a real tunnel with ``token``, echo a line through it; return the session id."""
    tls, session_id, first = await open_tunnel(settings_for(running, token, target, engine))
    try:
        await tls.send_all(b"ping\n")
        got = bytearray(first)
        while len(got) < 5:
            data = await tls.receive_some(100)
            assert data, "tunnel closed early"
            got += data
        assert bytes(got) == b"ping\n"
    finally:
        await tls.aclose()
    return session_id


async def refused(
    running: RunningRelay, token: str, target: str = "build42", engine: Any = None
) -> RelayRefused:
    with pytest.raises(RelayRefused) as info:
        await preflight(settings_for(running, token, target, engine))
    return info.value


def audit_events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


@pytest.fixture
async def idp(nursery: trio.Nursery, idp_ca: trustme.CA) -> FakeIdP:
    provider = FakeIdP(ca=idp_ca)
    await nursery.start(provider.serve)
    return provider


def echo_target(port: int, **kw: Any) -> dict[str, Any]:
    return {"name": "build42", "kind": "tcp", "backend": f"tcp://127.0.0.1:{port}"} | kw


# -- a token from the IdP opens a tunnel -----------------------------------------


async def test_idp_token_opens_a_real_tunnel(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir, caplog
) -> None:
    caplog.set_level(logging.INFO)
    key = idp.add_key("RS256")
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    token = idp.mint(key, now=wall(), sub="alice", targets=["build*"])
    await echo_through(running, token)
    assert backend.received == b"ping\n"
    (accepted,) = [
        r for r in audit_events(caplog, "token.accepted") if not getattr(r, "preflight", False)
    ]
    assert accepted.issuer == idp.issuer
    assert accepted.sub == "alice"
    assert accepted.granted_by == "token"
    assert accepted.admitted_by == "open"
    running.stop.set()


async def test_local_tokens_keep_working_beside_idp_tokens(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir, caplog
) -> None:
    caplog.set_level(logging.INFO)
    key = idp.add_key("ES256")
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    local = issue_token(
        load_signing_key(keydir / "signing.key"),
        user="bob",
        targets=["build42"],
        ttl=3600,
        issuer="dbgrelay",
        audience="dbgrelay",
        now=wall(),
    )
    await echo_through(running, local)
    await echo_through(running, idp.mint(key, now=wall(), targets=["build42"]))
    issuers = [r.issuer for r in audit_events(caplog, "token.accepted")]
    assert "dbgrelay" in issuers and idp.issuer in issuers
    running.stop.set()


# -- rotation ---------------------------------------------------------------------


async def test_rotation_new_kid_after_refresh_old_until_it_leaves(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir
) -> None:
    old = idp.add_key("RS256")
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    keys = running.relay.identity
    await echo_through(running, idp.mint(old, now=wall(), targets=["build42"]))

    # The IdP starts signing with a new key: the relay does not know it yet.
    new = idp.add_key("ES256")
    token_new = idp.mint(new, now=wall(), targets=["build42"])
    assert (await refused(running, token_new)).reason == "unknown_kid"
    # The miss asked for a fetch, which waits for the cooldown.
    done = keys.attempts(idp.issuer)
    mock_clock.jump(COOLDOWN)
    await keys.wait_attempt(idp.issuer, done)
    await echo_through(running, token_new)
    # The old key is still published: its tokens still work.
    await echo_through(running, idp.mint(old, now=wall(), targets=["build42"]))

    # The old key leaves the JWKS; the next timed refresh drops it.
    idp.remove_key(old)
    done = keys.attempts(idp.issuer)
    mock_clock.jump(REFRESH)
    await keys.wait_attempt(idp.issuer, done)
    assert (await refused(running, idp.mint(old, now=wall(), targets=["build42"]))).reason == (
        "unknown_kid"
    )
    await echo_through(running, idp.mint(new, now=wall(), targets=["build42"]))
    running.stop.set()


# -- outage -----------------------------------------------------------------------


async def test_idp_outage_keys_kept_until_max_staleness_then_refused(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir, caplog
) -> None:
    caplog.set_level(logging.INFO)
    key = idp.add_key("RS256")
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    keys = running.relay.identity
    fetched_at = wall()

    idp.mode = "down"
    # Past the refresh interval (where PyJWKClient's lifespan would drop the
    # keys): the fetch fails, the last good keys stay in use.
    done = keys.attempts(idp.issuer)
    mock_clock.jump(REFRESH + 1)
    await keys.wait_attempt(idp.issuer, done)
    assert audit_events(caplog, "identity.fetch_failed")
    await echo_through(running, idp.mint(key, now=wall(), targets=["build42"]))

    # Just inside the staleness limit: still verifying.  (The jump passes a
    # retry time: wait for that fetch to fail, so none is in flight below.)
    done = keys.attempts(idp.issuer)
    mock_clock.jump(fetched_at + STALENESS - wall())
    await keys.wait_attempt(idp.issuer, done)
    await echo_through(running, idp.mint(key, now=wall(), ttl=60, targets=["build42"]))

    # One second past it: refused, with the reason stated.
    mock_clock.jump(1.5)
    exc = await refused(running, idp.mint(key, now=wall(), ttl=60, targets=["build42"]))
    assert (exc.status, exc.reason) == (401, "keys_stale")
    assert "cannot reach the token's identity provider" in exc.message
    (rejected,) = [
        r
        for r in audit_events(caplog, "token.rejected")
        if r.name == "dbgrelay.session" and r.reason == "keys_stale"
    ]
    assert "max_staleness" in rejected.error and idp.issuer in rejected.error

    # The IdP comes back: the next retry restores service.
    idp.mode = "up"
    done = keys.attempts(idp.issuer)
    mock_clock.jump(60)
    await keys.wait_attempt(idp.issuer, done)
    await echo_through(running, idp.mint(key, now=wall(), targets=["build42"]))
    running.stop.set()


@pytest.mark.parametrize("mode", ["error", "bad_json", "huge", "hang", "wrong_issuer", "down"])
async def test_misbehaving_idp_keeps_the_last_good_keys(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir, caplog, mode
) -> None:
    caplog.set_level(logging.INFO)
    key = idp.add_key("RS256")
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    keys = running.relay.identity
    idp.mode = mode
    done = keys.attempts(idp.issuer)
    mock_clock.jump(REFRESH)
    if mode == "hang":
        # The fetch is under way and the IdP never answers: fetch_timeout ends it.
        await idp.wait_discovery_hits(2)
        mock_clock.jump(10)
    await keys.wait_attempt(idp.issuer, done)
    (failed,) = audit_events(caplog, "identity.fetch_failed")
    assert failed.issuer == idp.issuer and failed.error
    await echo_through(running, idp.mint(key, now=wall(), targets=["build42"]))
    running.stop.set()


# -- a flood of unknown kids ------------------------------------------------------


async def test_a_thousand_unknown_kids_make_at_most_one_fetch_per_cooldown(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir
) -> None:
    key = idp.add_key("RS256")
    stranger = FakeIdP(ca=idp.ca, port=idp.port)  # same issuer URL, keys the IdP never published
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    keys = running.relay.identity
    assert idp.jwks_hits == 1

    async def flood() -> None:
        from relay.access import authorize

        for _ in range(1000):
            forged = stranger.mint(stranger.add_key("ES256"), now=wall(), targets=["build42"])
            stranger.keys.clear()
            with pytest.raises(Exception) as info:
                authorize(
                    token=forged,
                    target_name="build42",
                    config=running.relay.config,
                    keys=running.relay.keys,
                    revoked=running.relay.revoked,
                    now=wall(),
                    oidc=keys.trust(),
                )
            assert info.value.reason == "unknown_kid"

    for _ in range(3):
        started = keys.fetches_started(idp.issuer)
        await flood()
        # A real tunnel with an unknown kid is refused the same way.
        forged = stranger.mint(stranger.add_key("ES256"), now=wall(), targets=["build42"])
        assert (await refused(running, forged)).reason == "unknown_kid"
        # Nothing is fetched before the cooldown ends...
        mock_clock.jump(COOLDOWN - 1)
        await trio.testing.wait_all_tasks_blocked()
        assert keys.fetches_started(idp.issuer) == started
        # ...and exactly one fetch when it does.
        done = keys.attempts(idp.issuer)
        mock_clock.jump(1)
        await keys.wait_attempt(idp.issuer, done)
        assert keys.fetches_started(idp.issuer) == started + 1
    assert idp.jwks_hits == 4
    await echo_through(running, idp.mint(key, now=wall(), targets=["build42"]))
    running.stop.set()


# -- groups -----------------------------------------------------------------------


async def test_groups_grant_and_refuse(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir, caplog
) -> None:
    caplog.set_level(logging.INFO)
    key = idp.add_key("RS256")
    backend = await start_echo(nursery)
    targets = [
        echo_target(backend.port, allow_groups=["firmware"]),
        echo_target(backend.port, name="lab1", allow_users=["bob"], allow_groups=["lab-admins"]),
    ]
    config = identity_config(
        tmp_path,
        pki,
        keydir,
        idp,
        idp_ca_file,
        targets=targets,
        identity={"group_targets": {"firmware": ["build*"]}},
    )
    running = await start(nursery, config, pki)

    def token(**claims: Any) -> str:
        return idp.mint(key, now=wall(), **claims)

    # A group maps to the target: no targets claim needed.
    await echo_through(running, token(groups=["sales", "firmware"]))
    accepted = [r for r in audit_events(caplog, "token.accepted") if r.name == "audit"]
    assert (accepted[-1].granted_by, accepted[-1].admitted_by) == (
        "group:firmware",
        "group:firmware",
    )
    # No group maps to it and no targets claim: 403 before anything about the target.
    exc = await refused(running, token(groups=["sales"]))
    assert (exc.status, exc.reason) == (403, "not_granted")
    # Granted by the token, but neither the user nor a group passes lab1's allow lists.
    exc = await refused(running, token(targets=["lab1"], groups=["firmware"]), "lab1")
    assert (exc.status, exc.reason) == (403, "not_allowed")
    # A group in allow_groups admits; so does the user in allow_users.
    await echo_through(running, token(targets=["lab1"], groups=["lab-admins"]), "lab1")
    accepted = [r for r in audit_events(caplog, "token.accepted") if r.name == "audit"]
    assert (accepted[-1].granted_by, accepted[-1].admitted_by) == ("token", "group:lab-admins")
    await echo_through(running, token(sub="bob", targets=["lab1"]), "lab1")
    # A locally issued token has no groups: allow_groups does not admit it.
    local = issue_token(
        load_signing_key(keydir / "signing.key"),
        user="carol",
        targets=["build42"],
        ttl=3600,
        issuer="dbgrelay",
        audience="dbgrelay",
        now=wall(),
    )
    exc = await refused(running, local)
    assert (exc.status, exc.reason) == (403, "not_allowed")
    # The connector is told whom the relay sees.
    headers = await preflight(running.settings(token(groups=["firmware", "x y"])))
    assert headers["dbgrelay-user"] == "alice"
    assert headers["dbgrelay-groups"] == "firmware,x y"
    running.stop.set()


async def test_admin_rights_from_a_group(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir
) -> None:
    from config import AdminSection
    from relay.admin_client import AdminClient, AdminError

    from .test_admin import start_admin

    key = idp.add_key("ES256")
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path,
        pki,
        keydir,
        idp,
        idp_ca_file,
        targets=[echo_target(backend.port)],
        identity={"admin_groups": ["dbg-admins"]},
    )
    config = dataclasses.replace(config, admin=AdminSection(listen=("127.0.0.1", 0)))
    running = await start(nursery, config, pki)
    endpoint = await start_admin(nursery, running)
    member = idp.mint(key, now=wall(), sub="root", groups=["dbg-admins"])
    admin = AdminClient(dataclasses.replace(endpoint, token=member))
    assert await admin.sessions() == []
    outsider = idp.mint(key, now=wall(), sub="eve", groups=["firmware"])
    with pytest.raises(AdminError) as info:
        await AdminClient(dataclasses.replace(endpoint, token=outsider)).health()
    assert (info.value.status, info.value.reason) == (403, "not_admin")
    running.stop.set()


# -- client certificate bound to the user -----------------------------------------


@pytest.fixture(scope="session")
def client_ca() -> trustme.CA:
    return trustme.CA()


def client_engine(tmp_path: Path, running: RunningRelay, ca: trustme.CA, *names: str, cn: str):
    cert = ca.issue_cert(*names, common_name=cn)
    cert_path, key_path = tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return make_client_engine(
        engine=running.relay.config.tls.engine,
        ca=running.ca,
        min_version="1.2",
        cert=cert_path,
        key=key_path,
    )


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
async def test_certificate_user_rule_admits_and_refuses(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir, client_ca, engine, caplog
) -> None:
    caplog.set_level(logging.INFO)
    key = idp.add_key("RS256")
    backend = await start_echo(nursery)
    ca_file = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(ca_file))
    config = identity_config(
        tmp_path,
        pki,
        keydir,
        idp,
        idp_ca_file,
        oidc={"user_claim": "email"},
        tls={"client_ca": str(ca_file), "engine": engine},
        targets=[
            echo_target(backend.port, cert_user="cn"),
            echo_target(backend.port, name="lab1", cert_user="san"),
        ],
    )
    running = await start(nursery, config, pki)
    token = idp.mint(key, now=wall(), email="alice@corp.example", targets=["build42", "lab1"])
    alice_cn = client_engine(
        tmp_path, running, client_ca, "laptop.corp.example", cn="alice@corp.example"
    )
    alice_san = client_engine(tmp_path, running, client_ca, "alice@corp.example", cn="laptop-7")
    mallory = client_engine(
        tmp_path, running, client_ca, "mallory@corp.example", cn="mallory@corp.example"
    )

    await echo_through(running, token, "build42", engine=alice_cn)
    await echo_through(running, token, "lab1", engine=alice_san)
    accepted = [r for r in audit_events(caplog, "token.accepted") if r.name == "audit"]
    assert accepted[-1].cert_rule == "san"
    for target, engine_ in [("build42", alice_san), ("lab1", alice_cn), ("build42", mallory)]:
        exc = await refused(running, token, target, engine=engine_)
        assert (exc.status, exc.reason) == (403, "cert_user_mismatch")
    # Without a client certificate the rule cannot be met either.
    exc = await refused(running, token, "build42")
    assert (exc.status, exc.reason) == (403, "cert_user_mismatch")
    running.stop.set()


async def test_relay_starts_while_the_idp_is_down_and_catches_up(
    nursery, mock_clock, idp, idp_ca_file, tmp_path, pki, keydir
) -> None:
    key = idp.add_key("RS256")
    idp.mode = "down"
    backend = await start_echo(nursery)
    config = identity_config(
        tmp_path, pki, keydir, idp, idp_ca_file, targets=[echo_target(backend.port)]
    )
    running = await start(nursery, config, pki)
    token = idp.mint(key, now=wall(), targets=["build42"])
    exc = await refused(running, token)
    assert (exc.status, exc.reason) == (401, "keys_unavailable")
    idp.mode = "up"
    keys = running.relay.identity
    done = keys.attempts(idp.issuer)
    mock_clock.jump(30)
    await keys.wait_attempt(idp.issuer, done)
    await echo_through(running, token)
    running.stop.set()


def test_a_bad_idp_ca_file_is_refused_at_start(tmp_path, pki, keydir, idp_ca_file) -> None:
    from relay.errors import LocalProtocolError
    from relay.server import load_runtime

    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello\n")
    provider = FakeIdP(ca=trustme.CA(), port=8443)
    config = identity_config(
        tmp_path, pki, keydir, provider, idp_ca_file, targets=[], oidc={"ca": str(bad)}
    )
    with pytest.raises(LocalProtocolError, match=r"identity\.oidc\[0\]\.ca: cannot load"):
        load_runtime(config)
