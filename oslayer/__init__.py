"""What differs between operating systems, behind one small interface.

One module per platform, picked once here (the way trio splits
``_io_epoll.py`` and ``_io_windows.py``); the rest of the code imports these
names and never asks which system it runs on.  A leaf package: ``relay``,
``auth`` and ``config`` may all use it, and it imports none of them.

* :data:`INTERRUPT_SIGNALS`: the signals that mean "the person at the
  console wants this command to stop" (SIGINT; on Windows also Ctrl-Break,
  which Python delivers as SIGBREAK).
* :func:`restrict_to_owner`: make a file readable and writable by its owner
  only (mode 0600 on POSIX; on Windows a protected DACL with one entry, for
  the owner).
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    from ._windows import INTERRUPT_SIGNALS, restrict_to_owner
else:
    from ._posix import INTERRUPT_SIGNALS, restrict_to_owner

__all__ = ["INTERRUPT_SIGNALS", "restrict_to_owner"]
