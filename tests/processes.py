"""What the tests need to know about a process from /proc."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["is_gone", "json_of_script"]


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


def json_of_script(script: str, *args: str) -> Any:
    """Run ``script`` in a fresh interpreter and return the JSON of its last output line."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
