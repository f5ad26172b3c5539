"""Fixtures for config tests: a folder of real placeholder files."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support import PLACEHOLDERS


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with every referenced file, made the current directory.

    Working from this folder lets tests load ``dbgrelay.toml`` by its bare
    name, so problem lines start with ``dbgrelay.toml:`` as operators see them.
    """
    for name in PLACEHOLDERS:
        (tmp_path / name).write_bytes(b"placeholder\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path
