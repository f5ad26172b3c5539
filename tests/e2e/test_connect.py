"""``dbgrelay connect`` against a live ``dbgrelay serve``: command lines and refusals."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import (
    Proc,
    ProcGroup,
    config_text,
    copy_materials,
    free_port,
    run_cli,
    start_relay,
)

KD_TRANSPORT = "net:port=50000,key=1.2.3.4"

# What each kind's connector prints on stdout, one line per debugger, with
# {host} and {port} for the connector's own address.
EXPECTED_COMMANDS = {
    "k-dbgsrv": [
        'windbg -premote "tcp:server={host},port={port}"',
        'cdb -premote "tcp:server={host},port={port}"',
    ],
    "k-server": [
        'windbg -remote "tcp:server={host},port={port}"',
        'cdb -remote "tcp:server={host},port={port}"',
        'kd -remote "tcp:server={host},port={port}"',
    ],
    # No kernel connection string: no line to paste (stderr says what to pass).
    "k-kdsrv": [],
    "k-kdsrv-net": [
        'windbg -k "kdsrv:server=@{{tcp:server={host},port={port}}},trans=@{{'
        + KD_TRANSPORT
        + '}}"',
        'kd -k "kdsrv:server=@{{tcp:server={host},port={port}}},trans=@{{' + KD_TRANSPORT + '}}"',
    ],
    "k-gdbserver": ['gdb -ex "target remote {host}:{port}"'],
    "k-tcp": ["connect your client to {host}:{port}"],
}


@dataclass(frozen=True, slots=True)
class LiveRelay:
    home: Path
    address: str
    proc: Proc


@pytest.fixture(scope="module")
def kinds_relay(tmp_path_factory: pytest.TempPathFactory, materials: Path) -> Iterator[LiveRelay]:
    """One relay with a target of every kind, and a token for all of them (``k-*``)."""
    home = tmp_path_factory.mktemp("kinds")
    copy_materials(materials, home)
    # Nothing listens on the backend port: a preflight never touches the backend.
    backend = f"tcp://127.0.0.1:{free_port()}"
    targets = [
        {"name": "k-dbgsrv", "kind": "dbgsrv"},
        {"name": "k-server", "kind": "server"},
        {"name": "k-kdsrv", "kind": "kdsrv"},
        {"name": "k-kdsrv-net", "kind": "kdsrv", "kd_transport": KD_TRANSPORT},
        {"name": "k-gdbserver", "kind": "gdbserver"},
        {"name": "k-tcp", "kind": "tcp"},
    ]
    for target in targets:
        target |= {"backend": backend, "probe_interval": "0"}
    (home / "dbgrelay.toml").write_text(config_text(targets))
    done = run_cli(
        "token", "issue", "--key", "keys/signing.key", "--user", "alice", "--target", "k-*",
        cwd=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (home / "alice.jwt").write_text(done.stdout)
    group = ProcGroup()
    try:
        proc, address = start_relay(group, home)
        yield LiveRelay(home=home, address=address, proc=proc)
    finally:
        group.close()


@pytest.mark.parametrize("target", sorted(EXPECTED_COMMANDS))
def test_connect_prints_debugger_command_for_target_kind(
    procs: ProcGroup, kinds_relay: LiveRelay, target: str
) -> None:
    connect = procs.dbgrelay(
        "connect", "--relay", kinds_relay.address, "--ca", "pki/ca.pem", "--target", target,
        "--token-file", "alice.jwt", "--listen", "127.0.0.1:0", cwd=kinds_relay.home,
        name=f"connect {target}",
    )  # fmt: skip
    listening = connect.wait_line("listening on ")
    host, port = re.search(r"listening on (127\.0\.0\.1):(\d+),", listening).groups()
    assert int(port) != 0

    expected = [line.format(host=host, port=port) for line in EXPECTED_COMMANDS[target]]
    if expected:
        connect.wait_line(expected[-1], stream="stdout")
    else:
        connect.wait_line("--kd-transport net:port=PORT,key=KEY")
    # The connector really listens where the command points.
    socket.create_connection((host, int(port)), timeout=5).close()

    assert connect.lines["stdout"] == expected


@pytest.fixture
def refusing_relay(procs: ProcGroup, home: Path) -> Iterator[tuple[Proc, str, socket.socket]]:
    """A relay whose one target is a plain TCP listener the test watches."""
    backend = socket.create_server(("127.0.0.1", 0))
    backend.setblocking(False)
    port = backend.getsockname()[1]
    (home / "dbgrelay.toml").write_text(
        config_text(
            [
                {
                    "name": "build42",
                    "kind": "tcp",
                    "backend": f"tcp://127.0.0.1:{port}",
                    "probe_interval": "0",
                }
            ]
        )
    )
    try:
        relay, address = start_relay(procs, home)
        yield relay, address, backend
    finally:
        backend.close()


def _token(home: Path, *, key: str = "keys/signing.key", target: str = "build42") -> str:
    done = run_cli(
        "token", "issue", "--key", key, "--user", "mallory", "--target", target, cwd=home
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _corrupt_signature(token: str) -> str:
    head, body, sig = token.split(".")
    i = len(sig) // 2
    return f"{head}.{body}.{sig[:i]}{'A' if sig[i] != 'A' else 'B'}{sig[i + 1 :]}"


def _foreign_key_token(home: Path) -> str:
    done = run_cli("keys", "init", "--out", "other-keys", cwd=home)
    assert done.returncode == 0, done.stderr
    return _token(home, key="other-keys/signing.key")


@pytest.mark.parametrize(
    ("make_token", "reason", "status"),
    [
        pytest.param(
            lambda home: _token(home, target="build43"), "not_granted", 403, id="other-target"
        ),
        pytest.param(_foreign_key_token, "unknown_kid", 401, id="other-key"),
        pytest.param(
            lambda home: _corrupt_signature(_token(home)), "bad_signature", 401, id="corrupt"
        ),
        pytest.param(lambda home: "not-a-jwt", "malformed", 401, id="garbage"),
    ],
)
def test_connect_exits_3_when_relay_refuses_token(
    procs: ProcGroup, home: Path, refusing_relay, make_token, reason: str, status: int
) -> None:
    relay, address, backend = refusing_relay
    (home / "bad.jwt").write_text(make_token(home) + "\n")

    connect = procs.dbgrelay(
        "connect", "--relay", address, "--ca", "pki/ca.pem", "--target", "build42",
        "--token-file", "bad.jwt", "--listen", "127.0.0.1:0", cwd=home, name="connect",
    )  # fmt: skip
    code = connect.wait()

    assert code == 3, connect.output()
    assert connect.lines["stdout"] == [], connect.output()
    assert len(connect.lines["stderr"]) == 1, connect.output()
    line = connect.lines["stderr"][0]
    assert line.startswith("dbgrelay: relay refused the tunnel:"), line
    assert f" {status} {reason}" in line, line
    rejected = relay.wait_event("token.rejected", reason=reason)
    assert rejected["status"] == status and rejected["target"] == "build42", rejected
    # Nothing reached the debug server.
    with pytest.raises(BlockingIOError):
        backend.accept()
    assert relay.events("session.opened") == [], relay.output()


def test_connect_refuses_non_loopback_listen_address(home: Path) -> None:
    (home / "alice.jwt").write_text(_token(home) + "\n")

    done = run_cli(
        "connect", "--relay", "127.0.0.1:7443", "--ca", "pki/ca.pem", "--target", "build42",
        "--token-file", "alice.jwt", "--listen", "0.0.0.0:5005", cwd=home,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "--listen" in lines[0] and "loopback" in lines[0] and "'0.0.0.0'" in lines[0], lines
    assert "Traceback" not in done.stderr


def _start_connect(procs: ProcGroup, relay: LiveRelay, target: str, *extra: str) -> Proc:
    return procs.dbgrelay(
        "connect", "--relay", relay.address, "--ca", "pki/ca.pem", "--target", target,
        "--token-file", "alice.jwt", *extra, cwd=relay.home, name=f"connect {target}",
    )  # fmt: skip


def _no_traceback(proc: Proc) -> None:
    text = "\n".join(proc.lines["stderr"])
    assert "Traceback" not in text and "ExceptionGroup" not in text, proc.output()


def test_connect_ctrl_c_prints_one_line_and_exits_130(
    procs: ProcGroup, kinds_relay: LiveRelay
) -> None:
    connect = _start_connect(procs, kinds_relay, "k-tcp", "--listen", "127.0.0.1:0")
    listening = connect.wait_line("listening on ")
    host, port = re.search(r"listening on (127\.0\.0\.1):(\d+),", listening).groups()
    # An open tunnel does not keep it from stopping.
    with socket.create_connection((host, int(port)), timeout=5):
        connect.send_signal(signal.SIGINT)
        assert connect.wait() == 130, connect.output()
    _no_traceback(connect)
    after = connect.lines["stderr"][connect.lines["stderr"].index(listening) + 1 :]
    stopped = [line for line in after if "tunnel." not in line]
    assert stopped == ["dbgrelay: connect: stopped by Ctrl-C; tunnels closed"], connect.output()


def test_connect_busy_listen_port_prints_one_line(procs: ProcGroup, kinds_relay: LiveRelay) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        connect = _start_connect(procs, kinds_relay, "k-tcp", "--listen", f"127.0.0.1:{port}")
        assert connect.wait() == 2, connect.output()
    # The identity line from the token check comes first; the failure is one line.
    using, *rest = connect.lines["stderr"]
    assert using.startswith("dbgrelay connect: using identity alice"), connect.output()
    assert rest == [
        f"dbgrelay: cannot listen on 127.0.0.1:{port}: Address already in use; choose another "
        "--listen port (port 0 picks a free one)"
    ], connect.output()


def test_connect_prints_server_password_from_file_only_in_command_lines(
    procs: ProcGroup, kinds_relay: LiveRelay
) -> None:
    (kinds_relay.home / "server.pw").write_text("s3cret-Pass.1\n")
    connect = _start_connect(
        procs, kinds_relay, "k-dbgsrv", "--listen", "127.0.0.1:0", "--password-file", "server.pw"
    )
    listening = connect.wait_line("listening on ")
    host, port = re.search(r"listening on (127\.0\.0\.1):(\d+),", listening).groups()
    connect.wait_line("cdb ", stream="stdout")

    tcp = f"tcp:server={host},port={port},password=s3cret-Pass.1"
    assert connect.lines["stdout"] == [f'windbg -premote "{tcp}"', f'cdb -premote "{tcp}"']
    assert "s3cret" not in "\n".join(connect.lines["stderr"]), connect.output()


def test_connect_refuses_password_the_shells_would_change(kinds_relay: LiveRelay) -> None:
    (kinds_relay.home / "bad.pw").write_text("100%sure\n")
    done = run_cli(
        "connect", "--relay", kinds_relay.address, "--ca", "pki/ca.pem", "--target", "k-dbgsrv",
        "--token-file", "alice.jwt", "--password-file", "bad.pw", cwd=kinds_relay.home,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("dbgrelay: --password-file bad.pw: the password holds '%'")
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_connect_on_ipv6_loopback_prints_ipversion_6(
    procs: ProcGroup, kinds_relay: LiveRelay
) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    connect = _start_connect(procs, kinds_relay, "k-dbgsrv", "--listen", "[::1]:0")
    listening = connect.wait_line("listening on ")
    port = int(re.search(r"listening on \[::1\]:(\d+),", listening).group(1))
    connect.wait_line("cdb ", stream="stdout")

    tcp = f"tcp:server=::1,port={port},ipversion=6"
    assert connect.lines["stdout"] == [f'windbg -premote "{tcp}"', f'cdb -premote "{tcp}"']
    socket.create_connection(("::1", port), timeout=5).close()
