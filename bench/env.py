"""What the bench runs with: tools found on PATH and a record of the machine."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Tools", "find_tools", "describe_machine", "REPO_ROOT"]

#: The folder holding the ``bench`` package (the repository root).
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Tools:
    """Programs the bench uses; ``None`` where the program is missing.

    Attributes:
        python: The interpreter for the backend, the client and ``dbgrelay``.
        dbgrelay: The command that runs dbgrelay's CLI.
        stunnel: ``stunnel4`` or ``stunnel``.
        taskset: For pinning latency workloads to one CPU.
        gdb: ``gdb``, ``gdbserver`` and ``gcc`` together, or ``None`` if any is missing.
    """

    python: str
    dbgrelay: tuple[str, ...]
    stunnel: str | None
    taskset: str | None
    gdb: tuple[str, str, str] | None


def find_tools() -> Tools:
    """Look up every program the bench can use."""
    beside = Path(sys.executable).parent / "dbgrelay"
    if beside.exists():
        dbgrelay: tuple[str, ...] = (str(beside),)
    elif shutil.which("dbgrelay"):
        dbgrelay = (shutil.which("dbgrelay"),)
    else:
        dbgrelay = (sys.executable, "-m", "relay")
    gdb, gdbserver, gcc = shutil.which("gdb"), shutil.which("gdbserver"), shutil.which("gcc")
    return Tools(
        python=sys.executable,
        dbgrelay=dbgrelay,
        stunnel=shutil.which("stunnel4") or shutil.which("stunnel"),
        taskset=shutil.which("taskset"),
        gdb=(gdb, gdbserver, gcc) if gdb and gdbserver and gcc else None,
    )


def _first_line(argv: list[str], pattern: str | None = None) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout + done.stderr).splitlines()
    for line in lines:
        if pattern is None or re.search(pattern, line):
            return line.strip()
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def describe_machine(tools: Tools) -> dict:
    """Date, kernel, CPU, and the versions of Python, OpenSSL and the tools."""
    try:
        from cryptography.hazmat.backends.openssl import backend

        crypto_openssl = backend.openssl_version_text()
    except Exception:  # any failure here only loses one informational field
        crypto_openssl = None
    stunnel = None
    stunnel_openssl = None
    if tools.stunnel:
        line = _first_line([tools.stunnel, "-version"], r"^stunnel \d") or ""
        stunnel = " ".join(line.split()[:2]) or None
        line = _first_line([tools.stunnel, "-version"], r"^Running\s+with") or ""
        found = re.search(r"(OpenSSL \S+)", line)
        stunnel_openssl = found.group(1) if found else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "openssl_stdlib": ssl.OPENSSL_VERSION,
        "openssl_cryptography": crypto_openssl,
        "stunnel": stunnel,
        "stunnel_openssl": stunnel_openssl,
        "gdb": _first_line([tools.gdb[0], "--version"]) if tools.gdb else None,
        "dbgrelay_revision": _git_revision(),
    }
