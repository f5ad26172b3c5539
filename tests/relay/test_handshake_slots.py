"""limits.max_handshakes: excess connections wait for a slot, within handshake_timeout."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.server import open_relay
from relay.session import handle_connection
from relay.tls import make_client_engine

from .test_session_time import Harness, wall

pytestmark = pytest.mark.parametrize("engine", ["stdlib", "pyopenssl"])


def one_slot(make_config, pki, nursery) -> Harness:
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
            }
        ],
        limits={"max_handshakes": 1},
    )
    return Harness(open_relay(config, wall_clock=wall), nursery, pki / "ca.pem")


async def test_a_connection_over_the_cap_waits_and_opens_once_a_slot_frees(
    autojump_clock, make_config, pki, nursery, token_for
):
    h = one_slot(make_config, pki, nursery)
    # A client that connects and says nothing holds the only slot.
    silent, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(handle_connection, h.relay, server_side)
    await trio.testing.wait_all_tasks_blocked()
    assert h.relay.handshake_slots.borrowed_tokens == 1

    opened: list = []

    async def second() -> None:
        opened.append(await h.connect(token_for(now=wall())))

    nursery.start_soon(second)
    await trio.testing.wait_all_tasks_blocked()
    assert h.relay.handshake_slots.statistics().tasks_waiting == 1
    assert opened == []

    await silent.aclose()  # the first handshake fails and gives its slot back
    with trio.fail_after(5):
        while not opened:
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.01)
    _, event = opened[0]
    assert event.status == 200
    assert h.relay.handshake_slots.borrowed_tokens == 0


async def test_waiting_for_a_slot_counts_against_handshake_timeout(
    autojump_clock, make_config, pki, nursery
):
    h = one_slot(make_config, pki, nursery)
    silent, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(handle_connection, h.relay, server_side)
    await trio.testing.wait_all_tasks_blocked()

    client_raw, server_raw = trio.testing.memory_stream_pair()
    served = trio.Event()

    async def serve() -> None:
        await handle_connection(h.relay, server_raw)
        served.set()

    started = trio.current_time()
    nursery.start_soon(serve)
    tls = make_client_engine(engine=h.engine, ca=h.ca).wrap(client_raw, "127.0.0.1")
    with pytest.raises(trio.BrokenResourceError):
        await tls.do_handshake()
    await served.wait()
    # Closed at the handshake deadline (10 s of mock time), never given the slot.
    assert trio.current_time() - started == pytest.approx(10.0)
    assert h.relay.handshake_slots.borrowed_tokens == 0
    await silent.aclose()
