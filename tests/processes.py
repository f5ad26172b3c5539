"""What the tests need to know about a process from /proc."""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_gone"]


def is_gone(pid: int) -> bool:
    """The process no longer exists (reaped, or a zombie waiting to be).

    The process may vanish between opening its ``stat`` file and reading it;
    the read then fails with ESRCH (ProcessLookupError), which is gone too.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rfind(")") + 2] == "Z"
