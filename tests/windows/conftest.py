"""The Windows tier: the official Windows CPython, under Wine, against native Linux peers.

``scripts/wine-tier`` builds the Windows Python (cached in ``.wine-tier/``,
rebuilt when its inputs change) with this checkout on its ``sys.path``, so
these tests run the working tree's code as Windows runs it.  The tests skip,
saying why, only when wine or mingw-w64 is not installed (scripts/install-tools
installs them).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..e2e.conftest import (  # noqa: F401 - fixtures the Windows tests use too
    gdb_tools,
    home,
    materials,
    procs,
)
from ..e2e.support import Proc, ProcGroup, clean_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "wine-tier"


def _load_script():
    loader = importlib.machinery.SourceFileLoader("wine_tier", str(SCRIPT))
    spec = importlib.util.spec_from_loader("wine_tier", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@dataclass(frozen=True, slots=True)
class WineTier:
    """How to run the Windows Python under Wine.

    Attributes:
        python: ``python.exe`` of the embeddable CPython the tier built.
        wine: The command that runs a Windows program (``wine``, with the
            address-space randomisation off that Wine 8 needs here; see
            ``windows_command`` in ``scripts/wine-tier``).
    """

    python: Path
    wine: tuple[str, ...]
    _script: object

    def env(self, cwd: Path) -> dict[str, str]:
        """A clean environment for a Windows process started in ``cwd``."""
        env = self._script.wine_env()
        return (
            clean_env(cwd) | {k: env[k] for k in env if k.startswith("WINE")} | {"PYTHONUTF8": "1"}
        )

    def argv(self, *args: str | os.PathLike[str]) -> list[str]:
        return [*self.wine, str(self.python), *map(str, args)]

    def start(self, group: ProcGroup, *args: str | os.PathLike[str], cwd: Path, name: str) -> Proc:
        """Start the Windows Python with ``args`` (stdio piped, as it needs)."""
        self._script.start_wineserver()
        return group.start(self.argv(*args), cwd=cwd, name=name, env=self.env(cwd))

    def dbgrelay(
        self, group: ProcGroup, *args: str | os.PathLike[str], cwd: Path, name: str
    ) -> Proc:
        """Start ``dbgrelay ARGS`` on Windows."""
        return self.start(group, "-m", "relay", *args, cwd=cwd, name=name)

    def run(
        self, *args: str | os.PathLike[str], cwd: Path, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the Windows Python to completion and capture its output."""
        self._script.start_wineserver()
        return subprocess.run(
            self.argv(*args),
            cwd=cwd,
            env=self.env(cwd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def wine_tier() -> Iterator[WineTier]:
    """The built tier; skips only when wine or mingw-w64 is not installed.

    Resource handling:
        The tier's wineserver (and any Windows process left in its prefix)
        is ended when the test session ends.
    """
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode == 3:
        pytest.skip(f"Windows tier needs Wine: {done.stderr.strip()}")
    assert done.returncode == 0, f"scripts/wine-tier failed:\n{done.stdout}{done.stderr}"
    script = _load_script()
    try:
        yield WineTier(
            python=Path(done.stdout.strip().splitlines()[-1]),
            wine=tuple(script.windows_command("wine")),
            _script=script,
        )
    finally:
        script.stop_wineserver()
