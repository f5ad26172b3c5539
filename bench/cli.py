"""``python -m bench``: direct, stunnel and dbgrelay side by side on this machine.

Absolute numbers on a shared VM are noise; ratios measured in the same run are
not. So stunnel, the tool operators compare against, runs in the same run with
the same certificate, TLS version and ciphersuite, and every figure is also
shown as a ratio to stunnel's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .certs import make_certs
from .env import REPO_ROOT, describe_machine, find_tools
from .paths import BarePath, DbgrelayPath, DbgrelaySetup, DirectPath, StunnelPath
from .postgres import start_postgres
from .procs import (
    BenchError,
    Interrupted,
    Supervisor,
    free_port,
    install_signal_handlers,
    raise_nofile_limit,
)
from .report import format_table, ratios
from .workloads import (
    MIB,
    QUICK,
    WORKLOADS,
    Context,
    Settings,
    metrics_for,
    run_connect,
    run_workload,
)

__all__ = ["main", "ALL_PATHS"]

ALL_PATHS = (
    "direct",
    "stunnel",
    "dbgrelay-stdlib",
    "dbgrelay-pyopenssl",
    # The stdlib engine with revocations in PostgreSQL, and as two worker processes.
    "dbgrelay-postgres",
    "dbgrelay-workers2",
)

#: Paths run only when named: the bare trio pair under dbgrelay (bench/bare_pair.py).
EXTRA_PATHS = ("trio-bare",)

#: dbgrelay's stdlib engine cannot choose TLS 1.3 suites (Python's ssl has no
#: call for it), so OpenSSL's default order applies and this suite is picked;
#: stunnel is told to use the same one.
DEFAULT_CIPHERSUITE = "TLS_AES_256_GCM_SHA384"


def _csv(allowed: tuple[str, ...], flag: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{flag} takes a comma-separated list of {', '.join(allowed)}; "
                f"got {', '.join(unknown) or 'nothing'}"
            )
        return names

    return parse


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 100,1000, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark direct, stunnel and dbgrelay paths on 127.0.0.1 side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced counts; under a minute")
    parser.add_argument(
        "--paths",
        type=_csv(ALL_PATHS + EXTRA_PATHS, "--paths"),
        default=ALL_PATHS,
        help=f"comma-separated subset of {','.join(ALL_PATHS + EXTRA_PATHS)} "
        f"(default: all but {','.join(EXTRA_PATHS)})",
    )
    parser.add_argument(
        "--workloads",
        type=_csv(WORKLOADS, "--workloads"),
        default=WORKLOADS,
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument(
        "--ciphersuite", default=DEFAULT_CIPHERSUITE, help="TLS 1.3 suite for stunnel"
    )
    parser.add_argument("--pin-cpu", type=int, default=0, help="CPU for latency workloads")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and logs")
    parser.add_argument(
        "--data-plane",
        choices=("auto", "trio", "thread"),
        help="relay.data_plane and connect --data-plane of the dbgrelay paths "
        "(default: left out, so each runs its own default)",
    )
    counts = parser.add_argument_group("overrides (after --quick)")
    counts.add_argument("--roundtrips", type=_positive_int, help="ping-pong round trips per size")
    counts.add_argument("--bulk-mib", type=_positive_int, help="MiB per bulk run")
    counts.add_argument("--connections", type=_positive_int, help="sequential connections")
    counts.add_argument("--handshakes", type=_positive_int, help="sequential TLS handshakes")
    counts.add_argument("--tunnels", type=_positive_ints, help="concurrency levels, e.g. 100,1000")
    counts.add_argument("--duration", type=_positive_float, help="seconds per concurrent run")
    counts.add_argument("--stepi", type=_positive_int, help="instructions gdb steps")
    counts.add_argument("--runs", type=_positive_int, help="runs per throughput measurement")
    counts.add_argument("--gdb-runs", type=_positive_int, help="runs of the gdb workload")
    counts.add_argument("--warmup", type=_positive_float, help="ping-pong warm-up seconds")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else Settings()
    overrides = {
        "roundtrips": args.roundtrips,
        "bulk_bytes": args.bulk_mib * MIB if args.bulk_mib else None,
        "connections": args.connections,
        "handshakes": args.handshakes,
        "tunnels": args.tunnels,
        "duration": args.duration,
        "stepi": args.stepi,
        "throughput_runs": args.runs,
        "gdb_runs": args.gdb_runs,
        "pin_cpu": args.pin_cpu,
        "warmup": args.warmup,
    }
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; returns 0 if every selected workload ran on every available path."""
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    if not 0 <= settings.pin_cpu < (os.cpu_count() or 1):
        _say(f"--pin-cpu must name a CPU between 0 and {(os.cpu_count() or 1) - 1}")
        return 2
    install_signal_handlers()
    nofile = raise_nofile_limit()
    # A relay process holds two sockets per tunnel (the backend and the client
    # each hold one), plus its own files.
    needed = 2 * max(settings.tunnels) + 100
    if "concurrent" in args.workloads and nofile < needed:
        _say(
            f"the open-file limit is {nofile}; {max(settings.tunnels)} tunnels need {needed}: "
            "raise the hard limit (ulimit -Hn, or LimitNOFILE) or pass a smaller --tunnels"
        )
        return 2
    tools = find_tools()
    machine = describe_machine(tools)
    workdir = Path(tempfile.mkdtemp(prefix="dbgrelay-bench-"))
    (workdir / "logs").mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    pin_command = None
    notes: list[str] = []
    if tools.taskset:
        pin_command = [tools.taskset, "-c", str(settings.pin_cpu)]
    else:
        notes.append("taskset not found (apt-get install util-linux): latency runs were not pinned")
        _say(notes[-1])
    workloads = list(args.workloads)
    if "gdb" in workloads and tools.gdb is None:
        workloads.remove("gdb")
        notes.append(
            "gdb, gdbserver or gcc not found (apt-get install gdb gdbserver gcc): gdb skipped"
        )
        _say(notes[-1])
    sup = Supervisor(workdir / "logs", pin_command=pin_command, env=env)
    path_status: dict[str, dict] = {}
    results: dict[str, dict] = {}
    interrupted: str | None = None
    failed = False
    runnable = []
    try:
        certs = make_certs(workdir)
        dbgrelay_setup = None
        dbgrelay_problem = None
        for name in args.paths:
            if name == "direct":
                runnable.append(DirectPath())
            elif name == "stunnel":
                if tools.stunnel is None:
                    note = "stunnel not found: apt-get install stunnel4"
                    path_status[name] = {"status": "skipped", "note": note}
                    _say(note)
                    continue
                runnable.append(StunnelPath(tools.stunnel, certs, args.ciphersuite, workdir))
            elif name == "trio-bare":
                runnable.append(BarePath(tools.python, certs))
            else:
                engine = name.removeprefix("dbgrelay-")
                variant: dict = {}
                if name == "dbgrelay-postgres":
                    engine = "stdlib"
                    try:
                        _server, dsn = start_postgres(sup, workdir)
                    except BenchError as exc:
                        path_status[name] = {"status": "skipped", "note": str(exc)}
                        _say(f"{name}: {exc}")
                        continue
                    variant = {"dsn": dsn}
                elif name == "dbgrelay-workers2":
                    engine, variant = "stdlib", {"workers": 2}
                if dbgrelay_setup is None and dbgrelay_problem is None:
                    try:
                        dbgrelay_setup = dataclasses.replace(
                            DbgrelaySetup.create(tools.dbgrelay, certs, workdir),
                            data_plane=args.data_plane,
                        )
                    except BenchError as exc:
                        dbgrelay_problem = (
                            f"dbgrelay CLI not usable, skipping dbgrelay paths: {exc}"
                        )
                if dbgrelay_problem is not None:
                    path_status[name] = {"status": "skipped", "note": dbgrelay_problem}
                    _say(f"{name}: {dbgrelay_problem}")
                    continue
                refusal = dbgrelay_setup.engine_refusal(engine, workdir / f"check-{engine}")
                if refusal is not None:
                    note = f"TLS engine {engine!r} refused by check-config, skipped: {refusal}"
                    path_status[name] = {"status": "skipped", "note": note}
                    _say(f"{name}: {note}")
                    continue
                runnable.append(DbgrelayPath(dbgrelay_setup, engine, workdir, **variant))
        for path in runnable:
            path_status[path.name] = {"status": "ran"}
            results[path.name] = {}

        echo_port, sink_port = free_port(), free_port()
        backend = sup.start(
            "backend",
            [tools.python, "-m", "bench.backend", "--echo-port", str(echo_port),
             "--sink-port", str(sink_port)],
        )  # fmt: skip
        sup.wait_listening(backend, echo_port)
        sup.wait_listening(backend, sink_port)
        ctx = Context(
            sup=sup,
            settings=settings,
            python=tools.python,
            backend=backend,
            echo_port=echo_port,
            sink_port=sink_port,
            workdir=workdir,
            ca=certs.ca,
            gdb=tools.gdb,
        )
        # Workload outside, path inside: the paths compared in one row run
        # minutes apart at most, under the same background load.
        for workload in workloads:
            if workload == "connect":
                # All paths at once, their connections taking turns (see run_connect).
                _say(f"connect on {', '.join(p.name for p in runnable)} together ...")
                for name, record in run_connect(ctx, runnable).items():
                    results[name][workload] = record
                    if record["status"] != "ok":
                        failed = True
                        _say(f"connect on {name}: FAILED: {record['error']}")
                continue
            for path in runnable:
                _say(f"{workload} on {path.name} ...")
                record = run_workload(ctx, workload, path)
                results[path.name][workload] = record
                if record["status"] == "ok":
                    _say(f"{workload} on {path.name}: ok in {record['seconds']:.1f} s")
                else:
                    failed = True
                    _say(f"{workload} on {path.name}: FAILED: {record['error']}")
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except Interrupted as exc:
        interrupted = str(exc)
    except BenchError as exc:
        failed = True
        notes.append(str(exc))
        _say(str(exc))
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            sup.stop_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    for path in runnable:
        if not isinstance(path, DbgrelayPath):
            continue
        path_status[path.name]["tls"] = {k: sorted(v) for k, v in path.tls_seen.items()}
        path_status[path.name]["connect_tls_engine"] = (
            path.engine if path.setup.connect_engine_flag else "connect's default"
        )
        ciphers = path.tls_seen.get("tls_cipher", set()) | path.tls_seen.get("cipher", set())
        if ciphers - {args.ciphersuite}:
            notes.append(
                f"{path.name} negotiated {', '.join(sorted(ciphers))} but stunnel was "
                f"given {args.ciphersuite}: pass --ciphersuite to match"
            )
    paths = [p.name for p in runnable]
    metrics = [m for w in workloads for m in metrics_for(w, settings)]
    method = [
        f"latency workloads (ping-pong, connect, handshake, gdb) pinned to CPU {settings.pin_cpu}"
        + ("" if pin_command else " [NOT pinned: no taskset]")
        + f"; bulk and concurrent unpinned, best of {settings.throughput_runs} runs; "
        f"gdb median of {settings.gdb_runs} runs; MB = 10^6 bytes",
        f"stunnel: TLS 1.3 {args.ciphersuite}, TCP_NODELAY both legs; same certificate as dbgrelay",
    ]
    if interrupted is None:
        print(format_table(results, paths, metrics, machine, method))
        for note in notes:
            print(f"note: {note}")
        for name, status in path_status.items():
            if status["status"] == "skipped":
                print(f"note: {name} skipped: {status['note']}")
    if args.json:
        document = {
            "machine": machine,
            "settings": dataclasses.asdict(settings),
            "method": method,
            "ciphersuite": args.ciphersuite,
            "paths": path_status,
            "workloads": workloads,
            "metrics": [dataclasses.asdict(m) for m in metrics],
            "results": results,
            "ratios_to_stunnel": ratios(results, paths, metrics),
            "notes": notes,
            "interrupted": interrupted,
            "pids_started": sup.started,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if failed or args.keep:
        _say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted is not None:
        _say(f"interrupted by {interrupted}; every started process was stopped")
        return 130 if interrupted == "SIGINT" else 143
    return 1 if failed else 0


def run() -> None:
    """Entry point for ``python -m bench``."""
    started = time.monotonic()
    code = main()
    _say(f"finished in {time.monotonic() - started:.0f} s")
    sys.exit(code)
