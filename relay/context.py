"""What every part of the relay reaches it through: settings, metrics and its own audit trail.

Sessions (:class:`relay.session.SessionContext`) and the watcher
(:class:`relay.watch.WatchContext`) extend it with what else they use; the
admission gate uses it as it is.  :class:`relay.server.Relay` provides all
three, and none of those modules imports :mod:`relay.server`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from config import Config

    from .metrics import Metrics, NilMetrics

__all__ = ["RelayContext"]


class RelayContext(Protocol):
    """The relay's settings, metrics and audit trail."""

    @property
    def config(self) -> Config:
        """The current configuration (swapped as a whole by a reload)."""
        ...

    metrics: Metrics | NilMetrics

    def audit_event(self, event: str, **fields: Any) -> None:
        """Append a record to the relay's own audit file, and log it."""
        ...
