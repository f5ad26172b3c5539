"""Benchmark harness: direct, stunnel and dbgrelay side by side on 127.0.0.1.

``python -m bench`` (or ``bench/run``) starts a plaintext backend and, for each
path, the relay processes; a separate client process drives ping-pong, bulk,
connect, concurrent and gdb workloads, and the table shows each figure next to
its ratio to stunnel's. The bench is plain synchronous code: it only starts
processes and waits for them.
"""

from .cli import ALL_PATHS, main
from .workloads import WORKLOADS, Settings

__all__ = ["main", "ALL_PATHS", "WORKLOADS", "Settings"]
