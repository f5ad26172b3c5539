"""What differs between operating systems on the relay's side, behind one small interface.

One module per platform, picked once here (the way trio splits
``_io_epoll.py`` and ``_io_windows.py``); the rest of the relay imports these
names and never asks which system it runs on.  (Secret files are the
``auth`` package's: it restricts them to their owner with a mode or a DACL.)

* :data:`INTERRUPT_SIGNALS`: the signals that mean "the person at the
  console wants this command to stop" (SIGINT; on Windows also Ctrl-Break,
  which Python delivers as SIGBREAK).
* :data:`STOP_SIGNALS`: the signals that start the relay's drain (SIGTERM
  and SIGINT; on Windows Ctrl-C and Ctrl-Break: a service stop arrives
  through the service framework instead, see :mod:`relay.winservice`).
* :func:`run_reload_trigger`: the operating system's own way to ask a
  running relay to reload (SIGHUP; on Windows a named event, since Windows
  has no SIGHUP).
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    from ._windows import (
        INTERRUPT_SIGNALS,
        STOP_SIGNALS,
        reload_event_name,
        run_reload_trigger,
    )
else:
    from ._posix import (
        INTERRUPT_SIGNALS,
        STOP_SIGNALS,
        reload_event_name,
        run_reload_trigger,
    )

__all__ = [
    "INTERRUPT_SIGNALS",
    "STOP_SIGNALS",
    "reload_event_name",
    "run_reload_trigger",
]
