"""One end of a bare TLS relay pair for ``python -m bench.planes``.

``python -m bench.pair_end MODE ROLE LISTEN UPSTREAM CERTDIR`` accepts one
connection on 127.0.0.1:LISTEN, connects to 127.0.0.1:UPSTREAM and moves the
tunnel's bytes with the relay's own :class:`~relay.datapath.pump.Pump` and
data-plane step, hosted one of two ways:

* ``thread``: trio in the main thread, the tunnel handed to
  :class:`~relay.datapath.thread_driver.DataPlane` (its own thread), as the
  relay does;
* ``guest``: a level-triggered epoll loop in the main thread, with trio as
  its guest (:func:`trio.lowlevel.start_guest_run`) for the handshake.

ROLE ``relay`` takes TLS from the listener and sends plaintext upstream;
``connector`` takes plaintext and sends TLS upstream.  No token, audit or
metrics: only what the two hostings differ in.
"""

from __future__ import annotations

import collections
import select
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from relay.datapath import trio_driver
from relay.datapath.pump import Traffic
from relay.datapath.thread_driver import DataPlane, _Tunnel
from relay.tls import make_client_engine, make_server_engine

MODES = ("thread", "guest")


async def establish(
    role: str, listen: int, upstream: int, certs: Path
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Accept one connection, connect upstream, run the TLS handshake: (client, backend)."""
    listener = (await trio.open_tcp_listeners(listen, host="127.0.0.1"))[0]
    down = await listener.accept()
    await listener.aclose()
    up = await trio.open_tcp_stream("127.0.0.1", upstream)
    for stream in (down, up):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if role == "relay":
        server = make_server_engine(
            engine="stdlib", cert=certs / "server.pem", key=certs / "server.key", min_version="1.3"
        )
        client = server.wrap(down)
        await client.do_handshake()
        return client, up
    connector = make_client_engine(engine="stdlib", ca=certs / "ca.pem", min_version="1.3")
    backend = connector.wrap(up, "127.0.0.1")
    await backend.do_handshake()
    return down, backend


def run_thread(role: str, listen: int, upstream: int, certs: Path) -> None:
    async def main() -> None:
        client, backend = await establish(role, listen, upstream, certs)
        await DataPlane().run_pump(client, backend, Traffic())

    trio.run(main)


def run_guest(role: str, listen: int, upstream: int, certs: Path) -> None:
    epoll = select.epoll()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    epoll.register(wake_r.fileno(), select.EPOLLIN)
    calls: collections.deque[Callable[[], object]] = collections.deque()
    tunnels: dict[int, tuple[_Tunnel, int]] = {}
    finished: list[object] = []

    def call_soon(fn: Callable[[], object]) -> None:
        calls.append(fn)
        try:
            wake_w.send(b"\0")
        except BlockingIOError:
            pass  # a wake-up is pending already

    async def main() -> None:
        client, backend = await establish(role, listen, upstream, certs)
        sides = [trio_driver.side_for(client), trio_driver.side_for(backend)]
        pump = trio_driver.pump_between(
            sides, Traffic(), time.monotonic(), idle_timeout=None, close_timeout=5.0
        )
        tunnel = _Tunnel(pump, (sides[0].raw.sock, sides[1].raw.sock), lambda: None)
        tunnel.masks = [select.EPOLLIN | select.EPOLLOUT] * 2
        for side, fd in enumerate(tunnel.fds):
            tunnels[fd] = (tunnel, side)
            epoll.register(fd, tunnel.masks[side])
        await trio.sleep_forever()

    trio.lowlevel.start_guest_run(
        main, run_sync_soon_threadsafe=call_soon, done_callback=finished.append
    )
    scratch = memoryview(bytearray(trio_driver.RECEIVE_SIZE))
    while not finished:
        events = epoll.poll(0 if calls else -1)
        now = time.monotonic()
        for fd, _ in events:
            entry = tunnels.get(fd)
            if entry is None:
                try:
                    while wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            tunnel, side = entry
            tunnel.readable[side] = True
            DataPlane._step(epoll, tunnel, now, scratch)
            if tunnel.pump.done:
                return
        while calls:
            calls.popleft()()


def main(argv: list[str]) -> None:
    mode, role, listen, upstream, certs = argv
    run = run_thread if mode == "thread" else run_guest
    run(role, int(listen), int(upstream), Path(certs))
    # Linger so that the caller can read this process's CPU time.
    time.sleep(2)


if __name__ == "__main__":
    main(sys.argv[1:])
