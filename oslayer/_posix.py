"""Linux and other POSIX systems."""

from __future__ import annotations

import os
import signal

#: Ctrl-C at a terminal.
INTERRUPT_SIGNALS: tuple[int, ...] = (signal.SIGINT,)


def restrict_to_owner(path: str | os.PathLike[str]) -> None:
    """Give ``path`` mode 0600: read and write for its owner, nothing for others.

    Raises:
        OSError: the mode cannot be set.
    """
    os.chmod(path, 0o600)
