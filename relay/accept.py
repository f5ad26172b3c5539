"""The relay's accept loop: trio's ``serve_listeners`` with quiet back-off.

trio's own loop logs every ``EMFILE``/``ENFILE``/``ENOBUFS``/``ENOMEM`` from
``accept()`` with a traceback and retries every 100 ms; under a flood of idle
connections that is a traceback per retry (97 of them in one run with
``ulimit -n 512``).  Running out of descriptors is an expected overload, not a
bug: this loop backs off (10 ms doubling to 1 s, so a freed descriptor is
used quickly and a lasting shortage costs little CPU), logs one
``accept.exhausted`` line when an episode starts and one ``accept.recovered``
line when an accept succeeds again, and counts each failure in
``dbgrelay_accept_errors_total{errno}`` with ``dbgrelay_accept_paused`` set
while it lasts.  Failures within :data:`EPISODE_GAP` of a logged recovery
belong to that episode and log nothing more: a backlog of dead connections
drains through a few flaps of exhaustion, and a flapping relay logs one pair
of lines in that time, not one per flap (the metrics show every flap).
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

from .metrics import Metrics, NilMetrics

__all__ = ["ACCEPT_CAPACITY_ERRNOS", "EPISODE_GAP", "Exhaustion", "serve_listeners"]

log = logging.getLogger("dbgrelay.relay")

#: accept() errors that mean "out of resources, try again later" (the set
#: trio's ``serve_listeners`` treats the same way).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

BACKOFF_MIN = 0.01
BACKOFF_MAX = 1.0

#: Seconds after a logged recovery in which a new failure continues that
#: episode instead of starting (and logging) another.
EPISODE_GAP = 10.0


class Exhaustion:
    """One episode of accept() failing for lack of resources, shared by all listeners.

    Protocol code: told about failures and successes with the time, it says
    when to log and how long to wait.

    Attributes:
        active: Whether accepts are failing now.
        errors: Failures in the current (or last) episode.
        started: When the current (or last) episode started.
    """

    def __init__(self) -> None:
        self.active = False
        self.errors = 0
        self.started = 0.0
        self._backoff = BACKOFF_MIN
        # When the last episode's recovery was logged, or None while one is open.
        self._recovered: float | None = -math.inf

    def failed(self, now: float) -> tuple[bool, float]:
        """Record a failure.

        Returns:
            Whether this starts an episode (log it), and seconds to wait.
        """
        starts = False
        if not self.active:
            self.active = True
            self._backoff = BACKOFF_MIN
            if self._recovered is not None and now - self._recovered >= EPISODE_GAP:
                starts, self._recovered = True, None
                self.errors, self.started = 0, now
        self.errors += 1
        wait = self._backoff
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        return starts, wait

    def succeeded(self, now: float) -> bool:
        """Record a successful accept; return whether it ends an episode (log it).

        Accepts that end a flap within :data:`EPISODE_GAP` of the logged
        recovery end nothing new: that episode's recovery was logged.
        """
        if not self.active:
            return False
        self.active = False
        if self._recovered is not None:
            return False
        self._recovered = now
        return True


async def _run_handler(stream: trio.SocketStream, handler: Callable[..., Awaitable[None]]) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_one_listener(
    listener: trio.SocketListener,
    handler_nursery: trio.Nursery,
    handler: Callable[..., Awaitable[None]],
    exhaustion: Exhaustion,
    metrics: Metrics | NilMetrics,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                name = errno.errorcode.get(exc.errno, str(exc.errno))
                metrics.accept_error(name)
                if not exhaustion.active:
                    metrics.accept_paused(True)
                starts, wait = exhaustion.failed(trio.current_time())
                if starts:
                    log.warning(
                        "accept.exhausted",
                        extra={
                            "errno": name,
                            "error": os.strerror(exc.errno),
                            "address": _address(listener),
                            "note": "new connections wait until descriptors or memory free up",
                        },
                    )
                await trio.sleep(wait)
                continue
            if exhaustion.active:
                metrics.accept_paused(False)
            if exhaustion.succeeded(trio.current_time()):
                log.info(
                    "accept.recovered",
                    extra={
                        "errors": exhaustion.errors,
                        "paused": round(trio.current_time() - exhaustion.started, 3),
                    },
                )
            handler_nursery.start_soon(_run_handler, stream, handler)


def _address(listener: trio.abc.Listener) -> str:
    sock = getattr(listener, "socket", None)
    try:
        host, port = sock.getsockname()[:2]
    except (AttributeError, OSError, ValueError):
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_listeners(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    listeners: Sequence[trio.SocketListener],
    *,
    handler_nursery: trio.Nursery | None = None,
    metrics: Metrics | NilMetrics | None = None,
    task_status: trio.TaskStatus[Sequence[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on every listener and run ``handler`` for each, forever.

    Same contract as :func:`trio.serve_listeners`: each connection runs
    ``handler(stream)`` in ``handler_nursery`` (default: a nursery of this
    call) and the stream is closed forcefully when the handler returns;
    an accept error other than the resource errors above propagates.

    Resource handling:
        Closes every listener when cancelled or on error.
    """
    metrics = metrics if metrics is not None else NilMetrics()
    exhaustion = Exhaustion()
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(
                _serve_one_listener,
                listener,
                handler_nursery or nursery,
                handler,
                exhaustion,
                metrics,
            )
        task_status.started(listeners)
