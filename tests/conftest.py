"""Fixtures shared by every test package: a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .postgres import PgServer, start_pg_server


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
