"""``python -m bench`` end to end: every workload completes, nothing is left running.

These tests never look at the figures: timing on a shared machine is noise.
They check that each selected path finished each workload, and that every
process the bench started (backend, stunnel, dbgrelay, clients, gdbserver and
its inferior) is gone afterwards, including after SIGINT or SIGTERM. Each
bench child inherits a marker in its environment; ``/proc/*/environ`` finds
any that survived.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]
MARKER = "DBGRELAY_BENCH_MARKER"
WORKLOADS = ["pingpong", "bulk", "connect", "handshake", "concurrent", "gdb"]
# Small counts: the point is that every step runs, not how fast.
TINY = [
    "--quick",
    "--roundtrips", "300",
    "--warmup", "0.05",
    "--bulk-mib", "2",
    "--connections", "5",
    "--handshakes", "5",
    "--tunnels", "8",
    "--duration", "0.3",
    "--runs", "1",
    "--stepi", "20",
]  # fmt: skip


def _have_gdb() -> bool:
    return all(shutil.which(tool) for tool in ("gdb", "gdbserver", "gcc"))


def _dbgrelay_cli_exists() -> bool:
    try:
        import relay.cli  # noqa: F401
    except ImportError:
        return False
    return True


def _marked(marker: str) -> list[str]:
    """Command lines of live processes that carry ``marker`` in their environment."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {command}")
    return found


def _survivors(marker: str) -> list[str]:
    # A process SIGKILLed by the bench may take a moment to finish dying; one
    # that was never stopped stays, so poll briefly for the list to empty.
    deadline = time.monotonic() + 5
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _kill(found: list[str]) -> None:
    for line in found:
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc: subprocess.Popen, marker: str, *, timeout: float) -> tuple[str, str, list[str]]:
    """Wait for a bench run: its output, and the marked processes it left (killed)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        left = _survivors(marker)
        _kill(left)
    return stdout, stderr, left


def _bench(args: list[str], marker: str, module: str = "bench", **kwargs) -> subprocess.Popen:
    env = dict(os.environ, **kwargs.pop("env", {}))
    env[MARKER] = marker
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_quick_run_completes_every_workload_and_leaves_no_process(tmp_path):
    paths = ["direct"]
    if shutil.which("stunnel4") or shutil.which("stunnel"):
        paths.append("stunnel")
    if _dbgrelay_cli_exists():
        # trio-bare (named only) is the relay's TLS stream and pump alone.
        paths += ["dbgrelay-stdlib", "dbgrelay-pyopenssl", "trio-bare"]
    workloads = WORKLOADS if _have_gdb() else WORKLOADS[:-1]
    out = tmp_path / "out.json"
    marker = uuid.uuid4().hex
    args = [*TINY, "--paths", ",".join(paths), "--workloads", ",".join(workloads), "--json", str(out)]  # fmt: skip
    proc = _bench(args, marker)
    stdout, stderr, left = _finish(proc, marker, timeout=120)
    assert proc.returncode == 0, stderr
    assert left == [], f"processes left behind: {left}"

    report = json.loads(out.read_text())
    for path in paths:
        assert report["paths"][path]["status"] == "ran", report["paths"][path]
        for workload in workloads:
            record = report["results"][path][workload]
            assert record["status"] == "ok", f"{workload} on {path}: {record}"
            for metric in (m for m in report["metrics"] if m["workload"] == workload):
                value = record["metrics"][metric["key"]]
                if path == "direct" and (
                    metric["key"].endswith("_rss_mib") or metric["key"] == "handshakes_per_s"
                ):
                    assert value is None  # no relay processes, no TLS to measure
                else:
                    assert isinstance(value, float), f"{metric['key']} on {path}: {value!r}"
    if "dbgrelay-pyopenssl" in paths:
        # The pyOpenSSL engine's handshakes are measured with the hybrid group.
        assert report["results"]["dbgrelay-pyopenssl"]["handshake"]["detail"]["group"] == (
            "X25519MLKEM768"
        )
    for key in ("date", "kernel", "cpu_model", "python", "openssl_stdlib"):
        assert report["machine"][key], key
    assert report["pids_started"], "the bench reported no processes"
    # The table names every path and every workload row.
    for path in paths:
        assert path in stdout
    for metric in report["metrics"]:
        assert metric["label"] in stdout


@pytest.mark.parametrize(
    ("signum", "path", "exit_code"),
    [(signal.SIGTERM, "stunnel", 143), (signal.SIGINT, "dbgrelay-stdlib", 130)],
)
def test_signal_mid_run_stops_every_process(tmp_path, signum, path, exit_code):
    if path == "stunnel" and not (shutil.which("stunnel4") or shutil.which("stunnel")):
        pytest.skip("stunnel is not installed")
    if path == "dbgrelay-stdlib" and not _dbgrelay_cli_exists():
        pytest.skip("dbgrelay's CLI is not there")
    marker = uuid.uuid4().hex
    # A concurrent run long enough to be interrupted while relay and client run.
    args = ["--quick", "--paths", path, "--workloads", "concurrent", "--tunnels", "8",
            "--duration", "60", "--runs", "1"]  # fmt: skip
    proc = _bench(args, marker)
    try:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            seen = _marked(marker)
            if any("bench.client" in line for line in seen):
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        else:
            pytest.fail(f"the concurrent client never started; running: {seen}")
        relay_name = "stunnel" if path == "stunnel" else "dbgrelay"
        assert any(relay_name in line for line in seen), seen
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        left = _survivors(marker)
        _kill(left)
    assert proc.returncode == exit_code, stderr
    assert f"interrupted by {signum.name}" in stderr
    assert left == [], f"processes left behind: {left}"


def test_missing_stunnel_is_reported_and_other_paths_still_run(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = tmp_path / "out.json"
    marker = uuid.uuid4().hex
    args = ["--paths", "direct,stunnel", "--workloads", "pingpong", "--roundtrips", "200",
            "--warmup", "0.05", "--json", str(out)]  # fmt: skip
    # With nothing on PATH there is no stunnel (and no taskset, so no pinning).
    proc = _bench(args, marker, env={"PATH": str(empty)})
    stdout, stderr, left = _finish(proc, marker, timeout=60)
    assert proc.returncode == 0, stderr
    assert "stunnel not found: apt-get install stunnel4" in stderr
    assert "taskset not found" in stderr
    report = json.loads(out.read_text())
    assert report["paths"]["stunnel"]["status"] == "skipped"
    assert report["results"]["direct"]["pingpong"]["status"] == "ok"
    assert "stunnel" not in report["results"]
    assert left == []


def test_postgres_and_workers_paths_run_and_leave_no_process(tmp_path):
    from bench.postgres import find_pg_bin

    if not _dbgrelay_cli_exists():
        pytest.skip("dbgrelay's CLI is not there")
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL's server is not installed; run scripts/install-tools")
    paths = ["dbgrelay-stdlib", "dbgrelay-postgres", "dbgrelay-workers2"]
    workloads = ["connect", "concurrent"]
    out = tmp_path / "out.json"
    marker = uuid.uuid4().hex
    args = [*TINY, "--paths", ",".join(paths), "--workloads", ",".join(workloads), "--json", str(out)]  # fmt: skip
    proc = _bench(args, marker)
    stdout, stderr, left = _finish(proc, marker, timeout=120)
    assert proc.returncode == 0, stderr
    # The PostgreSQL server and both workers with their supervisor are gone too.
    assert left == [], f"processes left behind: {left}"
    report = json.loads(out.read_text())
    for path in paths:
        assert report["paths"][path]["status"] == "ran", report["paths"][path]
        for workload in workloads:
            record = report["results"][path][workload]
            assert record["status"] == "ok", f"{workload} on {path}: {record}"
        assert path in stdout
        # Connections to all three took turns: each is compared with the SQLite single process.
        paired = report["results"][path]["connect"]["metrics"]["connect_paired_minus_base_ms"]
        assert isinstance(paired, float) and (paired == 0.0) == (path == "dbgrelay-stdlib")


@pytest.mark.skipif(
    not (shutil.which("stunnel4") or shutil.which("stunnel")) or not shutil.which("taskset"),
    reason="bench.planes compares with stunnel, pinned with taskset",
)
def test_planes_compares_both_hostings_with_stunnel_and_leaves_no_process():
    marker = uuid.uuid4().hex
    proc = _bench(["--rounds", "1", "--count", "200"], marker, module="bench.planes")
    stdout, stderr, left = _finish(proc, marker, timeout=120)
    assert proc.returncode == 0, stderr
    assert left == [], f"processes left behind: {left}"
    for hosting in ("thread", "guest", "stunnel"):
        assert f"{hosting} " in stdout.splitlines()[0]
        assert any(
            line.startswith(f"{hosting} ") and "x stunnel" in line for line in stdout.splitlines()
        )
