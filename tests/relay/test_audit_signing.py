"""When the relay signs its audit files, on trio's mock clock.

A record after the last signature is covered by the hash chain only, and a
file cut there still verifies as a chain.  So the relay signs each file at
most ``checkpoint_interval`` after any record (and a record itself once the
last signature is that old), and at every session end.  These tests run a
relay with in-memory client and backend streams under the autojump clock,
make records at irregular times and check the times in the files.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import trio

from relay.audit import verify_file
from relay.server import open_relay

from .test_session_time import Harness, wall

INTERVAL = 5.0
# Irregular gaps (seconds) between bursts of activity: shorter, equal to and
# longer than the interval, and several inside one interval.
GAPS = [0.3, 1.7, 4.9, 0.1, 7.3, 2.2, 11.0, 0.05, 5.0, 3.3, 9.9, 0.7, 0.7, 0.7]


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def moment(record: dict) -> datetime:
    return datetime.fromisoformat(record.get("time") or record["created"])


def unsigned_spans(records: list[dict], now: datetime) -> list[tuple[float, float]]:
    """For each unsigned record: (seconds since the signature or header before it,
    seconds until the next signature, or until ``now`` for the unsigned tail)."""
    spans = []
    last_signed = moment(records[0])
    for i, record in enumerate(records[1:], start=1):
        if "sig" in record:
            last_signed = moment(record)
            continue
        later = next((moment(r) for r in records[i + 1 :] if "sig" in r), now)
        spans.append(
            (
                (moment(record) - last_signed).total_seconds(),
                (later - moment(record)).total_seconds(),
            )
        )
    return spans


async def test_no_record_stays_unsigned_longer_than_checkpoint_interval(
    autojump_clock, make_config, pki, nursery, token_for
):
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
            }
        ],
        checkpoint_interval=f"{INTERVAL}s",
    )
    relay = open_relay(config, wall_clock=wall)
    harness = Harness(relay, nursery, pki / "ca.pem")
    nursery.start_soon(relay.run_housekeeping)
    tls, event = await harness.connect(token_for(now=wall()))
    session_id = event.headers["dbgrelay-session"]

    for n, gap in enumerate(GAPS):
        await trio.sleep(gap)
        relay.audit_event("test.activity", n=n)
        await tls.send_all(b"x")
        assert await tls.receive_some(10) == b"x"
    await trio.sleep(2.5)  # leave the last burst unsigned for a while

    # The files of a live tunnel, as a crash would leave them right now.
    now = datetime.fromtimestamp(wall(), UTC)
    (relay_file,) = config.relay.audit_dir.glob("relay-*.jsonl")
    (session_file,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    relay_records = records_of(relay_file)
    assert [r.get("event") for r in relay_records].count("test.activity") == len(GAPS)
    assert sum("sig" in r for r in relay_records) >= 5  # signed all along, not only at the end
    for path in (relay_file, session_file):
        spans = unsigned_spans(records_of(path), now)
        assert spans, path
        for since_signature, until_signature in spans:
            assert since_signature < INTERVAL
            assert until_signature <= INTERVAL
        assert verify_file(path, pubkey=relay.audit_key.public_key(), allow_unsigned_tail=True).ok

    await tls.aclose()
    with trio.fail_after(60):
        await relay.wait_no_sessions()
    for path in (relay_file, session_file):
        report = verify_file(path, pubkey=relay.audit_key.public_key())
        assert report.ok and report.signed, report.problems
    relay.close()


async def test_a_session_end_signs_its_file_and_the_relay_file_at_once(
    autojump_clock, make_config, pki, nursery, token_for
):
    # No scheduled checkpoint within the test: only the session's end signs.
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
            }
        ],
        checkpoint_interval="1h",
    )
    relay = open_relay(config, wall_clock=wall)
    harness = Harness(relay, nursery, pki / "ca.pem")
    nursery.start_soon(relay.run_housekeeping)
    tls, event = await harness.connect(token_for(now=wall()))
    session_id = event.headers["dbgrelay-session"]
    await trio.sleep(60)
    (relay_file,) = config.relay.audit_dir.glob("relay-*.jsonl")
    (session_file,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    assert "sig" not in records_of(relay_file)[-1]  # token.accepted, unsigned so far

    await tls.aclose()
    with trio.fail_after(60):
        await relay.wait_no_sessions()

    closed = records_of(session_file)[-1]
    last = records_of(relay_file)[-1]
    assert closed["event"] == "session.closed" and "sig" in closed
    assert last["event"] == "audit.checkpoint" and "sig" in last
    assert last["time"] == closed["time"]
    for path in (relay_file, session_file):
        report = verify_file(path, pubkey=relay.audit_key.public_key())
        assert report.ok and report.signed, report.problems
    relay.close()


async def test_a_quiet_relay_writes_no_checkpoints(
    autojump_clock, make_config, pki, nursery, token_for
):
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
            }
        ],
        checkpoint_interval=f"{INTERVAL}s",
    )
    relay = open_relay(config, wall_clock=wall)
    nursery.start_soon(relay.run_housekeeping)
    relay.audit_event("test.activity", n=0)
    await trio.sleep(3600)

    (relay_file,) = config.relay.audit_dir.glob("relay-*.jsonl")
    events = [r.get("event") for r in records_of(relay_file)]
    # One checkpoint for the one record, none for the quiet hour after it.
    assert events == [None, "test.activity", "audit.checkpoint"]
    relay.close()


async def test_a_checkpoint_skips_a_session_whose_end_record_is_written_before_it_leaves(
    autojump_clock, make_config, pki, nursery, token_for
):
    # A session's end record is written, then an await (its fsync) passes before
    # it leaves relay.sessions: a checkpoint in that window must pass it by,
    # not crash the relay on "nothing may follow session.closed".
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
            }
        ],
        checkpoint_interval=f"{INTERVAL}s",
    )
    relay = open_relay(config, wall_clock=wall)
    harness = Harness(relay, nursery, pki / "ca.pem")
    tls, event = await harness.connect(token_for(now=wall()))
    session = relay.sessions[event.headers["dbgrelay-session"]]
    assert session.audit is not None
    session.audit.close_session(reason="test")
    assert session.audit.ended

    async with trio.open_nursery() as housekeeping:
        housekeeping.start_soon(relay.run_housekeeping)
        await trio.sleep(3 * INTERVAL)  # several checkpoint ticks
        housekeeping.cancel_scope.cancel()

    (relay_file,) = config.relay.audit_dir.glob("relay-*.jsonl")
    assert records_of(relay_file)[-1]["event"] == "audit.checkpoint"
    await tls.aclose()
    relay.close()
