"""Move bytes both ways between a client stream and a backend stream.

The pump knows nothing about tokens or audit: it copies, counts and reports
why it stopped.  Everything that ends a tunnel from outside (idle timeout,
maximum session length, revocation, shutdown) is a cancel scope owned by the
session around the pump.  The logic is the state machine in
:mod:`relay.datapath.pump`; :func:`run_pump` is its trio driver
(:mod:`relay.datapath.trio_driver`), portable and run by every test on a
mock clock; the data-plane thread (:mod:`relay.datapath.thread_driver`) is
the fast driver for established tunnels where the platform has ``epoll``.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import trio

from .datapath.pump import PumpResult, Tap, Traffic
from .datapath.trio_driver import run_pump

__all__ = ["PumpResult", "Tap", "Traffic", "driver_for", "run_pump"]


def driver_for(data_plane: str) -> Callable[..., Awaitable[PumpResult]]:
    """The pump driver ``data_plane`` names, with :func:`run_pump`'s contract.

    ``"trio"`` is :func:`run_pump`; ``"thread"`` hands established tunnels to
    the process's data-plane thread (:mod:`relay.datapath.thread_driver`),
    which falls back to :func:`run_pump` where it cannot take them.
    ``"auto"`` is the thread when it can serve this run: the platform has
    ``epoll`` and trio runs on its own clock.  The thread measures idle time
    with ``time.monotonic``, which is that clock; under another one (a mock
    clock that jumps) idle deadlines must follow trio, so the trio driver
    moves the bytes.  Call from inside a trio run.
    """
    if data_plane == "auto":
        from .datapath.thread_driver import DataPlane

        # A mock clock comes from trio.testing: if that is not loaded, trio
        # runs on its own clock.
        testing = sys.modules.get("trio.testing")
        mocked = testing is not None and isinstance(
            trio.lowlevel.current_clock(), testing.MockClock
        )
        data_plane = "thread" if DataPlane.available() and not mocked else "trio"
    if data_plane == "thread":
        from .datapath.thread_driver import shared_plane

        return shared_plane().run_pump
    return run_pump
