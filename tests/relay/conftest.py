"""Fixtures for relay tests: a real PKI, real keys, and a relay on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from auth import init_keys, init_pki, issue_token, load_signing_key
from config import Config, config_from_dict
from relay.connector import ConnectorSettings
from relay.metrics import Metrics
from relay.server import Relay, open_relay, serve_relay
from relay.tls import make_client_engine, make_server_engine

from .. import accounts


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1 and localhost, from ``certs init``'s code."""
    out = tmp_path_factory.mktemp("pki")
    init_pki(out, ["127.0.0.1", "localhost"])
    return out


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    init_keys(out)
    return out


@pytest.fixture
def engine() -> str:
    """The TLS engine of relay and client; suites that cover both parametrize it."""
    return "stdlib"


@pytest.fixture
def make_config(tmp_path: Path, pki: Path, keydir: Path, engine: str) -> Callable[..., Config]:
    """Build a validated config; keyword arguments override [relay] keys, ``limits`` is [limits]."""

    def make(
        targets: list[dict[str, Any]],
        *,
        tls: dict | None = None,
        limits: dict | None = None,
        **relay: Any,
    ) -> Config:
        tls_section = {
            "cert": str(pki / "server.pem"),
            "key": str(pki / "server.key"),
            "engine": engine,
        }
        data = {
            "relay": {
                "listen": ["127.0.0.1:0"],
                "state_dir": str(tmp_path / "state"),
                "run_as": accounts.target_account(),
            }
            | relay,
            "tls": tls_section | (tls or {}),
            "auth": {"jwks": str(keydir / "jwks.json"), "audit_key": str(keydir / "audit.key")},
            "metrics": {"listen": ""},
            "targets": targets,
        }
        if limits is not None:
            data["limits"] = limits
        return config_from_dict(data, base_dir=tmp_path)

    return make


@pytest.fixture
def token_for(keydir: Path) -> Callable[..., str]:
    key = load_signing_key(keydir / "signing.key")

    def make(
        user: str = "alice",
        targets: list[str] | tuple[str, ...] = ("build42",),
        *,
        ttl: float = 3600,
        now: float | None = None,
        **kw: Any,
    ) -> str:
        return issue_token(
            key,
            user=user,
            targets=list(targets),
            ttl=ttl,
            issuer=kw.pop("issuer", "dbgrelay"),
            audience=kw.pop("audience", "dbgrelay"),
            now=time.time() if now is None else now,
            **kw,
        )

    return make


def session_files(audit_dir: Path) -> list[Path]:
    """Session audit files in which a session began.

    A running relay keeps a few files made ahead of time (a header and no
    record yet, :mod:`relay.audit_pool`); they are not sessions.
    """
    return [
        path
        for path in audit_dir.glob("*/*.jsonl")
        if not path.name.endswith(".bytes.jsonl") and len(path.read_bytes().splitlines()) > 1
    ]


@dataclass
class Backend:
    """A plaintext echo server on loopback that counts its connections."""

    port: int
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)


async def start_echo(nursery: trio.Nursery) -> Backend:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend = Backend(port=listeners[0].socket.getsockname()[1])

    async def echo(stream: trio.SocketStream) -> None:
        backend.connections += 1
        try:
            async for data in stream:
                backend.received += data
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    await nursery.start(trio.serve_listeners, echo, listeners)
    return backend


@dataclass
class RunningRelay:
    relay: Relay
    port: int
    ca: Path
    stop: trio.Event
    metrics: Metrics

    def settings(self, token: str, target: str = "build42", **kw: Any) -> ConnectorSettings:
        return ConnectorSettings(
            relay_host="127.0.0.1",
            relay_port=self.port,
            server_name="127.0.0.1",
            target=target,
            token=token,
            listen=("127.0.0.1", 0),
            engine=make_client_engine(
                engine=self.relay.config.tls.engine, ca=self.ca, min_version="1.2"
            ),
            **kw,
        )


async def start_relay(nursery: trio.Nursery, config: Config, pki: Path) -> RunningRelay:
    metrics = Metrics(version="test", targets=[t.name for t in config.targets])
    relay = open_relay(config, metrics=metrics)
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


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module", params=["stdlib", "pyopenssl"])
def engines(request, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory):
    """One TLS engine's server and client sides, built from files like the relay's."""
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(folder / "server.pem")
    cert.private_key_pem.write_to_path(folder / "server.key")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server = make_server_engine(
        engine=request.param, cert=folder / "server.pem", key=folder / "server.key"
    )
    client = make_client_engine(engine=request.param, ca=folder / "ca.pem")
    return server, client
