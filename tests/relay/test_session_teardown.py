"""A tunnel's teardown: every step runs, whatever the one before it raised.

Each test breaks one teardown step (the bytes file cannot be finished, the
end record cannot be fsync'd, the backend's close raises, a metrics update
raises) and checks what must hold anyway: no ``session.crashed``, exactly one
end record attempted and logged, the session's files closed, the
``dbgrelay_sessions_active`` gauge back to 0 and the client's connection
closed.  The relay runs with in-memory client and backend streams on trio's
mock clock (see ``test_session_time``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import trio

from relay.audit import AuditWriteError, AuditWriter, ByteRecorder
from relay.metrics import Metrics
from relay.server import open_relay

from .conftest import session_files
from .test_metrics import value
from .test_session_time import Harness, wall


def open_fds_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


class BrokenClose(trio.abc.Stream):
    """A backend stream whose close raises something no one expects (a bug)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
        raise RuntimeError("backend close exploded")


def break_step(
    step: str, monkeypatch: pytest.MonkeyPatch, harness: Harness, armed: list[bool]
) -> None:
    """Make ``step`` fail once ``armed[0]`` is set (after the tunnel is up)."""
    if step == "recording_close":
        original = ByteRecorder.close

        def close(self):
            original(self)  # the file is closed, as a real ENOSPC leaves it
            raise AuditWriteError("cannot write audit file x.bytes.jsonl: No space left on device")

        monkeypatch.setattr(ByteRecorder, "close", close)
    elif step == "audit_sync":
        original_sync = AuditWriter.sync

        def sync(self):
            if armed[0]:
                raise AuditWriteError("cannot fsync audit file x.jsonl: No space left on device")
            original_sync(self)

        monkeypatch.setattr(AuditWriter, "sync", sync)
    elif step == "backend_close":
        opener = harness._open_backend

        async def open_backend(backend, *, connect_timeout):
            return BrokenClose(await opener(backend, connect_timeout=connect_timeout))

        harness.relay.open_backend = open_backend
    elif step == "metrics_bytes":

        def flush_bytes(session):
            raise RuntimeError("metrics exploded")

        monkeypatch.setattr(harness.relay, "flush_bytes", flush_bytes)
    else:  # pragma: no cover
        raise AssertionError(step)


@pytest.mark.parametrize("engine", ["stdlib"])
@pytest.mark.parametrize(
    ("step", "event"),
    [
        ("recording_close", "audit.unwritable"),
        ("audit_sync", "audit.unwritable"),
        ("backend_close", "session.teardown_failed"),
        ("metrics_bytes", "session.teardown_failed"),
    ],
)
async def test_a_failing_teardown_step_does_not_stop_the_others(
    autojump_clock, make_config, pki, nursery, token_for, monkeypatch, caplog, step, event
):
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
                "record": True,
            }
        ]
    )
    metrics = Metrics(version="test", targets=["build42"])
    relay = open_relay(config, metrics=metrics, wall_clock=wall)
    harness = Harness(relay, nursery, pki / "ca.pem")
    armed = [False]
    break_step(step, monkeypatch, harness, armed)
    caplog.set_level(logging.INFO)

    tls, response = await harness.connect(token_for(now=wall()))
    session_id = response.headers["dbgrelay-session"]
    await tls.send_all(b"$g#67")
    assert await tls.receive_some(10) == b"$g#67"
    assert value(metrics, "dbgrelay_sessions_active", target="build42") == 1
    armed[0] = True
    await tls.aclose()
    with trio.fail_after(60):
        await relay.wait_no_sessions()

    messages = [r.getMessage() for r in caplog.records]
    assert "session.crashed" not in messages
    closed = [r for r in caplog.records if r.getMessage() == "session.closed"]
    assert len(closed) == 1 and closed[0].session_id == session_id
    failed = [r for r in caplog.records if r.getMessage() == event]
    assert [r.step for r in failed] == [step]
    assert value(metrics, "dbgrelay_sessions_active", target="build42") == 0
    assert value(metrics, "dbgrelay_sessions_total", target="build42", outcome="client_closed") == 1
    (session_file,) = config.relay.audit_dir.glob(f"*/{session_id}.jsonl")
    records = [json.loads(line) for line in session_file.read_text().splitlines()]
    assert [r.get("event") for r in records].count("session.closed") == 1
    if step == "recording_close":
        assert "No space left on device" in records[-1]["bytes_error"]
    assert not [p for p in open_fds_under(config.relay.audit_dir) if session_id in p]
    relay.close()


async def test_teardown_order_end_record_on_disk_before_the_client_sees_the_end(
    autojump_clock, make_config, pki, nursery, token_for, monkeypatch
):
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
                "record": True,
            }
        ]
    )
    relay = open_relay(config, wall_clock=wall)
    harness = Harness(relay, nursery, pki / "ca.pem")
    steps: list[str] = []

    def spy(cls, name: str, label: str) -> None:
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if label != "audit.sync" or self.kind == "session":
                steps.append(label)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    spy(ByteRecorder, "close", "bytes.close")
    spy(AuditWriter, "close_session", "audit.end_record")
    spy(AuditWriter, "sync", "audit.sync")
    original_checkpoint = relay.checkpoint_relay_audit
    monkeypatch.setattr(
        relay,
        "checkpoint_relay_audit",
        lambda: (steps.append("relay.checkpoint"), original_checkpoint())[1],
    )

    tls, _ = await harness.connect(token_for(now=wall()))
    await tls.send_all(b"x")
    assert await tls.receive_some(10) == b"x"
    steps.clear()
    await tls.aclose()
    with trio.fail_after(60):
        await relay.wait_no_sessions()

    assert steps == ["bytes.close", "audit.end_record", "audit.sync", "relay.checkpoint"]
    relay.close()


async def test_a_bytes_file_that_cannot_be_created_refuses_the_tunnel_with_503(
    autojump_clock, make_config, pki, nursery, token_for, monkeypatch, caplog
):
    config = make_config(
        [
            {
                "name": "build42",
                "kind": "dbgsrv",
                "backend": "tcp://127.0.0.1:9",
                "probe_interval": "0",
                "record": True,
            }
        ]
    )
    metrics = Metrics(version="test", targets=["build42"])
    relay = open_relay(config, metrics=metrics, wall_clock=wall)
    harness = Harness(relay, nursery, pki / "ca.pem")

    def create(*args, **kwargs):
        raise AuditWriteError("cannot create audit file x.bytes.jsonl: No space left on device")

    monkeypatch.setattr(ByteRecorder, "create", create)
    caplog.set_level(logging.INFO)

    tls, response = await harness.connect(token_for(now=wall()))
    with trio.fail_after(60):
        await relay.wait_no_sessions()

    assert (response.status, response.reason) == (503, "audit_unavailable")
    assert "session.crashed" not in [r.getMessage() for r in caplog.records]
    (session_file,) = session_files(config.relay.audit_dir)
    records = [json.loads(line) for line in session_file.read_text().splitlines()]
    assert records[-1]["event"] == "session.closed" and records[-1]["reason"] == "audit_failed"
    assert records[-1]["bytes_to_backend"] == 0
    assert value(metrics, "dbgrelay_sessions_active", target="build42") == 0
    relay.close()
