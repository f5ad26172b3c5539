"""What a relay loads: a stdlib-engine SQLite relay without metrics or an IdP stays lean.

Each check runs a real tunnel in a fresh interpreter (a pytest process has
imported everything already) and then reads that interpreter's
``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .. import accounts

_SCRIPT = r"""
import json, sys, time
from pathlib import Path

import trio

from auth import issue_token, load_signing_key
from config import config_from_dict
from relay.cli import _make_metrics
from relay.connector import ConnectorSettings, open_tunnel
from relay.server import open_relay, serve_relay
from relay.tls import make_client_engine

pki, keydir, tmp, account, engine, metrics_listen = sys.argv[1:7]
pki, keydir, tmp = Path(pki), Path(keydir), Path(tmp)


async def main():
    async def echo(stream):
        async for data in stream:
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, echo, listeners)
        port = listeners[0].socket.getsockname()[1]
        config = config_from_dict(
            {
                "relay": {
                    "listen": ["127.0.0.1:0"],
                    "state_dir": str(tmp / "state"),
                    "run_as": account,
                },
                "tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key"),
                        "engine": engine},
                "auth": {"jwks": str(keydir / "jwks.json"),
                         "audit_key": str(keydir / "audit.key")},
                "metrics": {"listen": metrics_listen},
                "targets": [{"name": "build42", "kind": "gdbserver",
                             "backend": f"tcp://127.0.0.1:{port}", "probe_interval": "0"}],
            },
            base_dir=tmp,
        )
        relay = open_relay(config, metrics=_make_metrics(config))
        stop = trio.Event()
        relay_listeners = await nursery.start(lambda task_status: serve_relay(relay, stop=stop, task_status=task_status))
        token = issue_token(load_signing_key(keydir / "signing.key"), user="alice",
                            targets=["build42"], ttl=600, issuer="dbgrelay",
                            audience="dbgrelay", now=time.time())
        settings = ConnectorSettings(
            relay_host="127.0.0.1", relay_port=relay_listeners[0].socket.getsockname()[1],
            server_name="127.0.0.1", target="build42", token=token, listen=("127.0.0.1", 0),
            engine=make_client_engine(engine=engine, ca=pki / "ca.pem"),
        )
        tls, _, _ = await open_tunnel(settings)
        await tls.send_all(b"ping")
        assert await tls.receive_some(10) == b"ping"
        await tls.aclose()
        await relay.wait_no_sessions()
        stop.set()
        relay.close()
        nursery.cancel_scope.cancel()


OPTIONAL = ("OpenSSL", "prometheus_client", "httpx", "psycopg")
trio.run(main)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)))
"""


def _loaded(tmp_path: Path, pki: Path, keydir: Path, engine: str, metrics_listen: str) -> list[str]:
    args = [str(pki), str(keydir), str(tmp_path), accounts.target_account(), engine]
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *args, metrics_listen],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_stdlib_relay_without_metrics_or_idp_loads_no_optional_library(tmp_path, pki, keydir):
    assert _loaded(tmp_path, pki, keydir, "stdlib", "") == []


def test_the_checks_see_the_modules_when_they_are_in_use(tmp_path, pki, keydir):
    loaded = _loaded(tmp_path, pki, keydir, "pyopenssl", "127.0.0.1:0")
    assert "OpenSSL" in loaded and "prometheus_client" in loaded
