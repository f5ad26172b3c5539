"""What a relay loads, and which of its modules import which.

A stdlib-engine SQLite relay without metrics or an IdP stays lean: each
such check runs a real tunnel in a fresh interpreter (a pytest process has
imported everything already) and then reads that interpreter's
``sys.modules``.  The session, the watcher and the gate see the relay
through the narrow contexts they declare, never :mod:`relay.server`: those
checks read the source.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from relay import gate, session, watch
from relay.context import RelayContext
from relay.server import open_relay
from relay.session import SessionContext
from relay.watch import WatchContext

from .. import accounts
from ..processes import json_of_script

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
    return json_of_script(_SCRIPT, *args, metrics_listen)


def test_a_stdlib_relay_without_metrics_or_idp_loads_no_optional_library(tmp_path, pki, keydir):
    assert _loaded(tmp_path, pki, keydir, "stdlib", "") == []


def test_the_checks_see_the_modules_when_they_are_in_use(tmp_path, pki, keydir):
    loaded = _loaded(tmp_path, pki, keydir, "pyopenssl", "127.0.0.1:0")
    assert "OpenSSL" in loaded and "prometheus_client" in loaded


# -- who imports whom ---------------------------------------------------------

_RELAY = Path(__file__).resolve().parents[2] / "relay"


def _module_name(path: Path) -> str:
    parts = ("relay", *path.relative_to(_RELAY).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _relay_imports() -> dict[str, set[str]]:
    """Each relay module's imports of other relay modules, read from the source.

    Every import counts: at the top, inside functions and under
    ``TYPE_CHECKING`` alike, since a type-only import ties the modules
    together as much as the others do.
    """
    modules = {_module_name(p): p for p in _RELAY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = found & modules.keys()
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_sessions_the_watcher_and_the_gate_never_import_the_server():
    graph = _relay_imports()
    assert "relay.session" in graph["relay.server"]  # the check reads real imports
    for module in ("relay.session", "relay.watch", "relay.gate"):
        assert "relay.server" not in _reachable(graph, module), module


def _declarations(protocol: type) -> list[type]:
    """``protocol`` and the protocols it extends, nearest first."""
    return [cls for cls in protocol.__mro__ if getattr(cls, "_is_protocol", False)]


def _members(protocol: type) -> set[str]:
    return {
        name
        for cls in _declarations(protocol)
        for name in (*vars(cls), *vars(cls).get("__annotations__", {}))
        if not name.startswith("_")
    }


def _declared(protocol: type, name: str) -> object:
    """What ``protocol`` (or the nearest protocol it extends) declares as ``name``."""
    return next((vars(cls)[name] for cls in _declarations(protocol) if name in vars(cls)), None)


def test_member_lookup_reads_the_protocols_a_context_extends():
    assert {"config", "metrics", "audit_event"} <= _members(SessionContext)
    assert {"config", "metrics", "audit_event"} <= _members(WatchContext)
    assert _declared(WatchContext, "audit_event") is vars(RelayContext)["audit_event"]


def _uses_of(path: Path) -> set[str]:
    """Attributes read off ``relay`` or ``self.relay`` in a module."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id == "relay":
            used.add(node.attr)
        elif (
            isinstance(owner, ast.Attribute)
            and owner.attr == "relay"
            and isinstance(owner.value, ast.Name)
            and owner.value.id == "self"
        ):
            used.add(node.attr)
    return used


@pytest.mark.parametrize(
    ("module", "protocol"),
    [(session, SessionContext), (watch, WatchContext), (gate, RelayContext)],
    ids=["session", "watch", "gate"],
)
def test_a_module_reaches_the_relay_only_through_its_context(module, protocol):
    used = _uses_of(Path(module.__file__))
    assert used  # the check sees the module's uses
    assert used <= _members(protocol), sorted(used - _members(protocol))


def test_the_relay_provides_each_context(make_config):
    relay = open_relay(
        make_config([{"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:9"}])
    )
    try:
        assert isinstance(relay, SessionContext)
        for protocol in (SessionContext, WatchContext, RelayContext):
            for name in _members(protocol):
                assert hasattr(relay, name), (protocol.__name__, name)
                declared = _declared(protocol, name)
                provided = getattr(relay, name)
                if inspect.isfunction(declared) and (
                    inspect.ismethod(provided) or inspect.isfunction(provided)
                ):
                    # Same parameters of the same kinds: a renamed keyword fails here.
                    ours = list(inspect.signature(declared).parameters.values())[1:]
                    theirs = inspect.signature(provided).parameters.values()
                    assert [(p.name, p.kind) for p in ours] == [(p.name, p.kind) for p in theirs], (
                        protocol.__name__,
                        name,
                    )
    finally:
        relay.close()
