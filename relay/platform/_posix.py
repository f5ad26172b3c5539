"""Linux and other POSIX systems."""

from __future__ import annotations

import signal
from collections.abc import Callable

import trio

#: Ctrl-C at a terminal.
INTERRUPT_SIGNALS: tuple[int, ...] = (signal.SIGINT,)

#: systemd's stop (SIGTERM) and Ctrl-C.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)


def reload_event_name(pid: int) -> None:
    """POSIX reloads on SIGHUP; there is no named event."""
    return None


async def run_reload_trigger(
    reload: Callable[[str], object],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``reload(actor)`` on every SIGHUP, until cancelled.

    ``task_status`` receives a description of the trigger (``"SIGHUP"``).
    """
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started("SIGHUP")
        async for _signum in signals:
            reload("signal:SIGHUP")
