"""Windows.

Python turns the console's Ctrl-C event into SIGINT and Ctrl-Break into
SIGBREAK; trio's signal receiver sees both.
"""

from __future__ import annotations

import signal

#: Ctrl-C and Ctrl-Break at a console.
INTERRUPT_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGBREAK)
