"""Shared paths and helpers for the deploy/ checks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# Metric names in PromQL.  Histogram sample names keep their suffix: they are
# checked against Metrics.metric_names(), which lists _bucket/_sum/_count.
METRIC_NAME = re.compile(r"\bdbgrelay_[a-z_]+\b")


def require_tool(name: str) -> str:
    """Return the path of ``name`` or skip the test, saying what is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed; install it to check the deploy files")
    return path
