"""Named-pipe backend checks, run by the Windows Python under Wine (see test_npipe.py).

``python npipe_checks.py SCENARIO`` runs one scenario against pipe servers
made here with pywin32 (in threads, blocking calls) and prints one JSON object
with what the relay's ``open_backend`` saw.  Not collected by pytest.
"""

import json
import os
import sys
import threading

import trio
import trio.testing
import win32file
import win32pipe

from config import NpipeBackend
from relay.backends import BackendError, open_backend, probe_backend
from tests.windows.pipe_echo import create_instance, echo_until_gone

NAME = f"dbgrelay-test-{os.getpid()}"
PATH = rf"\\.\pipe\{NAME}"
BACKEND = NpipeBackend(host=".", pipe=NAME)


def echo(pipe, log):
    """Serve one client: echo until it goes, then disconnect."""
    win32pipe.ConnectNamedPipe(pipe, None)
    log.append("connected")
    echo_until_gone(pipe)
    log.append("disconnected")


def serve(clients, log, *, greeting=None, then_close=False):
    pipe = create_instance(PATH, 1)  # one instance: a second client finds the pipe busy
    ready = threading.Event()

    def run():
        ready.set()
        for _ in range(clients):
            if greeting is not None:
                win32pipe.ConnectNamedPipe(pipe, None)
                log.append("connected")
                win32file.WriteFile(pipe, greeting)
                if then_close:
                    win32file.FlushFileBuffers(pipe)
                    win32pipe.DisconnectNamedPipe(pipe)
                    log.append("disconnected")
                    continue
            echo(pipe, log)
        win32file.CloseHandle(pipe)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait()
    return thread


async def echo_all(stream, payload):
    got = bytearray()

    async def send():
        view = memoryview(payload)
        for i in range(0, len(view), 50000):
            await stream.send_all(view[i : i + 50000])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while len(got) < len(payload):
            data = await stream.receive_some()
            if not data:
                break
            got += data
    return bytes(got)


async def scenario_echo():
    log = []
    serve(1, log)
    stream = await open_backend(BACKEND, connect_timeout=10)
    payload = os.urandom(1024 * 1024 + 3)
    got = await echo_all(stream, payload)
    await stream.aclose()
    return {"same": got == payload, "size": len(got)}


async def scenario_absent():
    try:
        await open_backend(NpipeBackend(host=".", pipe=NAME + "-absent"), connect_timeout=10)
    except BackendError as exc:
        return {"reason": exc.reason, "message": str(exc)}
    return {"reason": None}


async def scenario_busy():
    log = []
    serve(2, log)
    first = await open_backend(BACKEND, connect_timeout=10)
    order = []

    async def second_client():
        stream = await open_backend(BACKEND, connect_timeout=30)
        order.append("second opened")
        await stream.send_all(b"second")
        order.append(bytes(await stream.receive_some()).decode())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second_client)
        # The second client is waiting for the only instance; the first still talks.
        await first.send_all(b"first")
        order.append(bytes(await first.receive_some()).decode())
        order.append("first closing")
        await first.aclose()
    return {"order": order}


async def scenario_busy_timeout():
    log = []
    serve(1, log)
    first = await open_backend(BACKEND, connect_timeout=10)
    try:
        await open_backend(BACKEND, connect_timeout=5)
    except BackendError as exc:
        result = {"reason": exc.reason, "message": str(exc)}
    else:
        result = {"reason": None}
    await first.aclose()
    return result


async def scenario_eof():
    log = []
    serve(1, log, greeting=b"bye", then_close=True)
    stream = await open_backend(BACKEND, connect_timeout=10)
    got = []
    while True:
        data = await stream.receive_some()
        got.append(bytes(data).decode())
        if not data:
            break
    try:
        await stream.send_all(b"anyone there?")
    except trio.BrokenResourceError:
        sent = "broken"
    else:
        sent = "sent"
    await stream.aclose()
    return {"received": got, "send_after_eof": sent}


async def scenario_cancel_read():
    log = []
    serve(1, log)
    stream = await open_backend(BACKEND, connect_timeout=10)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def reader():
                await stream.receive_some()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    # The cancelled read took no bytes: the stream still works.
    await stream.send_all(b"still here")
    data = await stream.receive_some()
    await stream.aclose()
    return {"cancelled": scope.cancelled_caught, "after": bytes(data).decode()}


async def scenario_probe():
    log = []
    serve(1, log)
    live = await probe_backend(BACKEND, connect_timeout=10)
    absent = await probe_backend(NpipeBackend(host=".", pipe=NAME + "-absent"), connect_timeout=10)
    return {"live": live, "absent": absent}


def main():
    name = sys.argv[1]
    scenario = globals()[f"scenario_{name}"]
    clock = trio.testing.MockClock(autojump_threshold=0) if name == "busy_timeout" else None
    print(json.dumps(trio.run(scenario, clock=clock)))


main()
