"""Shared fixtures for the auth tests: real key files in a temporary folder."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from auth import KeySet, SigningKey, init_keys, load_jwks, load_signing_key

ISSUER = "dbgrelay-admin"
AUDIENCE = "dbgrelay"
# A fixed moment (2023-11-14T22:13:20Z). Tests never read the real clock.
NOW = 1_700_000_000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    init_keys(out)
    return out


@pytest.fixture
def signing_key(key_dir: Path) -> SigningKey:
    return load_signing_key(key_dir / "signing.key")


@pytest.fixture
def keyset(key_dir: Path) -> KeySet:
    return load_jwks(key_dir / "jwks.json")
