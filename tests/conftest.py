"""Fixtures for the whole suite: the account managed servers run as, and a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import accounts
from .postgres import PgServer, start_pg_server


@pytest.fixture(scope="session", autouse=True)
def target_account() -> Iterator[str]:
    """``dbgrelay-target`` under root (created for the session if missing), else our own."""
    created = False
    if accounts.is_root() and not accounts.exists(accounts.TARGET):
        accounts.create(accounts.TARGET)
        created = True
    yield accounts.target_account()
    if created:
        accounts.remove(accounts.TARGET)


@pytest.fixture
def target_dir(target_account: str) -> Iterator[Path]:
    """A 0755 folder owned by the target account, outside pytest's private tmp_path."""
    path = accounts.shared_dir(owner=target_account)
    yield path
    accounts.rmtree(path)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole test session; skips where none is installed."""
    try:
        with start_pg_server() as server:
            yield server
    except LookupError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The DSN of a new, empty database on the session's server."""
    return pg_server.create_database()


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain TCP echo server on 127.0.0.1 in threads, for tests that run the relay as a process."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        # close() alone leaves the thread blocked in accept() (Linux keeps the
        # socket open under it); shutdown() wakes it.
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
        assert not thread.is_alive(), "the echo server's accept thread did not end"
