"""Revocation racing tunnels that are opening: every revocation refuses or ends.

A tunnel's token is checked, then its audit file is made durable (an fsync in
a worker thread), then the tunnel opens.  A revocation that landed during the
fsync used to end nothing: the session was not registered yet, so it opened
afterwards and lived on (issue 11 saw 3 to 4 of about 70 tunnels survive).
These tests open many tunnels at once on a real relay (real TLS on loopback,
the admin API on its Unix socket) and revoke the token through the admin API
while some of them are inside that fsync.
"""

from __future__ import annotations

import trio

from auth import peek_unverified
from relay.admin_client import AdminClient
from relay.connector import RelayRefused, open_tunnel

from .conftest import RunningRelay, start_echo, start_relay
from .test_admin import receive_eof, session_end_record, start_admin
from .test_relay import gdb_target

OPENERS = 24
ROUNDS = 5
# Sessions held inside their audit fsync while the revocation lands.
HELD = 4


class SlowDisk:
    """Holds the first ``HELD`` start-record fsyncs of a round until released.

    It wraps the relay's real fsync: what it simulates is a disk slow enough
    that a revocation is applied while those sessions wait for it.
    """

    def __init__(self, running: RunningRelay) -> None:
        self.sync = running.relay.sync_audit
        self.holding = False
        self.held = 0
        self.all_held = trio.Event()
        self.release = trio.Event()
        self.seen: set[str] = set()
        self.held_ids: set[str] = set()
        running.relay.sync_audit = self.sync_audit  # type: ignore[method-assign]

    def arm(self) -> None:
        self.holding, self.held, self.held_ids = True, 0, set()
        self.all_held, self.release = trio.Event(), trio.Event()

    async def sync_audit(self, writer) -> None:
        # A session file's first fsync is the one that makes its start record durable.
        first = writer.path.name not in self.seen and not writer.path.name.startswith("relay-")
        self.seen.add(writer.path.name)
        if self.holding and first and self.held < HELD:
            self.held += 1
            self.held_ids.add(writer.path.stem)
            if self.held == HELD:
                self.all_held.set()
            await self.release.wait()
        await self.sync(writer)

    def open(self) -> None:
        self.holding = False
        self.release.set()


async def test_no_tunnel_survives_a_revocation_that_lands_while_it_opens(
    nursery, make_config, token_for, pki
):
    backend = await start_echo(nursery)
    # Housekeeping stays out of the way (its fsyncs are not start records);
    # the admin API applies the revocation itself.
    config = make_config(
        [gdb_target("build42", backend.port)],
        revocation_interval="1h",
        audit_fsync_interval="1h",
        # Every opener is the same user from one address, opening tunnels as
        # fast as it can until refused: no load limit may be what refuses them.
        # How many open before the revocation lands depends on the machine's
        # speed, so the session caps are far above what a round can reach.
        max_sessions=100_000,
        limits={
            "max_sessions_per_user": 100_000,
            "auth_failure_burst": ROUNDS * OPENERS,
            "handshake_burst": 100_000,
            "handshake_rate": 100_000,
        },
    )
    running = await start_relay(nursery, config, pki)
    client = AdminClient(await start_admin(nursery, running))
    disk = SlowDisk(running)

    for _ in range(ROUNDS):
        token = token_for("alice")
        jti = peek_unverified(token)["jti"]
        opened: list[tuple[trio.abc.Stream, str]] = []
        refusals: list[tuple[int, str]] = []
        disk.arm()

        async def opener(token: str = token, opened=opened, refusals=refusals) -> None:
            while True:
                try:
                    tls, sid, _ = await open_tunnel(running.settings(token))
                except RelayRefused as exc:
                    refusals.append((exc.status, exc.reason))
                    return
                opened.append((tls, sid))

        async with trio.open_nursery() as openers:
            for _ in range(OPENERS):
                openers.start_soon(opener)
            with trio.fail_after(30):
                await disk.all_held.wait()
            # The held sessions passed the token check; the admin API lists
            # them as opening, and the revocation must reach them.
            held = disk.held_ids
            listed = {s["id"]: s["state"] for s in await client.sessions()}
            assert {sid: listed.get(sid) for sid in held} == dict.fromkeys(held, "opening")
            answer = await client.revoke_token(jti, reason="race")
            assert held <= set(answer["sessions_ended"])
            disk.open()

        # Every opener ended with the revocation; the held sessions got it
        # instead of their 200.
        assert refusals == [(401, "revoked")] * OPENERS
        opened_ids = {sid for _, sid in opened}
        assert not held & opened_ids
        # No survivor: every tunnel that opened has been ended by the revocation.
        survivors = [
            sid
            for sid in opened_ids
            if sid in running.relay.sessions and running.relay.sessions[sid].end_reason is None
        ]
        assert survivors == []
        for tls, _ in opened:
            await receive_eof(tls)
        with trio.fail_after(10):
            await running.relay.wait_no_sessions()
        for sid in opened_ids | held:
            assert session_end_record(config, sid)["reason"] == "revoked"
    running.stop.set()
