"""``dbgrelay connect`` on Windows (the official CPython under Wine) against a native relay.

Each test runs the connector as Windows runs it, with the working tree's code,
and its peers (the relay, an echo server, gdb and gdbserver) natively on
Linux, all on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from ..e2e.conftest import GdbTools
from ..e2e.support import Proc, ProcGroup, config_text, free_port, run_cli, start_relay
from ..e2e.test_gdb import _assert_debugged, _run_gdb
from .conftest import WineTier

# Bytes sent through each tunnel: several times the fast path's 64 KiB
# receive buffer and a loopback socket's buffer, so both directions block and
# resume on the Windows side.
PAYLOAD = os.urandom(3 * 1024 * 1024 + 7)


def _relay(procs: ProcGroup, home: Path, target: dict, *, engine: str = "stdlib") -> str:
    """Start a native relay with one target and write ``alice.jwt`` for it; its address."""
    (home / "dbgrelay.toml").write_text(
        config_text([target | {"probe_interval": "0"}], engine=engine)
    )
    done = run_cli(
        "token", "issue", "--key", "keys/signing.key", "--user", "alice",
        "--target", target["name"], cwd=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (home / "alice.jwt").write_text(done.stdout)
    _relay_proc, address = start_relay(procs, home)
    return address


def _connect(
    wine_tier: WineTier, procs: ProcGroup, home: Path, relay: str, target: str, *extra: str
) -> Proc:
    return wine_tier.dbgrelay(
        procs, "connect", "--relay", relay, "--ca", "pki/ca.pem", "--target", target,
        "--token-file", "alice.jwt", *extra, cwd=home, name="windows connect",
    )  # fmt: skip


def _listening(connect: Proc) -> tuple[str, int]:
    # Generous: a Windows Python start under Wine imports trio and cryptography.
    line = connect.wait_line("listening on ", timeout=60)
    host, port = re.search(r"listening on (127\.0\.0\.1):(\d+),", line).groups()
    return host, int(port)


def _no_traceback(proc: Proc) -> None:
    text = "\n".join(proc.lines["stderr"])
    assert "Traceback" not in text and "ExceptionGroup" not in text, proc.output()


def _echo_through(host: str, port: int, payload: bytes) -> bytes:
    """Send ``payload`` while reading the echo; what came back (all of it, or up to EOF)."""
    got = bytearray()
    with socket.create_connection((host, port), timeout=60) as conn:
        # No half-close: a TLS tunnel has no EOF of its own in one direction.
        sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
        sender.start()
        while len(got) < len(payload) and (data := conn.recv(1 << 20)):
            got += data
        sender.join(60)
    return bytes(got)


@pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])
def test_windows_connector_forwards_bytes_both_ways(
    wine_tier: WineTier, procs: ProcGroup, home: Path, echo_port: int, engine: str
) -> None:
    relay = _relay(
        procs,
        home,
        {"name": "echo", "kind": "tcp", "backend": f"tcp://127.0.0.1:{echo_port}"},
        engine=engine,
    )
    connect = _connect(
        wine_tier, procs, home, relay, "echo", "--listen", "127.0.0.1:0", "--tls-engine", engine
    )
    host, port = _listening(connect)

    # Two tunnels, one after the other: each gets its own TLS connection.
    for _ in range(2):
        got = _echo_through(host, port, PAYLOAD)
        assert len(got) == len(PAYLOAD), connect.output()
        assert got == PAYLOAD

    assert connect.lines["stdout"] == [f"connect your client to {host}:{port}"]
    connect.wait_line("tunnel.closed")
    _no_traceback(connect)


def test_gdb_debugs_through_windows_connector(
    wine_tier: WineTier, procs: ProcGroup, home: Path, gdb_tools: GdbTools
) -> None:
    port = free_port()
    gdbserver = procs.start(
        [gdb_tools.gdbserver, "--once", f"127.0.0.1:{port}", gdb_tools.prog],
        cwd=home,
        name="gdbserver",
    )
    gdbserver.wait_line(f"Listening on port {port}")
    relay = _relay(
        procs, home, {"name": "build42", "kind": "gdbserver", "backend": f"tcp://127.0.0.1:{port}"}
    )
    connect = _connect(wine_tier, procs, home, relay, "build42", "--listen", "127.0.0.1:0")
    host, local_port = _listening(connect)
    command = connect.wait_line("gdb -ex", stream="stdout")
    assert command == f'gdb -ex "target remote {host}:{local_port}"'

    output = _run_gdb(gdb_tools, home, f"{host}:{local_port}")

    _assert_debugged(output)
    assert gdbserver.wait() == 0, gdbserver.output()
    _no_traceback(connect)


def test_windows_connector_ctrl_c_prints_one_line(
    wine_tier: WineTier, procs: ProcGroup, home: Path, echo_port: int
) -> None:
    relay = _relay(
        procs, home, {"name": "echo", "kind": "tcp", "backend": f"tcp://127.0.0.1:{echo_port}"}
    )
    connect = _connect(wine_tier, procs, home, relay, "echo", "--listen", "127.0.0.1:0")
    host, port = _listening(connect)
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        # Wine turns SIGINT into the console's Ctrl-C event, as a keypress would be.
        connect.send_signal(signal.SIGINT)
        assert connect.wait(60) == 130, connect.output()

    _no_traceback(connect)
    # The identity and listening lines come first; then nothing but the one line.
    after = connect.lines["stderr"][2:]
    assert connect.lines["stderr"][0].startswith("dbgrelay connect: using identity ")
    assert [line for line in after if "tunnel." not in line] == [
        "dbgrelay: connect: stopped by Ctrl-C; tunnels closed"
    ], connect.output()


def test_windows_connector_busy_port_prints_one_line(
    wine_tier: WineTier, procs: ProcGroup, home: Path, echo_port: int
) -> None:
    relay = _relay(
        procs, home, {"name": "echo", "kind": "tcp", "backend": f"tcp://127.0.0.1:{echo_port}"}
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        connect = _connect(wine_tier, procs, home, relay, "echo", "--listen", f"127.0.0.1:{port}")
        code = connect.wait(60)

    assert code == 2, connect.output()
    using, line = connect.lines["stderr"]  # the token check's identity line, then the failure
    assert using.startswith("dbgrelay connect: using identity "), using
    assert line.startswith(f"dbgrelay: cannot listen on 127.0.0.1:{port}: "), line
    assert line.endswith("; choose another --listen port (port 0 picks a free one)"), line


# Prints its arguments as the Microsoft C runtime splits them (WinDbg, cdb and
# kd read their command lines the same way), one JSON string per line.
PRINTARGS_C = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        putchar('"');
        for (char *p = argv[i]; *p; p++) {
            if (*p == '"' || *p == '\\') putchar('\\');
            putchar(*p);
        }
        puts("\"");
    }
    return 0;
}
"""

# Run under the Windows Python: each printed line through cmd.exe, with
# windbg/cdb/kd/gdb being the argument printer.
CMD_DRIVER = r"""
import json, subprocess, sys
from relay.connector import debugger_commands
lines = []
for host in ("127.0.0.1", "::1"):
    lines += debugger_commands("dbgsrv", host, 5005, password="Tr0ub4dor&3;x<y>|^")
    lines += debugger_commands("server", host, 5005)
    lines += debugger_commands("kdsrv", host, 5005, kd_transport="net:port=50000,key=1.2.3.4",
                               password="pw")
    lines += debugger_commands("gdbserver", host, 5005)
out = []
for line in lines:
    done = subprocess.run("cmd.exe /d /c " + line, capture_output=True, text=True, timeout=60)
    args = [json.loads(a) for a in done.stdout.splitlines()]
    out.append({"line": line, "code": done.returncode, "args": args, "stderr": done.stderr})
print(json.dumps(out))
"""


def test_printed_command_lines_parse_in_cmd_exe(wine_tier: WineTier, tmp_path: Path) -> None:
    gcc = shutil.which("x86_64-w64-mingw32-gcc")
    assert gcc is not None  # the tier itself needs it
    (tmp_path / "printargs.c").write_text(PRINTARGS_C)
    subprocess.run(
        [gcc, "-O2", "-o", str(tmp_path / "windbg.exe"), str(tmp_path / "printargs.c")],
        check=True,
        timeout=120,
    )
    for name in ("cdb", "kd", "gdb"):
        shutil.copy(tmp_path / "windbg.exe", tmp_path / f"{name}.exe")
    (tmp_path / "driver.py").write_text(CMD_DRIVER)

    done = wine_tier.run("driver.py", cwd=tmp_path, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)
    assert len(results) == 16, results
    for result in results:
        line = result["line"]
        assert result["code"] == 0 and result["args"], result
        program, *args = result["args"]
        assert program == line.split(" ", 1)[0], result
        # What the debugger receives is the line with only the quotes removed.
        assert " ".join(args) == line.split(" ", 1)[1].replace('"', ""), result
    passwords = [r["args"][2] for r in results if r["args"][1] == "-premote"]
    assert passwords == [
        "tcp:server=127.0.0.1,port=5005,password=Tr0ub4dor&3;x<y>|^",
        "tcp:server=127.0.0.1,port=5005,password=Tr0ub4dor&3;x<y>|^",
        "tcp:server=::1,port=5005,password=Tr0ub4dor&3;x<y>|^,ipversion=6",
        "tcp:server=::1,port=5005,password=Tr0ub4dor&3;x<y>|^,ipversion=6",
    ]
