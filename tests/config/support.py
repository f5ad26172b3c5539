"""Helpers for config tests: placeholder files and loading a config text.

The loader checks that certificates, keys and the JWKS can be read, not what
is in them, so the files hold placeholders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_config

#: The smallest valid config, relative to a folder holding the fixture files.
MINIMAL = """\
[tls]
cert = "server.pem"
key = "server.key"

[auth]
jwks = "jwks.json"
"""

PLACEHOLDERS = ("server.pem", "server.key", "jwks.json", "clients-ca.pem", "ocsp.der", "audit.key")


def write_config(folder: Path, text: str, name: str = "dbgrelay.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(folder: Path, text: str) -> list[str]:
    """Load ``text`` as ``dbgrelay.toml`` and return the problem lines it causes."""
    write_config(folder, text)
    with pytest.raises(ConfigError) as info:
        load_config(Path("dbgrelay.toml"))
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems
