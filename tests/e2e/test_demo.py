"""``dbgrelay demo``: a working relay from nothing, usable with the command it prints."""

from __future__ import annotations

import re
import shlex
import signal
import socket
from pathlib import Path

from .support import DBGRELAY, ProcGroup, free_port


def test_demo_serves_echo_target_with_printed_connect_command(
    procs: ProcGroup, tmp_path: Path
) -> None:
    port = free_port()
    demo = procs.dbgrelay(
        "demo", "--state", "demo-state", "--port", str(port), cwd=tmp_path, name="demo"
    )
    demo.wait_line("relay.listening")
    printed = demo.wait_line(
        lambda line: "dbgrelay connect" in line and "--target demo-echo" in line, stream="stdout"
    )
    assert (tmp_path / "demo-state" / "dbgrelay.toml").is_file()
    assert (tmp_path / "demo-state" / "demo.jwt").is_file()

    argv = shlex.split(printed)
    assert argv[:2] == ["dbgrelay", "connect"], argv
    assert argv[argv.index("--relay") + 1] == f"127.0.0.1:{port}", argv
    # The printed command uses a fixed local port; take any free one instead.
    argv[argv.index("--listen") + 1] = "127.0.0.1:0"
    connect = procs.start([*DBGRELAY, *argv[1:]], cwd=tmp_path, name="connect")
    listening = connect.wait_line("listening on ")
    local = int(re.search(r"listening on 127\.0\.0\.1:(\d+),", listening).group(1))

    with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
        s.sendall(b"hello through the relay\n")
        received = b""
        while not received.endswith(b"\n"):
            chunk = s.recv(100)
            assert chunk, f"tunnel closed after {received!r}"
            received += chunk
    assert received == b"hello through the relay\n"
    connect.wait_line("tunnel.closed")

    demo.send_signal(signal.SIGINT)
    assert demo.wait() == 0, demo.output()
    assert any("relay.stopping" in line for line in demo.lines["stderr"]), demo.output()
