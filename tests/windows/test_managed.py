"""Managed servers on Windows: a Job Object per server, under Wine.

The relay's own code path (``ManagedServer.run`` and ``connect``) runs in the
Windows Python (``managed_checks.py``); the server is ``managed_server.py``,
which echoes and starts a grandchild whose command line carries a token
unique to the test, so the tests can also look for it from Linux.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from ..e2e.support import ProcGroup
from .conftest import WineTier

CHECKS = Path(__file__).with_name("managed_checks.py")
HOST_CONNECTIONS = Path(__file__).with_name("host_connections.py")


def _scenario(wine_tier: WineTier, tmp_path: Path, name: str, token: str) -> dict:
    done = wine_tier.run(CHECKS, name, token, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _linux_pids_with(token: str) -> list[int]:
    """Linux processes (Wine runs each Windows process as one) whose command line has ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_managed_server_runs_in_a_job_and_is_killed_on_idle_with_its_grandchild(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    token = f"dbgrelay-job-{uuid.uuid4().hex}"
    result = _scenario(wine_tier, tmp_path, "idle", token)
    assert result["echo"] == "hello"
    assert result["server_in_job"] and result["grandchild_in_job"], result
    assert not result["relay_in_job"], result
    (launched, launch_fields), (exited, exit_fields) = result["events"]
    assert launched == "server.launched" and launch_fields["pid"] == result["pid"]
    assert exited == "server.exited" and exit_fields["reason"] == "idle", result["events"]
    assert not result["server_alive"] and not result["grandchild_alive"], result
    assert _linux_pids_with(token) == []


def test_a_server_exiting_by_itself_is_reported_and_its_grandchild_ends_too(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    token = f"dbgrelay-job-{uuid.uuid4().hex}"
    result = _scenario(wine_tier, tmp_path, "exits", token)
    (_, _), (exited, fields) = result["events"]
    assert exited == "server.exited", result
    assert (fields["reason"], fields["returncode"]) == ("exited", 3), fields
    assert not result["grandchild_alive"] and not result["running"], result
    assert _linux_pids_with(token) == []


def test_a_managed_server_is_reached_while_the_host_holds_thousands_of_growing_connections(
    wine_tier: WineTier, tmp_path: Path, procs: ProcGroup
) -> None:
    # A benchmark's 3,000 connections made connects to managed servers fail
    # with "GetExtendedTcpTable failed (14)": the check of the accepted
    # connection's owner read every connection on the host with its owner,
    # which on Wine scans each Windows process's descriptors per row (seconds
    # per thousand rows), and Wine gives up with ERROR_OUTOFMEMORY when the
    # table outgrows its buffer in five reads in a row.
    load = procs.start(
        [sys.executable, HOST_CONNECTIONS, "2000", "7000", "100"],
        cwd=tmp_path,
        name="host-connections",
    )
    load.wait_line("holding 2000", stream="stdout", timeout=60)
    result = _scenario(wine_tier, tmp_path, "busy_host", f"dbgrelay-job-{uuid.uuid4().hex}")
    assert result["echo"] == "hello", result
    assert result["events"] == ["server.launched", "server.exited"], result


def test_a_connection_check_failing_after_the_connect_timeout_is_reported_as_itself(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    # The check ran inside the connect's timeout: a read of the table that
    # outlasted it and then failed was reported as "did not accept within 10s".
    result = _scenario(wine_tier, tmp_path, "slow_check", f"dbgrelay-job-{uuid.uuid4().hex}")
    assert result["failed"] is not None, "the failed check let the connection through"
    assert result["failed"]["reason"] == "backend_unreachable", result
    assert result["failed"]["message"].endswith(": GetExtendedTcpTable failed (14)"), result


def test_managed_server_token_has_administrators_for_deny_only_and_no_privileges(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    # The low integrity level is asked for too, but Wine 8 ignores it
    # (SetTokenInformation(TokenIntegrityLevel) is a no-op there); only a
    # real Windows machine shows it.
    result = _scenario(wine_tier, tmp_path, "idle", f"dbgrelay-job-{uuid.uuid4().hex}")
    token = result["token"]
    assert token["admins_deny_only"] and not token["admins_enabled"], token
    assert token["privileges"] == ["SeChangeNotifyPrivilege"], token


def test_a_listener_outside_the_job_on_the_servers_port_is_refused(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    result = _scenario(wine_tier, tmp_path, "outsider", f"dbgrelay-job-{uuid.uuid4().hex}")
    assert result["unlisten"] == "closed"
    assert result["refused"] is not None, "the relay connected to a listener outside the job"
    assert result["refused"]["reason"] == "backend_unreachable"
    assert f"process {result['relay_pid']} outside the server's job" in result["refused"]["message"]


def test_the_relay_dying_kills_the_server_and_its_grandchild(
    wine_tier: WineTier, tmp_path: Path, procs: ProcGroup
) -> None:
    token = f"dbgrelay-job-{uuid.uuid4().hex}"
    relay = wine_tier.start(procs, CHECKS, "host", token, cwd=tmp_path, name="relay-host")
    ready = json.loads(relay.wait_line('"ready"', stream="stdout", timeout=120))
    assert ready["ready"] is True
    tree = _linux_pids_with(token)
    # The relay's own Windows Python has the token on its command line too.
    hosting = [
        pid for pid in tree if b"managed_checks" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(hosting) == 1 and len(tree) == 3, tree
    os.kill(hosting[0], signal.SIGKILL)
    # Windows closes the dead relay's handle to the job, which kills the
    # tree; wait for wineserver to have done so (bounded: a hang fails).
    deadline = time.monotonic() + 60
    while _linux_pids_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _linux_pids_with(token) == [], "the server or its grandchild outlived the relay"


def test_check_config_warns_about_run_as_the_relay_cannot_honour(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    result = _scenario(wine_tier, tmp_path, "warnings", f"dbgrelay-job-{uuid.uuid4().hex}")
    me = result["me"]
    assert result["other"] == (
        "warning: targets build42 run as 'dbgrelay-target', but on Windows the relay starts "
        f'managed servers only as its own account {me!r}: set run_as = "{me}" (the server '
        "then runs under a restricted, low-integrity token), or their tunnels get 502 "
        "launch_failed"
    )
    assert result["own"] is None
    assert result["missing"] == []


def test_launch_as_another_account_is_refused_with_one_line(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    result = _scenario(wine_tier, tmp_path, "other_account", f"dbgrelay-job-{uuid.uuid4().hex}")
    assert result["reason"] == "launch_failed"
    assert result["message"].startswith(
        "cannot start processes as 'dbgrelay-target' on Windows: the relay has no logon for "
        "that account; set run_as = "
    ), result
    assert result["events"] == []
