"""The connect path: cached token checks, pre-made audit files, backend connects."""

from __future__ import annotations

import time

import pytest
import trio

from auth import peek_unverified
from relay.connector import RelayRefused, open_tunnel

from .conftest import start_echo, start_relay
from .test_relay import gdb_target

pytestmark = pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])


async def test_a_revoked_token_is_refused_at_once_though_its_check_was_cached(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    running = await start_relay(nursery, make_config([gdb_target("build42", backend.port)]), pki)
    token = token_for()
    for _ in range(2):
        tls, _, _ = await open_tunnel(running.settings(token))
        await tls.aclose()
    assert running.relay.token_cache.hits == 1
    running.relay.store.revoke(peek_unverified(token)["jti"], now=time.time())
    running.relay.refresh_revocations()
    with pytest.raises(RelayRefused) as info:
        await open_tunnel(running.settings(token))
    assert (info.value.status, info.value.reason) == (401, "revoked")
    assert backend.connections == 2
    with trio.fail_after(5):
        await running.relay.wait_no_sessions()
    running.stop.set()
