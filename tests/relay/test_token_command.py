"""``dbgrelay connect --token-command``: a real connector process gets a fresh IdP token
before the old one expires, during a live session.

The relay runs in this process (so the test can move its wall clock past the
first token's expiry instead of waiting for it); the connector is the real
``dbgrelay connect`` subprocess, and the token command is a real program that
hands out pre-minted tokens from the test's OpenID provider.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from auth import peek_unverified
from config import config_from_dict
from relay.metrics import Metrics
from relay.server import open_relay, serve_relay

from ..e2e.support import READY_TIMEOUT, ProcGroup
from ..idp import FakeIdP
from .conftest import start_echo
from .test_relay import audit_records

# Hands out token-1, then token-2 once the test has created "go".
TOKEN_COMMAND = """
import pathlib, sys, time
folder = pathlib.Path(sys.argv[1])
runs = folder / "runs"
n = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(n))
while n > 1 and not (folder / "go").exists():
    time.sleep(0.02)
print((folder / f"token-{min(n, 2)}").read_text())
"""


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    group = ProcGroup()
    try:
        yield group
    finally:
        group.close()


async def wait_line(proc, text: str) -> str:
    """A line of the connector's stderr, waited for in a thread so the relay keeps running."""
    return await trio.to_thread.run_sync(lambda: proc.wait_line(text, timeout=READY_TIMEOUT * 2))


async def echo_line(stream: trio.abc.Stream, data: bytes) -> None:
    await stream.send_all(data)
    got = bytearray()
    with trio.fail_after(READY_TIMEOUT):
        while len(got) < len(data):
            chunk = await stream.receive_some(4096)
            assert chunk, "tunnel closed"
            got += chunk
    assert bytes(got) == data


async def test_token_command_refreshes_before_expiry_during_a_live_session(
    nursery, tmp_path: Path, pki: Path, keydir: Path, procs: ProcGroup
) -> None:
    import trustme

    ca = trustme.CA()
    ca_file = tmp_path / "idp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    idp = FakeIdP(ca=ca)
    await nursery.start(idp.serve)
    key = idp.add_key("ES256")
    backend = await start_echo(nursery)

    # The relay's wall clock runs this far ahead of real time: an hour behind at
    # first, so the first token stays valid there however slow this machine is.
    shift = [-3600.0]
    config = config_from_dict(
        {
            "relay": {"listen": ["127.0.0.1:0"], "state_dir": str(tmp_path / "state")},
            "tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")},
            "auth": {"jwks": str(keydir / "jwks.json"), "leeway": "0s"},
            "identity": {
                "oidc": [{"issuer": idp.issuer, "audience": "dbgrelay", "ca": str(ca_file)}],
                "group_targets": {"firmware": ["build*"]},
            },
            "metrics": {"listen": ""},
            "targets": [
                {
                    "name": "build42",
                    "kind": "tcp",
                    "backend": f"tcp://127.0.0.1:{backend.port}",
                    # The first tunnel outlives its token on purpose.
                    "end_on_token_expiry": False,
                }
            ],
        },
        base_dir=tmp_path,
    )
    relay = open_relay(
        config, metrics=Metrics(version="test"), wall_clock=lambda: time.time() + shift[0]
    )
    stop = trio.Event()

    async def run(task_status: trio.TaskStatus) -> None:
        try:
            await serve_relay(relay, stop=stop, task_status=task_status)
        finally:
            relay.close()

    listeners = await nursery.start(run)
    port = listeners[0].socket.getsockname()[1]

    # Token 1 expires in a minute, inside the connector's refresh margin, so the
    # connector asks for the next one at once; the command hands it out only
    # when the test says "go".  Token 2 lives long.
    now = time.time()
    folder = tmp_path / "tokens"
    folder.mkdir()
    first = idp.mint(key, now=now - 7200, ttl=7260, groups=["firmware"])
    second = idp.mint(key, now=now - 7200, ttl=14400, groups=["firmware"])
    (folder / "token-1").write_text(first)
    (folder / "token-2").write_text(second)
    script = tmp_path / "get-token.py"
    script.write_text(TOKEN_COMMAND)

    connector = procs.dbgrelay(
        "connect",
        "--relay",
        f"127.0.0.1:{port}",
        "--ca",
        str(pki / "ca.pem"),
        "--target",
        "build42",
        "--listen",
        "127.0.0.1:0",
        "--token-command",
        f"{sys.executable} {script} {folder}",
        cwd=tmp_path,
        name="connect",
    )
    using = await wait_line(connector, "using identity")
    assert "identity alice, groups: firmware" in using and idp.issuer in using
    listening = await wait_line(connector, "listening on")
    local_port = int(listening.split("listening on ")[1].split(",")[0].rsplit(":", 1)[1])

    # A live session on the first token.
    live = await trio.open_tcp_stream("127.0.0.1", local_port)
    await echo_line(live, b"before\n")

    # The connector runs the command again before the first token expires.
    (folder / "go").touch()
    refreshed = await wait_line(connector, "token refreshed")
    assert "identity alice, groups: firmware" in refreshed
    assert (folder / "runs").read_text() == "2"

    # The relay's clock passes the first token's expiry: the live session
    # goes on, and a new tunnel is opened with the second token.
    shift[0] = peek_exp(first) + 1 - time.time()
    await echo_line(live, b"still alive\n")
    fresh = await trio.open_tcp_stream("127.0.0.1", local_port)
    await echo_line(fresh, b"after\n")
    await fresh.aclose()
    await live.aclose()

    jtis = [
        r.get("jti")
        for path in sorted(config.relay.audit_dir.glob("relay-*.jsonl"))
        for r in audit_records(path)
        if r.get("event") == "token.accepted" and not r.get("preflight")
    ]
    assert jtis == [peek_unverified(first)["jti"], peek_unverified(second)["jti"]]
    stop.set()


def peek_exp(token: str) -> float:
    import base64
    import json

    segment = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))["exp"]
