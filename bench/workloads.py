"""The five workloads, each run against one deployed path.

Latency workloads (ping-pong, connect, gdb) pin every process involved (the
backend, the relay processes, the client, gdb and gdbserver) to one CPU: on a
small VM, waking a process on the other CPU costs tens of microseconds and
drowns the difference between relays. Throughput workloads (bulk, concurrent)
run unpinned, several times, and report the best run.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .procs import (
    BenchError,
    Child,
    Supervisor,
    accepted_connections,
    free_port,
    group_pids,
    read_rss,
)

__all__ = [
    "Settings",
    "Metric",
    "Context",
    "WORKLOADS",
    "LATENCY_WORKLOADS",
    "CONNECT_BASE",
    "metrics_for",
    "run_connect",
    "run_workload",
]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """Counts and sizes for one run.

    Attributes:
        roundtrips: Ping-pong round trips per message size.
        sizes: Ping-pong message sizes in bytes.
        bulk_bytes: Bytes sent one way in each bulk run.
        connections: Sequential connections in the connect workload.
        handshakes: Sequential TLS handshakes in the handshake workload.
        tunnels: Concurrency levels of the concurrent workload.
        duration: Measured seconds of each concurrent run.
        stepi: Instructions gdb steps.
        throughput_runs: Runs of each throughput measurement (the best is reported).
        gdb_runs: Runs of the gdb workload (the median is reported).
        pin_cpu: The CPU latency workloads are pinned to.
        warmup: Unmeasured ping-pong seconds before each measured series.
    """

    roundtrips: int = 20_000
    sizes: tuple[int, ...] = (64, 1024)
    bulk_bytes: int = 256 * MIB
    connections: int = 200
    handshakes: int = 500
    tunnels: tuple[int, ...] = (100, 1000)
    duration: float = 5.0
    stepi: int = 2000
    throughput_runs: int = 2
    gdb_runs: int = 3
    pin_cpu: int = 0
    warmup: float = 1.0


QUICK = Settings(
    roundtrips=2000,
    bulk_bytes=16 * MIB,
    connections=20,
    handshakes=50,
    tunnels=(50,),
    duration=1.0,
    stepi=200,
    throughput_runs=2,
    gdb_runs=1,
    warmup=0.5,
)


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the table.

    Attributes:
        workload: The workload that produces it.
        key: Its name in the JSON.
        label: Its name in the table.
        unit: Unit of the value.
        better: ``"lower"`` or ``"higher"``.
        to_stunnel: Whether a ratio to stunnel's value means something (not
            for a difference between two dbgrelay paths).
    """

    workload: str
    key: str
    label: str
    unit: str
    better: str
    to_stunnel: bool = True


def metrics_for(workload: str, settings: Settings) -> list[Metric]:
    """The table rows ``workload`` produces under ``settings``."""
    if workload == "pingpong":
        rows = []
        for size in settings.sizes:
            rows.append(Metric(workload, f"pingpong_{size}B_median_us", f"ping-pong {size} B median", "us", "lower"))  # fmt: skip
            rows.append(Metric(workload, f"pingpong_{size}B_p99_us", f"ping-pong {size} B p99", "us", "lower"))  # fmt: skip
        return rows
    if workload == "bulk":
        mib = settings.bulk_bytes // MIB
        return [
            Metric(workload, "bulk_sink_mb_s", f"bulk {mib} MiB to sink", "MB/s", "higher"),
            Metric(workload, "bulk_echo_mb_s", f"bulk {mib} MiB echoed", "MB/s", "higher"),
        ]
    if workload == "connect":
        n = settings.connections
        return [
            Metric(workload, "connect_median_ms", f"connect+1st RT x{n} median", "ms", "lower"),
            Metric(
                workload,
                "connect_paired_minus_base_ms",
                f"connect+1st RT minus {CONNECT_BASE}, paired median",
                "ms",
                "lower",
                to_stunnel=False,
            ),  # fmt: skip
        ]
    if workload == "handshake":
        n = settings.handshakes
        return [Metric(workload, "handshakes_per_s", f"TLS handshakes x{n}", "1/s", "higher")]
    if workload == "concurrent":
        rows = []
        for n in settings.tunnels:
            rows.append(Metric(workload, f"concurrent_{n}_rt_per_s", f"{n} tunnels ping-pong", "RT/s", "higher"))  # fmt: skip
            rows.append(Metric(workload, f"concurrent_{n}_peak_rss_mib", f"{n} tunnels relay peak RSS", "MiB", "lower"))  # fmt: skip
        return rows
    if workload == "gdb":
        return [Metric(workload, "gdb_stepi_s", f"gdb stepi {settings.stepi}", "s", "lower")]
    raise ValueError(workload)


@dataclass
class Context:
    """What every workload needs.

    Attributes:
        sup: The supervisor that owns every process.
        settings: Counts and sizes.
        python: Interpreter for the client.
        backend: The backend process (pinned and unpinned between workloads).
        echo_port: The backend's echo port.
        sink_port: The backend's sink port.
        workdir: Scratch folder.
        ca: The CA certificate the paths' servers chain to.
        gdb: ``(gdb, gdbserver, gcc)`` or ``None``.
        gdb_program: The compiled test program, built on first use.
    """

    sup: Supervisor
    settings: Settings
    python: str
    backend: Child
    echo_port: int
    sink_port: int
    workdir: Path
    ca: Path | None = None
    gdb: tuple[str, str, str] | None = None
    gdb_program: Path | None = field(default=None)

    def client(self, name: str, args: list[str], *, pinned: bool, timeout: float) -> dict:
        """Run ``python -m bench.client`` and return its JSON result."""
        out = self.sup.run(
            f"client-{name}",
            [self.python, "-m", "bench.client", *args],
            timeout=timeout,
            pinned=pinned,
        )
        return json.loads(out)

    def pin_backend(self, pinned: bool) -> None:
        """Pin every thread of the backend to the latency CPU, or release it."""
        cpus = {self.settings.pin_cpu} if pinned else set(range(os.cpu_count() or 1))
        if pinned and self.sup.pin_command is None:
            return
        for pid in group_pids(self.backend.pid):
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), cpus)
                except OSError:
                    pass


#: Workloads in the order they run.
WORKLOADS = ("pingpong", "bulk", "connect", "handshake", "concurrent", "gdb")
LATENCY_WORKLOADS = frozenset({"pingpong", "connect", "handshake", "gdb"})


def _pingpong(ctx: Context, path, record: dict) -> None:
    s = ctx.settings
    deployment = path.deploy(ctx.sup, {"echo": ctx.echo_port}, pinned=True)
    try:
        port = deployment.ports["echo"]
        for size in s.sizes:
            result = ctx.client(
                f"pingpong-{size}",
                [
                    "pingpong",
                    "--port",
                    str(port),
                    "--size",
                    str(size),
                    "--count",
                    str(s.roundtrips),
                    "--warmup-seconds",
                    str(s.warmup),
                ],
                pinned=True,
                timeout=60 + s.warmup + s.roundtrips * 0.005,
            )
            record["metrics"][f"pingpong_{size}B_median_us"] = result["median_us"]
            record["metrics"][f"pingpong_{size}B_p99_us"] = result["p99_us"]
            record["detail"][f"{size}B"] = result
    finally:
        path.teardown(ctx.sup, deployment)


def _bulk(ctx: Context, path, record: dict) -> None:
    s = ctx.settings
    deployment = path.deploy(ctx.sup, {"echo": ctx.echo_port, "sink": ctx.sink_port}, pinned=False)
    try:
        for mode in ("sink", "echo"):
            runs = []
            for _ in range(s.throughput_runs):
                result = ctx.client(
                    f"bulk-{mode}",
                    ["bulk", "--port", str(deployment.ports[mode]), "--mode", mode,
                     "--bytes", str(s.bulk_bytes)],
                    pinned=False,
                    timeout=60 + s.bulk_bytes / 5e6,
                )  # fmt: skip
                runs.append(result["mb_per_s"])
            record["metrics"][f"bulk_{mode}_mb_s"] = max(runs)
            record["detail"][f"{mode}_runs_mb_s"] = runs
    finally:
        path.teardown(ctx.sup, deployment)


#: The path every dbgrelay variant's connect time is compared with, pairwise.
CONNECT_BASE = "dbgrelay-stdlib"


def run_connect(ctx: Context, paths: Sequence) -> dict[str, dict]:
    """The connect workload for all ``paths`` at once, their connections taking turns.

    Every path is deployed (pinned) before the first connection, and each
    round opens one connection through each, so a slow moment of the machine
    lands on every path alike; each path also gets its paired difference to
    :data:`CONNECT_BASE` (the median over rounds of its time minus the
    base's), the figure that compares two dbgrelay variants.

    Returns:
        Per path name, the record :func:`run_workload` would give.
    """
    s = ctx.settings
    ctx.pin_backend(True)
    records: dict[str, dict] = {}
    deployed = []
    start = time.monotonic()
    try:
        for path in paths:
            try:
                deployed.append((path, path.deploy(ctx.sup, {"echo": ctx.echo_port}, pinned=True)))
            except (BenchError, OSError) as exc:
                records[path.name] = {"status": "error", "error": str(exc), "seconds": 0.0}
        if not deployed:
            return records
        ports = {path.name: deployment.ports["echo"] for path, deployment in deployed}
        try:
            result = ctx.client(
                "connect",
                ["connect", "--ports", ",".join(map(str, ports.values())),
                 "--count", str(s.connections)],
                pinned=True,
                timeout=60 + s.connections * len(ports) * 0.5,
            )  # fmt: skip
        except (BenchError, OSError, ValueError) as exc:
            failed = {"status": "error", "error": str(exc), "seconds": time.monotonic() - start}
            return records | {name: dict(failed) for name in ports}
    finally:
        for path, deployment in deployed:
            path.teardown(ctx.sup, deployment)
    seconds = time.monotonic() - start
    base = ports.get(CONNECT_BASE)
    for name, port in ports.items():
        detail = result[str(port)]
        metrics = {
            "connect_median_ms": detail["median_ms"],
            "connect_paired_minus_base_ms": (
                None if base is None else 0.0 if port == base else detail["paired_ms"][str(base)]
            ),
        }
        detail["paired_ms"] = {
            other: detail["paired_ms"][str(p)] for other, p in ports.items() if p != port
        }
        records[name] = {"status": "ok", "metrics": metrics, "detail": detail, "seconds": seconds}
    return records


def _handshake(ctx: Context, path, record: dict) -> None:
    """TLS handshakes alone, against the server side of the path.

    The client uses the TLS library of the path's own client side, so the
    pyOpenSSL engine is measured with the hybrid group it negotiates.
    """
    s = ctx.settings
    deployment = path.deploy(ctx.sup, {"echo": ctx.echo_port}, pinned=True)
    try:
        if deployment.tls_port is None:
            record["metrics"]["handshakes_per_s"] = None  # the direct path has no TLS
            return
        result = ctx.client(
            "handshake",
            ["handshake", "--port", str(deployment.tls_port), "--count", str(s.handshakes),
             "--engine", deployment.tls_engine, "--ca", str(ctx.ca)],
            pinned=True,
            timeout=60 + s.handshakes * 0.5,
        )  # fmt: skip
        record["metrics"]["handshakes_per_s"] = result["per_s"]
        record["detail"] = result
    finally:
        path.teardown(ctx.sup, deployment)


def _concurrent_run(ctx: Context, port: int, tunnels: int, relay: tuple[Child, ...]) -> dict:
    s = ctx.settings
    setup_timeout = 30 + tunnels * 0.1
    child = ctx.sup.start(
        f"client-concurrent-{tunnels}",
        [ctx.python, "-m", "bench.client", "concurrent", "--port", str(port),
         "--tunnels", str(tunnels), "--duration", str(s.duration),
         "--setup-timeout", str(setup_timeout)],
        capture_stdout=True,
    )  # fmt: skip
    deadline = time.monotonic() + setup_timeout + s.duration + 30
    sampled_rss = 0
    try:
        while child.popen.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the concurrent client ran past its deadline: {child.log_tail()}",
                    reason="timeout",
                )
            if relay:
                pids = [pid for c in relay for pid in group_pids(c.pid)]
                sampled_rss = max(sampled_rss, read_rss(pids)[0])
            time.sleep(0.1)
        out = child.popen.stdout.read()
        if child.popen.returncode != 0:
            raise BenchError(
                f"the concurrent client exited with status {child.popen.returncode}: "
                f"{child.log_tail()}",
                reason="client_failed",
            )
    finally:
        ctx.sup.stop(child)
    result = json.loads(out)
    result["sampled_rss_kib"] = sampled_rss
    return result


def _wait_backend_idle(port: int, timeout: float) -> None:
    """Wait until the path has closed every tunnel of the previous run.

    The client's exit closes its connections at once; the path ends its
    tunnels after that.  A run started earlier would overlap the previous
    run's tunnels and measure more than its own count of them.
    """
    deadline = time.monotonic() + timeout
    while (left := accepted_connections(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise BenchError(
            f"{left} tunnels of the previous run were still open after {timeout:.0f} s",
            reason="timeout",
        )


def _concurrent(ctx: Context, path, record: dict) -> None:
    s = ctx.settings
    for tunnels in s.tunnels:
        # Fresh relay processes per level, so VmHWM is this level's peak.
        deployment = path.deploy(ctx.sup, {"echo": ctx.echo_port}, pinned=False)
        try:
            runs = []
            for _ in range(s.throughput_runs):
                _wait_backend_idle(ctx.echo_port, timeout=60)
                runs.append(
                    _concurrent_run(ctx, deployment.ports["echo"], tunnels, deployment.relay)
                )
            record["metrics"][f"concurrent_{tunnels}_rt_per_s"] = max(
                r["round_trips_per_s"] for r in runs
            )
            if deployment.relay:
                pids = [pid for c in deployment.relay for pid in group_pids(c.pid)]
                _, hwm = read_rss(pids)
                record["metrics"][f"concurrent_{tunnels}_peak_rss_mib"] = hwm / 1024
            else:
                record["metrics"][f"concurrent_{tunnels}_peak_rss_mib"] = None
            record["detail"][str(tunnels)] = runs
        finally:
            path.teardown(ctx.sup, deployment)


_GDB_PROGRAM = """\
volatile unsigned long counter;
int main(void)
{
    for (unsigned long i = 0; i < 4000000000UL; i++)
        counter += i;
    return 0;
}
"""

_STEPI = re.compile(r"BENCH_STEPI_SECONDS ([0-9.eE+-]+)")


def _build_gdb_program(ctx: Context) -> Path:
    if ctx.gdb_program is None:
        source = ctx.workdir / "stepme.c"
        source.write_text(_GDB_PROGRAM)
        program = ctx.workdir / "stepme"
        # Static, so gdb loads no shared libraries over the link before stepping.
        done = subprocess.run(
            [ctx.gdb[2], "-O0", "-g", "-static", "-o", str(program), str(source)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise BenchError(
                f"gcc could not build the gdb test program: {done.stderr.strip()[-300:]}",
                reason="gcc_failed",
            )
        ctx.gdb_program = program
    return ctx.gdb_program


def _gdb(ctx: Context, path, record: dict) -> None:
    if ctx.gdb is None:
        raise BenchError(
            "gdb, gdbserver or gcc not found: apt-get install gdb gdbserver gcc",
            reason="missing_tool",
        )
    gdb, gdbserver, _ = ctx.gdb
    program = _build_gdb_program(ctx)
    s = ctx.settings
    backend_port = free_port()
    deployment = path.deploy(ctx.sup, {"gdb": backend_port}, pinned=True)
    try:
        runs = []
        for _ in range(s.gdb_runs):
            server = ctx.sup.start(
                "gdbserver",
                [gdbserver, "--once", f"127.0.0.1:{backend_port}", str(program)],
                pinned=True,
            )
            try:
                ctx.sup.wait_listening(server, backend_port)
                out = ctx.sup.run(
                    "gdb",
                    [gdb, "-batch", "-nx",
                     "-ex", "set confirm off",
                     "-ex", "set pagination off",
                     "-ex", "set sysroot /",
                     "-ex", f"target remote 127.0.0.1:{deployment.ports['gdb']}",
                     "-ex", "break main",
                     "-ex", "continue",
                     "-ex", "python import time; t0 = time.perf_counter()",
                     "-ex", f"stepi {s.stepi}",
                     "-ex", 'python print("BENCH_STEPI_SECONDS", time.perf_counter() - t0)',
                     "-ex", "kill",
                     str(program)],
                    timeout=60 + s.stepi * 0.05,
                    pinned=True,
                )  # fmt: skip
            finally:
                ctx.sup.stop(server)
            match = _STEPI.search(out)
            if match is None:
                tail = " | ".join(out.strip().splitlines()[-3:])
                raise BenchError(
                    f"gdb did not finish stepi {s.stepi}; its last output: {tail}",
                    reason="gdb_failed",
                )
            runs.append(float(match.group(1)))
        record["metrics"]["gdb_stepi_s"] = statistics.median(runs)
        record["detail"]["runs_s"] = runs
    finally:
        path.teardown(ctx.sup, deployment)


_RUNNERS: dict[str, Callable[[Context, object, dict], None]] = {
    "pingpong": _pingpong,
    "bulk": _bulk,
    "handshake": _handshake,
    "concurrent": _concurrent,
    "gdb": _gdb,
}


def run_workload(ctx: Context, workload: str, path) -> dict:
    """Run one workload on one path.

    Returns:
        ``{"status": "ok", "metrics": ..., "detail": ..., "seconds": ...}``, or
        ``{"status": "error", "error": ...}`` when a step failed (a
        :class:`BenchError` or an ``OSError``). Interrupts propagate.
    """
    record: dict = {"status": "ok", "metrics": {}, "detail": {}}
    ctx.pin_backend(workload in LATENCY_WORKLOADS)
    start = time.monotonic()
    try:
        _RUNNERS[workload](ctx, path, record)
    except (BenchError, OSError, ValueError, KeyError) as exc:
        return {"status": "error", "error": str(exc), "seconds": time.monotonic() - start}
    record["seconds"] = time.monotonic() - start
    return record
