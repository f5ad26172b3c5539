"""Fixtures for end-to-end tests: real keys and certificates made by the CLI,
a compiled debuggee, and children that are always stopped on teardown."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .. import accounts
from .support import ProcGroup, copy_materials, run_cli

DATA = Path(__file__).with_name("data")


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    """Start children with ``procs.start(...)``/``procs.dbgrelay(...)``; all are stopped after the test."""
    group = ProcGroup()
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(scope="session")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``keys/`` and ``pki/`` made once by ``dbgrelay keys init`` and ``certs init``."""
    out = tmp_path_factory.mktemp("materials")
    for args in (
        ("keys", "init", "--out", "keys"),
        ("certs", "init", "--out", "pki", "--host", "127.0.0.1", "--host", "localhost"),
    ):
        done = run_cli(*args, cwd=out)
        assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def home(tmp_path: Path, materials: Path) -> Path:
    """A relay folder holding its own copy of the keys and certificates."""
    copy_materials(materials, tmp_path)
    return tmp_path


@dataclass(frozen=True, slots=True)
class GdbTools:
    """Paths of the debugger tools and of the compiled debuggee."""

    gdb: str
    gdbserver: str
    prog: Path


@pytest.fixture(scope="session")
def gdb_tools() -> Iterator[GdbTools]:
    """gdb, gdbserver and ``data/prog.c`` built with ``gcc -g -O0``; skips if a tool is missing.

    The program sits in a 0755 folder outside pytest's private temporary
    folder: managed servers run as the target account and must read it.
    """
    found = {name: shutil.which(name) for name in ("gdb", "gdbserver", "gcc")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} installed to debug a real program")
    out = accounts.shared_dir()
    prog = out / "prog"
    subprocess.run(
        [found["gcc"], "-g", "-O0", "-o", str(prog), str(DATA / "prog.c")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    yield GdbTools(gdb=found["gdb"], gdbserver=found["gdbserver"], prog=prog)
    accounts.rmtree(out)
