"""Everything ``dbgrelay demo`` needs: dev keys, a dev CA, demo targets, a token.

The demo is a real relay with a real config file: it writes
``<state>/dbgrelay.toml`` and serves it exactly as ``dbgrelay serve`` would,
so the file doubles as a starting point for a production config.
"""

from __future__ import annotations

import os
import pwd
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from auth import init_keys, init_pki, issue_token, load_signing_key

__all__ = ["DemoSetup", "prepare_demo", "serve_echo", "write_demo_config"]

USER = "demo"


@dataclass(frozen=True, slots=True)
class DemoSetup:
    state: Path
    config: Path
    token_file: Path
    ca: Path
    port: int
    gdbserver: str | None


def prepare_demo(state: Path, *, port: int) -> DemoSetup:
    """Create (or reuse) the demo's keys, CA and token under ``state``."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = state / "keys"
    if not (keys / "signing.key").exists():
        init_keys(keys)
    pki = state / "pki"
    if not (pki / "server.pem").exists():
        init_pki(pki, ["127.0.0.1", "localhost"])
    signing = load_signing_key(keys / "signing.key")
    token = issue_token(
        signing,
        user=USER,
        targets=["demo-*"],
        ttl=8 * 3600,
        issuer="dbgrelay",
        audience="dbgrelay",
        now=time.time(),
    )
    token_file = state / "demo.jwt"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return DemoSetup(
        state=state,
        config=state / "dbgrelay.toml",
        token_file=token_file,
        ca=pki / "ca.pem",
        port=port,
        gdbserver=shutil.which("gdbserver"),
    )


def write_demo_config(setup: DemoSetup, *, echo_port: int) -> None:
    """Write the demo's config: an echo target and, if gdbserver exists, a managed one."""
    lines = [
        "# Written by 'dbgrelay demo'. A working config: copy it and adapt it.",
        "[relay]",
        f'listen = ["127.0.0.1:{setup.port}"]',
        'state_dir = "."',
        "",
        "[tls]",
        'cert = "pki/server.pem"',
        'key = "pki/server.key"',
        'min_version = "1.2"',
        "",
        "[auth]",
        'jwks = "keys/jwks.json"',
        'audit_key = "keys/audit.key"',
        "",
        "[metrics]",
        'listen = "127.0.0.1:0"',
        "",
        "[admin]",
        'listen = "unix:admin.sock"',
        "",
        "[[targets]]",
        'name = "demo-echo"',
        'kind = "tcp"',
        f'backend = "tcp://127.0.0.1:{echo_port}"',
        'idle_timeout = "15m"',
        'probe_interval = "0"',
    ]
    if setup.gdbserver:
        lines += [
            "",
            "# A debug server launched on the first tunnel and killed when idle.",
            "[[targets]]",
            'name = "demo-gdb"',
            'kind = "gdbserver"',
            'backend = "tcp://127.0.0.1:{port}"',
            f'launch = ["{setup.gdbserver}", "--once", "127.0.0.1:{{port}}", "/bin/sleep", "3600"]',
            'idle_timeout = "5m"',
            'max_session = "8h"',
        ]
        if os.geteuid() != 0:
            # Not root: the relay can only run servers as this account
            # (development mode; a deployed relay uses dbgrelay-target).
            lines.append(f'run_as = "{pwd.getpwuid(os.geteuid()).pw_name}"')
    tmp = setup.config.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, setup.config)


async def serve_echo(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A plaintext echo server on 127.0.0.1 (the demo's stand-in debug server)."""

    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, echo, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
