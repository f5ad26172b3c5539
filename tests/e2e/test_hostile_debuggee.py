"""A hostile debuggee cannot own the relay that launched it.

``dbgrelay serve`` runs as a real subprocess started as root with
``relay.user`` set to a real unprivileged account; its managed target runs
``data/hostile.py``, a program that attacks the relay (read the audit key,
use the admin socket, rewrite and re-sign its own audit file, reach the
relay process) and reports each attempt through a real tunnel (``dbgrelay
connect``).  Every attempt must fail, and ``audit verify --pubkey`` must
still accept the untouched files.  A positive control runs the same program
as the relay's own account and shows the attacks work there: it is what
happened before debug servers ran under a separate account.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .. import accounts
from .conftest import GdbTools
from .support import ProcGroup, clean_env, run_cli
from .test_gdb import _assert_debugged, _run_gdb, _start_connector

pytestmark = pytest.mark.skipif(not accounts.is_root(), reason=accounts.NOT_ROOT)

HOSTILE = Path(__file__).with_name("data") / "hostile.py"
# Named for this test process: a run beside another, or after one that was
# killed before its cleanup, must not find the name taken.
RELAY_USER = f"dbgr-r{os.getpid()}"


@pytest.fixture(scope="module")
def relay_user() -> Iterator[pwd.struct_passwd]:
    accounts.create(RELAY_USER)
    yield pwd.getpwnam(RELAY_USER)
    accounts.remove(RELAY_USER)


@pytest.fixture
def relay_home(materials: Path, relay_user: pwd.struct_passwd) -> Iterator[Path]:
    """The relay's folder, owned by relay.user: config, keys (0700) and certificates."""
    home = accounts.shared_dir()
    for sub in ("keys", "pki"):
        shutil.copytree(materials / sub, home / sub)
    for path in [home, *home.rglob("*")]:
        os.chown(path, relay_user.pw_uid, relay_user.pw_gid)
    (home / "keys").chmod(0o700)
    yield home
    accounts.rmtree(home)


def _env(home: Path) -> dict[str, str]:
    """The relay's environment: an interpreter and packages relay.user can still read."""
    env = clean_env(home)
    env["PYTHONPATH"] = accounts.public_python_env()["PYTHONPATH"]
    return env


def _config(home: Path, run_as: str, *, user: bool = True) -> str:
    # Not python -I: the debuggee imports the relay's own library to re-sign.
    return f"""
[relay]
listen = ["127.0.0.1:0"]
state_dir = "state"
shutdown_grace = "1s"
{f'user = "{RELAY_USER}"' if user else ""}
run_as = "{run_as}"
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
[auth]
jwks = "keys/jwks.json"
audit_key = "keys/audit.key"
[metrics]
listen = ""
[[targets]]
name = "build42"
kind = "gdbserver"
backend = "tcp://127.0.0.1:{{port}}"
launch = {
        json.dumps(
            [
                accounts.public_python(),
                str(HOSTILE),
                "serve",
                "{port}",
                str(home / "keys" / "audit.key"),
                str(home / "state" / "admin.sock"),
            ]
        )
    }
"""


def _tunnel(procs: ProcGroup, home: Path, relay_addr: str) -> socket.socket:
    done = run_cli(
        "token", "issue", "--key", "keys/signing.key", "--user", "mallory",
        "--target", "build42", "--ttl", "1h", cwd=home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (home / "mallory.jwt").write_text(done.stdout)
    connect = procs.dbgrelay(
        "connect", "--relay", relay_addr, "--ca", "pki/ca.pem", "--target", "build42",
        "--token-file", "mallory.jwt", "--listen", "127.0.0.1:0", cwd=home, name="connect",
    )  # fmt: skip
    listening = connect.wait_line("listening on 127.0.0.1:")
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", listening).group(1))
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _read_line(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        assert chunk, f"the tunnel closed before the debuggee answered: {data!r}"
        data += chunk
    return json.loads(data)


def test_a_hostile_debuggee_fails_at_every_step_and_the_audit_trail_still_verifies(
    procs: ProcGroup, relay_home: Path, relay_user: pwd.struct_passwd, target_account: str
) -> None:
    home = relay_home
    (home / "dbgrelay.toml").write_text(_config(home, target_account))
    relay = procs.start(
        [accounts.public_python(), "-m", "relay", "serve", "--config", "dbgrelay.toml"],
        cwd=home,
        name="relay",
        env=_env(home),
    )
    dropped = relay.wait_event("relay.privileges_dropped")
    assert dropped["user"] == RELAY_USER, dropped
    relay_addr = relay.wait_event("relay.listening")["address"]
    status = Path(f"/proc/{relay.popen.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{relay_user.pw_uid}\s+{relay_user.pw_uid}\s", status, re.M)

    conn = _tunnel(procs, home, relay_addr)
    opened = relay.wait_event("session.opened", target="build42")
    sid = opened["session_id"]
    (audit_file,) = (home / "state" / "audit").glob(f"*/{sid}.jsonl")
    before = audit_file.read_bytes()
    launched = relay.wait_event("server.launched", target="build42")
    # The debuggee runs as the target account, not as root nor as relay.user.
    server_status = Path(f"/proc/{launched['pid']}/status").read_text()
    target_uid = pwd.getpwnam(target_account).pw_uid
    assert re.search(rf"^Uid:\s+{target_uid}\s", server_status, re.M), server_status

    info = {"session_id": sid, "audit_file": str(audit_file), "relay_pid": relay.popen.pid}
    conn.sendall(json.dumps(info).encode() + b"\n")
    results = _read_line(conn)
    conn.close()

    assert set(results) == {
        "read_audit_key",
        "list_audit_dir",
        "read_own_audit_file",
        "open_own_audit_file_for_writing",
        "resign_own_audit_file",
        "admin_list_sessions",
        "admin_end_session",
        "signal_relay",
        "read_relay_environ",
    }
    for step, outcome in results.items():
        assert outcome["ok"] is False, (step, outcome)
        assert re.search(
            r"PermissionError|Permission denied|KeyFileError|403", outcome["detail"]
        ), (
            step,
            outcome,
        )
    closed = relay.wait_event("session.closed", session_id=sid)
    assert closed["reason"] != "ended_by_admin", closed
    assert audit_file.read_bytes().startswith(before)

    relay.stop()
    for path in [audit_file, *sorted((home / "state" / "audit").glob("relay-*.jsonl"))]:
        verify = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", path, cwd=home)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "signature ok" in verify.stdout, verify.stdout
        records = [json.loads(line) for line in path.read_text().splitlines()]
        users = {r["user"] for r in records if "user" in r}
        assert "alice" not in users, records

    # Positive control: the same program run as the relay's own account (what a
    # debuggee was before) reads the key and forges a copy of the audit file
    # that `audit verify --pubkey` accepts.
    control_dir = home / "state" / "control"
    control_dir.mkdir()
    copy = control_dir / audit_file.name
    shutil.copy2(audit_file, copy)
    for path in (control_dir, copy):
        os.chown(path, relay_user.pw_uid, relay_user.pw_gid)
    control_info = {"session_id": sid, "audit_file": str(copy), "relay_pid": os.getpid()}
    done = subprocess.run(
        [accounts.public_python(), str(HOSTILE), "now", str(home / "keys" / "audit.key")]
        + [str(home / "state" / "admin.sock"), json.dumps(control_info)],
        user=relay_user.pw_uid,
        group=relay_user.pw_gid,
        extra_groups=[],
        env=_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    control = json.loads(done.stdout)
    for step in ("read_audit_key", "read_own_audit_file", "resign_own_audit_file"):
        assert control[step]["ok"] is True, (step, control[step])
    verify = run_cli("audit", "verify", "--pubkey", "keys/audit.pub", copy, cwd=home)
    assert verify.returncode == 0 and "signature ok" in verify.stdout, verify.stdout
    assert '"user": "alice"' in copy.read_text() or '"user":"alice"' in copy.read_text()


def test_the_launcher_refuses_to_run_a_target_as_relay_user(
    procs: ProcGroup, relay_home: Path, relay_user: pwd.struct_passwd
) -> None:
    home = relay_home
    (home / "dbgrelay.toml").write_text(_config(home, RELAY_USER))
    relay = procs.start(
        [accounts.public_python(), "-m", "relay", "serve", "--config", "dbgrelay.toml"],
        cwd=home,
        name="relay",
        env=_env(home),
    )
    relay_addr = relay.wait_event("relay.listening")["address"]
    conn = _tunnel(procs, home, relay_addr)
    conn.settimeout(30)
    assert conn.recv(100) == b""  # the connector closes: the relay answered 502
    failed = relay.wait_event("backend.failed")
    assert failed["reason"] == "launch_failed", failed
    assert "is root or the relay's own account" in failed["error"], failed
    assert relay.events("server.launched") == []
    conn.close()


def test_check_config_warns_in_one_line_about_development_mode(
    relay_home: Path, relay_user: pwd.struct_passwd
) -> None:
    home = relay_home
    (home / "dbgrelay.toml").write_text(_config(home, RELAY_USER))
    done = subprocess.run(
        [accounts.public_python(), "-m", "relay", "check-config", "--config", "dbgrelay.toml"],
        user=relay_user.pw_uid,
        group=relay_user.pw_gid,
        extra_groups=[],
        env=_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"dbgrelay.toml: warning: targets build42 run as the relay's own account "
        f"'{RELAY_USER}' (development mode): a debuggee there can read the relay's keys "
        "and audit files",
        "dbgrelay.toml: ok (1 targets)",
    ]


def test_a_relay_without_root_refuses_launches_as_another_account_saying_what_to_do(
    procs: ProcGroup, relay_home: Path, relay_user: pwd.struct_passwd, target_account: str
) -> None:
    home = relay_home
    (home / "dbgrelay.toml").write_text(_config(home, target_account, user=False))
    relay = procs.start(
        ["setpriv", "--reuid", RELAY_USER, "--regid", RELAY_USER, "--clear-groups"]
        + [accounts.public_python(), "-m", "relay", "serve", "--config", "dbgrelay.toml"],
        cwd=home,
        name="relay",
        env=_env(home),
    )
    relay_addr = relay.wait_event("relay.listening")["address"]
    conn = _tunnel(procs, home, relay_addr)
    conn.settimeout(30)
    assert conn.recv(100) == b""  # the connector closes: the relay answered 502
    failed = relay.wait_event("backend.failed")
    assert failed["reason"] == "launch_failed"
    assert failed["error"] == (
        f"cannot start processes as '{target_account}': the relay runs as '{RELAY_USER}' "
        "without its privileged helper; start 'dbgrelay serve' as root with relay.user set, "
        f'or for development set run_as = "{RELAY_USER}"'
    )
    assert len(relay.events("backend.failed")) == 1
    assert relay.events("server.launched") == []
    conn.close()


def test_gdb_debugs_a_managed_gdbserver_started_through_the_privileged_helper(
    procs: ProcGroup,
    relay_home: Path,
    relay_user: pwd.struct_passwd,
    target_account: str,
    gdb_tools: GdbTools,
) -> None:
    # The deployed shape: root start, relay.user, helper, gdbserver as the target account.
    home = relay_home
    config = _config(home, target_account).split("[[targets]]")[0] + "\n".join(
        [
            "[[targets]]",
            'name = "build42"',
            'kind = "gdbserver"',
            'backend = "tcp://127.0.0.1:{port}"',
            "launch = "
            + json.dumps([gdb_tools.gdbserver, "--once", "127.0.0.1:{port}", str(gdb_tools.prog)]),
            "",
        ]
    )
    (home / "dbgrelay.toml").write_text(config)
    relay = procs.start(
        [accounts.public_python(), "-m", "relay", "serve", "--config", "dbgrelay.toml"],
        cwd=home,
        name="relay",
        env=_env(home),
    )
    relay.wait_event("relay.privileges_dropped")
    relay_addr = relay.wait_event("relay.listening")["address"]
    local = _start_connector(procs, home, relay_addr, "build42")

    output = _run_gdb(gdb_tools, home, local)

    _assert_debugged(output + relay.output())
    launched = relay.wait_event("server.launched", target="build42")
    exited = relay.wait_event("server.exited", target="build42")
    assert exited["reason"] == "exited" and exited["returncode"] == 0, exited
    assert launched["argv"][:2] == [gdb_tools.gdbserver, "--once"], launched


def test_check_config_warns_about_accounts_that_do_not_exist(relay_home: Path) -> None:
    home = relay_home
    text = _config(home, "no-such-target-acct").replace(RELAY_USER, "no-such-relay-acct")
    (home / "dbgrelay.toml").write_text(text)
    done = run_cli("check-config", "--config", "dbgrelay.toml", cwd=home)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "dbgrelay.toml: warning: relay.user account 'no-such-relay-acct' does not exist on this "
        "host; create it (deploy/systemd/dbgrelay.sysusers) before the relay starts",
        "dbgrelay.toml: warning: run_as account 'no-such-target-acct' does not exist on this "
        "host; create it (deploy/systemd/dbgrelay.sysusers) before the relay starts",
        "dbgrelay.toml: ok (1 targets)",
    ]


def test_kill_9_of_a_dropped_relay_ends_its_helper_and_every_server_it_launched(
    procs: ProcGroup, relay_home: Path, relay_user: pwd.struct_passwd, target_account: str
) -> None:
    home = relay_home
    (home / "dbgrelay.toml").write_text(_config(home, target_account))
    relay = procs.start(
        [accounts.public_python(), "-m", "relay", "serve", "--config", "dbgrelay.toml"],
        cwd=home,
        name="relay",
        env=_env(home),
    )
    relay_addr = relay.wait_event("relay.listening")["address"]
    mark = f"privhelper.py\0--relay-uid\0{relay_user.pw_uid}\0".encode()
    helpers = [pid for pid, argv in _cmdlines() if mark in argv]
    assert len(helpers) == 1, helpers
    conn = _tunnel(procs, home, relay_addr)
    server = relay.wait_event("server.launched", target="build42")["pid"]
    assert not _gone(server)

    relay.popen.send_signal(signal.SIGKILL)  # no cleanup code runs in the relay
    assert relay.wait() == -signal.SIGKILL

    # The helper and the launcher see their sockets from the relay close.
    deadline = time.monotonic() + 20
    while not (_gone(server) and _gone(helpers[0])):
        assert time.monotonic() < deadline, "the server or the helper outlived the relay"
        time.sleep(0.02)
    conn.close()


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def _cmdlines() -> list[tuple[int, bytes]]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                found.append((int(name), Path(f"/proc/{name}/cmdline").read_bytes()))
            except OSError:
                continue  # it exited meanwhile
    return found
