"""What differs between operating systems on the relay's side, behind one small interface.

One module per platform, picked once here (the way trio splits
``_io_epoll.py`` and ``_io_windows.py``); the rest of the relay imports these
names and never asks which system it runs on.  (Secret files are the
``auth`` package's: it restricts them to their owner with a mode or a DACL.)

* :data:`INTERRUPT_SIGNALS`: the signals that mean "the person at the
  console wants this command to stop" (SIGINT; on Windows also Ctrl-Break,
  which Python delivers as SIGBREAK).
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    from ._windows import INTERRUPT_SIGNALS
else:
    from ._posix import INTERRUPT_SIGNALS

__all__ = ["INTERRUPT_SIGNALS"]
