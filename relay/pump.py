"""Move bytes both ways between a client stream and a backend stream.

The pump knows nothing about tokens or audit: it copies, counts and reports
why it stopped.  Everything that ends a tunnel from outside (idle timeout,
maximum session length, revocation, shutdown) is a cancel scope owned by the
session around the pump.  The logic is the state machine in
:mod:`relay.datapath.pump`; :func:`run_pump` is its trio driver
(:mod:`relay.datapath.trio_driver`), which the tests run and production runs
by default; ``relay.data_plane = "thread"`` picks the fast driver instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .datapath.pump import PumpResult, Tap, Traffic
from .datapath.trio_driver import run_pump

__all__ = ["PumpResult", "Tap", "Traffic", "driver_for", "run_pump"]


def driver_for(data_plane: str) -> Callable[..., Awaitable[PumpResult]]:
    """The pump driver ``relay.data_plane`` names, with :func:`run_pump`'s contract.

    ``"trio"`` is :func:`run_pump`; ``"thread"`` hands established tunnels to
    the process's data-plane thread (:mod:`relay.datapath.thread_driver`),
    which falls back to :func:`run_pump` where it cannot take them.
    """
    if data_plane == "thread":
        from .datapath.thread_driver import shared_plane

        return shared_plane().run_pump
    return run_pump
