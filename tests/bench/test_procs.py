"""The supervisor stops whole process groups, and readiness comes from /proc/net/tcp.

The bench's own process stays alive here, so the kernel's parent-death signal
never fires: whatever stops the processes in these tests is the supervisor.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from bench.procs import (
    BenchError,
    Supervisor,
    accepted_connections,
    free_port,
    group_pids,
    is_listening,
    read_rss,
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _supervisor(tmp_path: Path) -> Supervisor:
    return Supervisor(tmp_path, pin_command=None, env=dict(os.environ))


def _wait_for_file(path: Path, child) -> str:
    while not path.exists() or not path.read_text().endswith("\n"):
        assert child.popen.poll() is None, child.log_tail()
        time.sleep(0.01)
    return path.read_text()


def test_stop_all_kills_the_children_of_a_child(tmp_path):
    sup = _supervisor(tmp_path)
    pid_file = tmp_path / "grandchild"
    child = sup.start("shell", ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"])
    grandchild = int(_wait_for_file(pid_file, child))
    assert set(group_pids(child.pid)) == {child.pid, grandchild}
    sup.stop_all()
    assert not _alive(child.pid)
    assert not _alive(grandchild)
    assert sup.started == [child.pid]


def test_stop_sends_sigkill_to_a_child_that_ignores_sigterm(tmp_path):
    sup = _supervisor(tmp_path)
    ready = tmp_path / "ready"
    child = sup.start("stubborn", ["sh", "-c", f"trap '' TERM; echo ok > {ready}; sleep 300"])
    _wait_for_file(ready, child)
    sup.stop(child, grace=0.2)
    assert child.popen.returncode is not None
    assert group_pids(child.pid) == []


def test_run_returns_stdout_and_reports_a_failure_with_its_output(tmp_path):
    sup = _supervisor(tmp_path)
    assert sup.run("echo", ["sh", "-c", "echo hello"], timeout=30) == "hello\n"
    with pytest.raises(BenchError, match=r"broken exited with status 3: went wrong"):
        sup.run("broken", ["sh", "-c", "echo went wrong >&2; exit 3"], timeout=30)


def test_wait_listening_names_the_child_that_exited_instead(tmp_path):
    sup = _supervisor(tmp_path)
    child = sup.start("quitter", ["sh", "-c", "echo cannot bind >&2; exit 1"])
    with pytest.raises(BenchError, match=r"quitter exited with status 1 .*cannot bind") as info:
        sup.wait_listening(child, free_port())
    assert info.value.reason == "not_ready"


def test_is_listening_sees_a_listener_and_not_a_bound_socket():
    port = free_port()
    assert not is_listening(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert not is_listening(port)
        sock.listen()
        assert is_listening(port)
    assert not is_listening(port)


def test_read_rss_counts_live_processes_and_skips_gone_ones():
    rss, hwm = read_rss([os.getpid()])
    assert 0 < rss <= hwm
    # pid_max is at most 2**22, so this process cannot exist.
    assert read_rss([2**22 + 1]) == (0, 0)


def test_accepted_connections_counts_the_open_ones_and_not_the_listener():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert accepted_connections(port) == 0  # the listener is not a connection
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        accepted = [listener.accept()[0] for _ in clients]
        assert accepted_connections(port) == 2
        clients[0].close()  # the server has not closed its side: not over
        assert accepted_connections(port) == 2
        for sock in [*clients, *accepted]:
            sock.close()
