"""The plaintext backend every path ends at: an echo port and a sink port.

Run as ``python -m bench.backend --echo-port P --sink-port Q``. One thread and
one epoll loop serve both ports, so the backend costs the same on every path.

* echo: every byte received is sent back. A connection whose replies cannot
  be written stops being read until they drain, so a fast sender meets TCP
  backpressure instead of growing a buffer here.
* sink: the client first sends the payload length as 8 bytes big-endian;
  payload bytes are then counted and dropped, and once all have arrived the
  count goes back as 8 bytes and the connection closes. The client's timer
  stops on that reply, so it measures delivery, not buffering. The length
  prefix avoids relying on half-close (``shutdown(SHUT_WR)``), which not every
  relay carries through.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys

from .procs import raise_nofile_limit

__all__ = ["serve_forever", "main"]

_CHUNK = 256 * 1024


class _Conn:
    __slots__ = ("sock", "mode", "pending", "count", "header", "expected")

    def __init__(self, sock: socket.socket, mode: str) -> None:
        self.sock = sock
        self.mode = mode
        self.pending = b""
        self.count = 0
        self.header = b""
        self.expected: int | None = None


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _sink(conn: _Conn, data: memoryview) -> None:
    if conn.expected is None:
        need = 8 - len(conn.header)
        conn.header += bytes(data[:need])
        data = data[need:]
        if len(conn.header) < 8:
            return
        conn.expected = int.from_bytes(conn.header, "big")
    conn.count += len(data)


def serve_forever(echo_port: int, sink_port: int) -> None:
    """Serve the echo and sink ports on 127.0.0.1 until the process is killed."""
    sel = selectors.DefaultSelector()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    for port, mode in ((echo_port, "echo"), (sink_port, "sink")):
        sel.register(_listener(port), selectors.EVENT_READ, mode)

    def close(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()

    while True:
        for key, events in sel.select():
            data = key.data
            if isinstance(data, str):
                try:
                    sock, _ = key.fileobj.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(sock, selectors.EVENT_READ, _Conn(sock, data))
                continue
            conn: _Conn = data
            try:
                if events & selectors.EVENT_WRITE:
                    sent = conn.sock.send(conn.pending)
                    conn.pending = conn.pending[sent:]
                    if not conn.pending:
                        sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    continue
                # recv_into one reused buffer: recv(256 KiB) would malloc above
                # glibc's mmap threshold and pay mmap/munmap on every round trip.
                n = conn.sock.recv_into(buffer)
                if n == 0:
                    close(conn)
                    continue
                if conn.mode == "sink":
                    _sink(conn, view[:n])
                    if conn.expected is not None and conn.count >= conn.expected:
                        conn.sock.setblocking(True)
                        conn.sock.sendall(conn.count.to_bytes(8, "big"))
                        close(conn)
                    continue
                try:
                    sent = conn.sock.send(view[:n])
                except BlockingIOError:
                    sent = 0
                if sent < n:
                    conn.pending = bytes(view[sent:n])
                    sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                close(conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__)
    parser.add_argument("--echo-port", type=int, required=True)
    parser.add_argument("--sink-port", type=int, required=True)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve_forever(args.echo_port, args.sink_port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
