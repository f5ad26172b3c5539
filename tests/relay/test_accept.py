"""The accept loop with a fake listener (as in trio's own serve_listeners tests)."""

from __future__ import annotations

import errno
import logging
from functools import partial

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from relay.accept import BACKOFF_MAX, serve_listeners
from relay.metrics import Metrics


class FakeListener(trio.abc.Listener):
    """Fails ``failures`` accepts with ``error``, then hands out ``streams``, then waits."""

    def __init__(self, failures: int, error: int, streams: int) -> None:
        self.failures = failures
        self.error = error
        self.streams = streams
        self.closed = False
        self.accept_times: list[float] = []

    async def accept(self):
        await trio.lowlevel.checkpoint()
        self.accept_times.append(trio.current_time())
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, "simulated")
        if self.streams:
            self.streams -= 1
            return trio.testing.memory_stream_pair()[0]
        await trio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


def sample(metrics: Metrics, name: str, **labels) -> float:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
async def test_resource_errors_back_off_with_one_line_per_episode(autojump_clock, caplog, code):
    caplog.set_level(logging.INFO)
    metrics = Metrics(version="t")
    listener = FakeListener(failures=50, error=code, streams=2)
    handled = []

    async def handler(stream) -> None:
        handled.append(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_listeners, handler, [listener], metrics=metrics))
        while len(handled) < 2:  # noqa: ASYNC110 - the autojump clock makes this instant
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert listener.closed
    name = errno.errorcode[code]
    events = [r for r in caplog.records if r.getMessage().startswith("accept.")]
    assert [r.getMessage() for r in events] == ["accept.exhausted", "accept.recovered"]
    assert all(r.exc_info is None for r in caplog.records)
    assert events[0].errno == name and events[1].errors == 50
    assert sample(metrics, "dbgrelay_accept_errors_total", errno=name) == 50
    assert sample(metrics, "dbgrelay_accept_paused") == 0
    # The waits grow and stop at the cap: no busy loop, no long stall.
    gaps = [b - a for a, b in zip(listener.accept_times, listener.accept_times[1:], strict=False)]
    assert max(gaps) == pytest.approx(BACKOFF_MAX)
    assert gaps[:3] == sorted(gaps[:3]) and gaps[0] < gaps[2]


async def test_other_accept_errors_propagate():
    listener = FakeListener(failures=1, error=errno.EBADF, streams=0)

    async def handler(stream) -> None:
        pass

    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_listeners, handler, [listener])
    assert info.group_contains(OSError, match="simulated", depth=None)
    assert listener.closed
