"""Fixtures for the whole suite.

The account managed servers run as, a real PostgreSQL server, and a loopback echo server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import accounts
from .echo import EchoServer
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
def echo_server() -> Iterator[EchoServer]:
    """A plain TCP echo server on 127.0.0.1 in threads, for tests that run the relay as a process."""
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def echo_port(echo_server: EchoServer) -> int:
    """The port of :func:`echo_server`."""
    return echo_server.port
