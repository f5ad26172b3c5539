"""The privileged helper, run as ``dbgrelay serve`` runs it: a root process on a socket pair.

It must start launchers only as the accounts it was given at start, never as
root or as the relay's own account, and hand back each launcher's control
socket; and it must exit when the relay's end closes.
"""

from __future__ import annotations

import array
import json
import os
import pwd
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.privsep import HELPER

from .. import accounts

pytestmark = pytest.mark.skipif(not accounts.is_root(), reason=accounts.NOT_ROOT)

WAIT = 10.0
NOBODY = pwd.getpwnam("nobody")


class Helper:
    def __init__(self, relay_uid: int, run_as: list[str]) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(HELPER), "--relay-uid", str(relay_uid)]
            + ["--run-as", ",".join(run_as)],
            stdin=theirs.fileno(),
        )
        theirs.close()

    def ask(self, request: object, log: Path) -> tuple[dict, socket.socket | None]:
        with open(log, "ab") as f:
            self.sock.sendmsg(
                [json.dumps(request).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno()]))],
            )
        assert select.select([self.sock], [], [], WAIT)[0], "no answer from the helper"
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        for _, _, payload in ancdata:
            fds.frombytes(payload)
        return json.loads(data), (socket.socket(fileno=fds[0]) if fds else None)


@pytest.fixture
def helper() -> Iterator[Helper]:
    h = Helper(relay_uid=NOBODY.pw_uid, run_as=[accounts.TARGET, "root", "nobody"])
    yield h
    h.sock.close()
    h.proc.wait(WAIT)


def request(run_as: str, argv: list[str]) -> dict:
    return {"run_as": run_as, "kill_grace": 1, "listen": "127.0.0.1:9", "argv": argv}


def receive(control: socket.socket) -> dict:
    assert select.select([control], [], [], WAIT)[0], "no report from the launcher"
    return json.loads(control.recv(65536))


def test_starts_a_launcher_as_a_configured_account_and_hands_back_its_control_socket(
    helper, tmp_path
):
    answer, control = helper.ask(request(accounts.TARGET, ["sleep", "1000"]), tmp_path / "log")
    assert answer["ok"] is True and control is not None
    started = receive(control)
    assert started["event"] == "started"
    status = Path(f"/proc/{started['pid']}/status").read_text()
    uid = pwd.getpwnam(accounts.TARGET).pw_uid
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
    control.send(b"k")
    assert receive(control)["event"] == "exited"
    control.close()


@pytest.mark.parametrize(
    ("run_as", "why"),
    [
        ("root", "is root or the relay's own account"),
        ("nobody", "is root or the relay's own account"),  # the relay's uid here
        ("daemon", "was not configured when the relay started"),
    ],
)
def test_refuses_root_the_relays_account_and_accounts_not_configured(helper, tmp_path, run_as, why):
    answer, control = helper.ask(request(run_as, ["sleep", "1000"]), tmp_path / "log")
    assert control is None and answer["ok"] is False
    assert why in answer["error"]


def test_refuses_a_malformed_request(helper, tmp_path):
    answer, control = helper.ask({"run_as": accounts.TARGET, "argv": "sh"}, tmp_path / "log")
    assert control is None and answer == {"ok": False, "error": "malformed request: argv"}


def test_exits_when_the_relays_end_closes():
    h = Helper(relay_uid=NOBODY.pw_uid, run_as=[accounts.TARGET])
    h.sock.close()
    assert h.proc.wait(WAIT) == 0
    assert os.path.exists(HELPER)
