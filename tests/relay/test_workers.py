"""How many workers ``serve`` runs by default (relay/workers.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import relay.workers as workers


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", 4), ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000", 1)],
)
def test_a_cgroup_cpu_quota_narrows_the_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert workers.cpus_available(tmp_path / "cpu.max") == expected
    # No cgroup v2 file: the affinity mask alone.
    assert workers.cpus_available(tmp_path / "missing") == 4


def test_auto_is_one_per_cpu_on_a_fixed_port_and_one_process_on_port_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only relay.listen matters here.
    config = SimpleNamespace(relay=SimpleNamespace(listen=(("127.0.0.1", 0),)))
    fixed = SimpleNamespace(relay=SimpleNamespace(listen=(("127.0.0.1", 7443),)))
    monkeypatch.setattr(workers, "cpus_available", lambda: 3)
    monkeypatch.setattr(workers, "reuseport_available", lambda: True)

    assert workers.auto_workers(fixed) == (3, None)
    count, why = workers.auto_workers(config)
    assert count == 1 and why is not None and why.startswith("relay.listen has port 0")
    monkeypatch.setattr(workers, "reuseport_available", lambda: False)
    assert workers.auto_workers(fixed) == (1, "this platform has no SO_REUSEPORT")
    monkeypatch.setattr(workers, "cpus_available", lambda: 1)
    assert workers.auto_workers(fixed) == (1, None)


def test_log_lines_name_the_worker_and_keep_a_pid_the_event_carries():
    add = workers.log_filter(1, 4242)
    plain = logging.LogRecord(
        "dbgrelay.relay", logging.INFO, __file__, 1, "relay.listening", (), None
    )
    launched = logging.LogRecord(
        "dbgrelay.relay", logging.INFO, __file__, 1, "server.launched", (), None
    )
    launched.pid = 77  # as extra={"pid": ...} sets it
    assert add(plain) and add(launched)
    assert (plain.worker, plain.pid) == (1, 4242)
    assert (launched.worker, launched.pid) == (1, 77)
