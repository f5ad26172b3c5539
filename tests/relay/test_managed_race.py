"""No local process reaches a managed server before the relay does.

A launched gdbserver serves its first client, its port is in its command
line, and it has no authentication of its own; a local process polling
/proc used to connect first.  Here a real racer process does exactly that,
as fast as it can, for 50 launches of a real ``gdbserver --once``, while the
developer's tunnel must reach a working gdbserver every time.  The server
listens in the launcher's private network namespace, so the host's
127.0.0.1:PORT has nothing behind it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import trio

from .test_managed import (
    GDBSERVER,
    LONG_TOKEN,
    ask_gdbserver,
    assert_stops_at_start,
    managed,
    once_server,
    pytestmark,  # noqa: F401  (skip without gdbserver)
    relay_for,
    tunnel,
)

LAUNCHES = 50

# Polls /proc for gdbserver command lines, takes the port from them and
# connects to 127.0.0.1:PORT in a loop until its standard input closes.  It
# goes only for the servers this test's relay launched (descendants of
# argv[1]): other gdbservers on a shared machine are none of its business.
RACER = r"""
import json, os, re, select, socket, sys
relay = int(sys.argv[1])
seen, attempts, got_in = set(), 0, []

def launched_by_relay(pid):
    for _ in range(16):
        try:
            stat = open(f"/proc/{pid}/stat", "rb").read()
        except OSError:
            return False
        pid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        if pid == relay:
            return True
        if pid <= 1:
            return False
    return False

while not select.select([0], [], [], 0)[0]:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"gdbserver") or not launched_by_relay(int(pid)):
            continue
        for arg in argv:
            m = re.fullmatch(rb"127\.0\.0\.1:(\d+)", arg)
            if not m:
                continue
            port = int(m.group(1))
            seen.add(port)
            for _ in range(20):
                attempts += 1
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                        s.sendall(b"$?#3f")
                        got_in.append([port, s.recv(100).decode(errors="replace")])
                except OSError:
                    pass
print(json.dumps({"ports_seen": len(seen), "attempts": attempts, "got_in": got_in}))
"""


async def test_a_racing_local_client_never_gets_in_over_50_launches(
    nursery, make_config, token_for, pki
):
    running = await relay_for(nursery, make_config, pki, managed(once_server()))
    running.relay.fsync_in_thread = True  # real clock here: keep the disk off the loop
    token = token_for(ttl=LONG_TOKEN)
    racer = await trio.lowlevel.open_process(
        [sys.executable, "-c", RACER, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    exited = 0
    try:
        for _ in range(LAUNCHES):
            tls, _sid = await tunnel(running, token)
            assert_stops_at_start(await ask_gdbserver(tls))
            await tls.aclose()
            # gdbserver --once exits after its client: the next tunnel launches afresh.
            with trio.fail_after(20):
                while True:
                    server = running.relay.managed.get("build42")
                    if server is not None and server.exit is not None:
                        break
                    await trio.sleep(0.005)
            exited += 1
            await running.relay.managed["build42"].wait_done()
    finally:
        await racer.stdin.aclose()
        output = b""
        with trio.fail_after(20):
            while chunk := await racer.stdout.receive_some(65536):
                output += chunk
            await racer.wait()
    report = json.loads(output)
    assert exited == LAUNCHES
    assert report["got_in"] == [], report
    # The racer did find the servers' ports and tried them.
    assert report["ports_seen"] >= 1 and report["attempts"] >= 20, report
    assert GDBSERVER is not None
    running.stop.set()
