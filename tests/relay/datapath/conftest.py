"""Sans-IO TLS connections of both engines, handshaken by moving bytes by hand."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from relay.datapath.tls import TLSConnection
from relay.tls import StdlibEngine
from relay.tls_openssl import OpenSSLEngine


@pytest.fixture
def contexts(engines):
    """The engine's name and its server and client contexts (from ``engines``)."""
    server, client = engines
    return server.name, server.context, client.context


def shuttle(a: TLSConnection, b: TLSConnection) -> None:
    """Deliver what each side has queued to the other, once."""
    for src, dst in ((a, b), (b, a)):
        out = src.outgoing()
        if out:
            src.sent(len(out))
            dst.receive(bytes(out))


def connected_pair(contexts) -> tuple[TLSConnection, TLSConnection]:
    """A handshaken (user, relay) pair: the developer's end and the relay's."""
    name, server_ctx, client_ctx = contexts
    if name == "stdlib":
        server = StdlibEngine(server_ctx, server_side=True)
        client = StdlibEngine(client_ctx, server_side=False, server_hostname="127.0.0.1")
    else:
        sconn = SSL.Connection(server_ctx, None)
        sconn.set_accept_state()
        cconn = SSL.Connection(client_ctx, None)
        cconn.set_connect_state()
        server = OpenSSLEngine(sconn, server_side=True)
        client = OpenSSLEngine(cconn, server_side=False)
    user, relay = TLSConnection(client), TLSConnection(server)
    for _ in range(10):
        if not user.handshake_done:
            user.handshake()
        if not relay.handshake_done:
            relay.handshake()
        shuttle(user, relay)
        if user.handshake_done and relay.handshake_done:
            break
    assert user.handshake_done and relay.handshake_done
    return user, relay
