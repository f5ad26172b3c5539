"""Linux and other POSIX systems."""

from __future__ import annotations

import signal

#: Ctrl-C at a terminal.
INTERRUPT_SIGNALS: tuple[int, ...] = (signal.SIGINT,)
