"""A real gdb debugs a real program through ``dbgrelay connect`` and ``dbgrelay serve``."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .conftest import GdbTools
from .support import Proc, ProcGroup, clean_env, config_text, free_port, run_cli, start_relay


def _issue_token(home: Path, target: str) -> Path:
    done = run_cli(
        "token", "issue", "--key", "keys/signing.key", "--user", "alice", "--target", target,
        "--ttl", "2h", cwd=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token_file = home / "alice.jwt"
    token_file.write_text(done.stdout)
    return token_file


def _start_connector(
    procs: ProcGroup, home: Path, relay_addr: str, target: str, engine: str = "stdlib"
) -> str:
    """Start ``dbgrelay connect`` for ``target``; return the loopback address gdb should use."""
    token_file = _issue_token(home, target)
    connect = procs.dbgrelay(
        "connect", "--relay", relay_addr, "--ca", "pki/ca.pem", "--target", target,
        "--token-file", token_file, "--listen", "127.0.0.1:0", "--tls-engine", engine,
        cwd=home, name="connect",
    )  # fmt: skip
    command = connect.wait_line("gdb -ex", stream="stdout")
    listening = connect.wait_line("listening on 127.0.0.1:")
    local = re.search(r"listening on (127\.0\.0\.1:\d+)", listening).group(1)
    assert command == f'gdb -ex "target remote {local}"'
    return local


def _run_gdb(tools: GdbTools, home: Path, local: str) -> str:
    done = subprocess.run(
        [
            tools.gdb, "-batch", "-nx",
            "-ex", f"target remote {local}",
            "-ex", "break inner",
            "-ex", "continue",
            "-ex", "bt",
            "-ex", "info registers pc",  # rip on x86-64, pc everywhere
            "-ex", "print global_counter",
            "-ex", "kill",
            str(tools.prog),
        ],
        cwd=home,
        env=clean_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    return done.stdout + done.stderr


def _assert_debugged(output: str) -> None:
    """What gdb prints when it stopped in inner() and read the debuggee's state."""
    assert re.search(r"^Breakpoint 1, inner \(x=1\) at .*prog\.c:\d+$", output, re.M), output
    assert re.search(r"^#0\s+inner \(x=1\) at .*prog\.c", output, re.M), output
    assert re.search(r"^#1\s+0x[0-9a-f]+ in outer \(x=0\) at .*prog\.c", output, re.M), output
    assert re.search(r"^#2\s+0x[0-9a-f]+ in main \(\) at .*prog\.c", output, re.M), output
    assert re.search(r"^pc\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <inner\+\d+>$", output, re.M), output
    # main() set it to 41; the breakpoint sits before inner() adds to it.
    assert re.search(r"^\$1 = 41$", output, re.M), output
    assert re.search(r"^\[Inferior 1 \(process \d+\) killed\]$", output, re.M), output


def _audit_records(home: Path, relay: Proc, target: str) -> list[dict]:
    """The closed session's audit records, after ``audit verify`` accepted the file."""
    opened = relay.wait_event("session.opened", target=target)
    closed = relay.wait_event("session.closed", session_id=opened["session_id"])
    assert closed["bytes_to_backend"] > 0 and closed["bytes_to_client"] > 0, closed
    files = sorted((home / "state" / "audit").glob(f"*/{opened['session_id']}.jsonl"))
    assert len(files) == 1, files
    path = files[0]
    today = datetime.now(UTC).date()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name), path
    assert abs((datetime.strptime(path.parent.name, "%Y-%m-%d").date() - today).days) <= 1
    records = [json.loads(line) for line in path.read_text().splitlines()]
    verify = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", path, cwd=home)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "signature ok" in verify.stdout, verify.stdout
    return records


@pytest.mark.parametrize("data_plane", ["trio", "thread"])
@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
def test_gdb_debugs_through_relay_and_connector(
    engine: str, data_plane: str, procs: ProcGroup, home: Path, gdb_tools: GdbTools
) -> None:
    port = free_port()
    gdbserver = procs.start(
        [gdb_tools.gdbserver, "--once", f"127.0.0.1:{port}", gdb_tools.prog],
        cwd=home,
        name="gdbserver",
    )
    gdbserver.wait_line(f"Listening on port {port}")
    (home / "dbgrelay.toml").write_text(
        config_text(
            [
                {
                    "name": "build42",
                    "kind": "gdbserver",
                    "backend": f"tcp://127.0.0.1:{port}",
                    # A probe connection would be gdbserver --once's only client.
                    "probe_interval": "0",
                }
            ],
            engine=engine,
            data_plane=data_plane,
        )
    )
    relay, relay_addr = start_relay(procs, home)
    local = _start_connector(procs, home, relay_addr, "build42", engine)

    output = _run_gdb(gdb_tools, home, local)

    _assert_debugged(output)
    # gdbserver --once served exactly the tunnelled debugger, then exited.
    assert gdbserver.wait() == 0, gdbserver.output()
    records = _audit_records(home, relay, "build42")
    events = [r.get("event") for r in records]
    assert events[1] == "session.opened" and events[-1] == "session.closed", events
    opened = records[1]
    assert opened["user"] == "alice" and opened["target"] == "build42", opened
    assert opened["backend"] == f"tcp://127.0.0.1:{port}", opened
    # The pyOpenSSL engine negotiates the hybrid post-quantum group with its connector.
    assert opened["tls_group"] == ("X25519MLKEM768" if engine == "pyopenssl" else "unknown")
    assert records[-1]["reason"] == "client_closed", records[-1]


def test_gdb_debugs_managed_gdbserver_launched_on_first_tunnel(
    procs: ProcGroup, home: Path, gdb_tools: GdbTools
) -> None:
    (home / "dbgrelay.toml").write_text(
        config_text(
            [
                {
                    "name": "build42",
                    "kind": "gdbserver",
                    "backend": "tcp://127.0.0.1:{port}",
                    "launch": [
                        gdb_tools.gdbserver,
                        "--once",
                        "127.0.0.1:{port}",
                        str(gdb_tools.prog),
                    ],
                }
            ]
        )
    )
    relay, relay_addr = start_relay(procs, home)
    local = _start_connector(procs, home, relay_addr, "build42")
    # The connector's preflight checked the token without starting anything.
    assert relay.events("server.launched") == [], relay.output()

    output = _run_gdb(gdb_tools, home, local)

    _assert_debugged(output + relay.output())
    launched = relay.wait_event("server.launched", target="build42")
    assert launched["argv"][:2] == [gdb_tools.gdbserver, "--once"], launched
    exited = relay.wait_event("server.exited", target="build42")
    assert exited["reason"] == "exited" and exited["returncode"] == 0, exited
    # The relay's launcher reaped the server once it exited.
    try:
        os.kill(launched["pid"], 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"gdbserver pid {launched['pid']} still runs")
    records = _audit_records(home, relay, "build42")
    events = [r.get("event") for r in records]
    assert events[1] == "session.opened" and events[-1] == "session.closed", events
    backend = next(r for r in records if r.get("event") == "backend.launched")
    assert backend["pid"] == launched["pid"] and backend["port"] == launched["port"], backend
