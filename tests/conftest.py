"""Fixtures for the whole suite: the account managed servers run as."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import accounts


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
