"""One end of a bare TLS relay pair on trio: ``python -m bench --paths trio-bare``.

``python -m bench.bare_pair ROLE LISTEN UPSTREAM CA CERT KEY`` serves every
connection made to 127.0.0.1:LISTEN until stopped: it connects to
127.0.0.1:UPSTREAM and moves the bytes with the relay's own TLS stream
(stdlib engine, TLS 1.3) and trio pump driver.  ROLE ``relay`` takes TLS from
the listener and sends plaintext upstream; ``connector`` takes plaintext and
sends TLS upstream, resuming the relay's last TLS session as ``dbgrelay
connect`` does.

Nothing else of dbgrelay runs: no request, token, audit, log line, metric or
data-plane thread.  What this path costs over stunnel is what trio and the
project's TLS stream cost by themselves, the floor under ``dbgrelay-stdlib``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from relay.datapath.pump import Traffic
from relay.datapath.sockets import open_tcp
from relay.pump import run_pump
from relay.tls import make_client_engine, make_server_engine

ROLES = ("relay", "connector")


async def serve(role: str, listen: int, upstream: int, ca: Path, cert: Path, key: Path) -> None:
    """Serve connections on ``listen`` until cancelled."""
    if role == "relay":
        server = make_server_engine(
            engine="stdlib",
            cert=cert,
            key=key,
            min_version="1.3",
            ticket_lifetime=3600.0,
        )
    else:
        client = make_client_engine(engine="stdlib", ca=ca, min_version="1.3")
    newest: list[object | None] = [None]

    async def handle(down: trio.SocketStream) -> None:
        up = await open_tcp("127.0.0.1", upstream)
        if role == "relay":
            near, far = server.wrap(down), up
            await near.do_handshake()
        else:
            near, far = down, client.wrap(up, "127.0.0.1", session=newest[0])
            await far.do_handshake()
        try:
            await run_pump(near, far, Traffic())
        finally:
            if role == "connector" and not far.resumed():
                # The ticket came with the relay's first bytes.
                newest[0] = far.session()
            for stream in (near, far):
                await trio.aclose_forcefully(stream)

    await trio.serve_tcp(handle, listen, host="127.0.0.1")


def main(argv: list[str]) -> None:
    role, listen, upstream, *files = argv
    if role not in ROLES:
        raise SystemExit(f"ROLE must be one of {', '.join(ROLES)}, got {role!r}")
    try:
        trio.run(serve, role, int(listen), int(upstream), *map(Path, files))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
