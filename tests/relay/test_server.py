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

from ..processes import json_of_script

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


# Builds a Relay in a fresh interpreter and lists the file, folder, socket
# and process events (PEP 578 audit hooks) raised while the constructor runs;
# with "control", also while it writes a relay-level audit record.
_CONSTRUCT = r"""
import json, sys, time
from pathlib import Path

from auth import RevocationStore
from config import config_from_dict
from relay.identity import IdentityKeys
from relay.server import Relay, load_runtime

pki, keydir, tmp, control = sys.argv[1:5]
pki, keydir, tmp = Path(pki), Path(keydir), Path(tmp)
config = config_from_dict(
    {
        "relay": {"listen": ["127.0.0.1:0"], "state_dir": str(tmp / "state")},
        "tls": {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")},
        "auth": {"jwks": str(keydir / "jwks.json"), "audit_key": str(keydir / "audit.key")},
        "targets": [{"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:9"}],
    },
    base_dir=tmp,
)
store = RevocationStore(tmp / "elsewhere.sqlite")
runtime = load_runtime(config)
identity = IdentityKeys(config.identity.oidc, wall_clock=time.time)
events, watching = [], True
IO = ("open", "os.", "shutil.", "sqlite3.", "socket.", "subprocess.")


def hook(event, args):
    if watching and event.startswith(IO):
        events.append(f"{event} {args[0]!r}"[:200])


sys.addaudithook(hook)
relay = Relay(runtime, store, identity)
if control == "control":
    relay.audit_event("test.control")
watching = False
print(json.dumps(events))
"""


def _io_of(tmp_path: Path, pki: Path, keydir: Path, control: str) -> list[str]:
    return json_of_script(_CONSTRUCT, str(pki), str(keydir), str(tmp_path), control)


def test_the_constructor_does_no_disk_or_network_io(tmp_path: Path, pki: Path, keydir: Path):
    assert _io_of(tmp_path, pki, keydir, "") == []


def test_the_io_check_sees_the_relay_write_its_audit_file(tmp_path: Path, pki: Path, keydir: Path):
    seen = _io_of(tmp_path, pki, keydir, "control")
    assert any(event.startswith("open ") and "relay-" in event for event in seen), seen
