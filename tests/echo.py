"""A plaintext TCP echo server in threads: the debug server behind a relay run as a process."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["EchoServer"]


class EchoServer:
    """Echoes every byte on a loopback port until :meth:`close`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening and end the live connections."""
        # close() alone leaves the thread blocked in accept() (Linux keeps the
        # socket open under it), and the port listening; shutdown() wakes it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        assert not self._acceptor.is_alive(), "the echo server's accept thread did not end"
