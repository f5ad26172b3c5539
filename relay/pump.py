"""Move bytes both ways between a client stream and a backend stream.

The pump knows nothing about tokens or audit: it copies, counts and reports
why it stopped.  Everything that ends a tunnel from outside (idle timeout,
maximum session length, revocation, shutdown) is a cancel scope owned by the
session around the pump.  The logic is the state machine in
:mod:`relay.datapath.pump`; :func:`run_pump` is its trio driver
(:mod:`relay.datapath.trio_driver`), the one production and the tests run.
"""

from __future__ import annotations

from .datapath.pump import PumpResult, Tap, Traffic
from .datapath.trio_driver import run_pump

__all__ = ["PumpResult", "Tap", "Traffic", "run_pump"]
