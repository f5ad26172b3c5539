"""open_relay does the start-up disk I/O; the Relay constructor does none."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path

from auth import RevocationStore
from config import Config
from relay.identity import IdentityKeys
from relay.server import Relay, load_runtime, open_relay

TARGET = {"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:9"}


def test_open_relay_creates_the_state_dir_private(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    state = tmp_path / "fresh" / "state"
    relay = open_relay(make_config([TARGET], state_dir=str(state)))
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert (state / "tokens.sqlite").is_file()
    finally:
        relay.close()


def test_open_relay_starts_with_the_stored_revocations(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    config = make_config([TARGET])
    config.relay.state_dir.mkdir(mode=0o700)
    store = RevocationStore(config.relay.state_dir / "tokens.sqlite")
    store.revoke("a-revoked-jti", now=time.time())
    store.revoke_user("mallory", now=time.time())
    store.close()
    relay = open_relay(config)
    try:
        assert "a-revoked-jti" in relay.revoked.jtis
        assert "mallory" in relay.revoked.user_cutoffs
    finally:
        relay.close()


def test_the_constructor_touches_no_files(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    # Everything from disk is handed in; the state folder the config names
    # is neither created nor read.
    config = make_config([TARGET], state_dir=str(tmp_path / "never-created"))
    store = RevocationStore(tmp_path / "elsewhere.sqlite")
    store.revoke("a-revoked-jti", now=time.time())
    runtime = load_runtime(config)
    identity = IdentityKeys(config.identity.oidc, wall_clock=time.time)
    relay = Relay(runtime, store, identity)
    try:
        assert not (tmp_path / "never-created").exists()
        assert relay.revoked.jtis == frozenset()  # read by open_relay, not here
        relay.refresh_revocations()
        assert "a-revoked-jti" in relay.revoked.jtis
    finally:
        relay.close()
