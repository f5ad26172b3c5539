"""Where the established tunnel's data path runs: a thread, or trio's guest mode.

``python -m bench.planes`` measures 64-byte ping-pong through a bare TLS
relay pair (:mod:`bench.pair_end`) whose data path is the relay's pump and
step, hosted either in :class:`~relay.datapath.thread_driver.DataPlane`'s
thread beside trio, or in an epoll host loop with trio as its guest, and
through stunnel, all in the same run.  Every process is pinned to one CPU,
and the hostings take turns round after round, so the ratios compare runs
that shared the machine's state.

Prints one line per round and the median of each hosting's medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from .certs import CertFiles, make_certs
from .env import find_tools
from .paths import StunnelPath
from .procs import Child, Supervisor, free_port, install_signal_handlers
from .workloads import Context, Settings

HOSTINGS = ("thread", "guest", "stunnel")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def _pair(sup: Supervisor, mode: str, certs: CertFiles, echo_port: int) -> tuple[int, list[Child]]:
    relay_port, connector_port = free_port(), free_port()
    ends = []
    for role, listen, upstream in (
        ("relay", relay_port, echo_port),
        ("connector", connector_port, relay_port),
    ):
        argv = [sys.executable, "-m", "bench.pair_end", mode, role, str(listen), str(upstream)]
        child = sup.start(f"{mode}-{role}", [*argv, str(certs.ca.parent)], pinned=True)
        sup.wait_listening(child, listen)
        ends.append(child)
    return connector_port, ends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planes", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--count", type=int, default=20000, help="round trips per run")
    parser.add_argument("--pin-cpu", type=int, default=0, help="CPU for every process")
    args = parser.parse_args(argv)
    install_signal_handlers()
    tools = find_tools()
    if tools.taskset is None or tools.stunnel is None:
        print("bench.planes: needs taskset and stunnel", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dbgrelay-planes-") as scratch:
        workdir = Path(scratch)
        (workdir / "logs").mkdir()
        sup = Supervisor(
            workdir / "logs", pin_command=[tools.taskset, "-c", str(args.pin_cpu)], env={}
        )
        try:
            certs = make_certs(workdir)
            echo_port, sink_port = free_port(), free_port()
            backend = sup.start(
                "backend",
                [
                    sys.executable,
                    "-m",
                    "bench.backend",
                    "--echo-port",
                    str(echo_port),
                    "--sink-port",
                    str(sink_port),
                ],  # fmt: skip
                pinned=True,
            )
            sup.wait_listening(backend, echo_port)
            settings = Settings(pin_cpu=args.pin_cpu)
            ctx = Context(sup, settings, sys.executable, backend, echo_port, sink_port, workdir)
            stunnel = StunnelPath(tools.stunnel, certs, "TLS_AES_256_GCM_SHA384", workdir)
            medians: dict[str, list[float]] = {name: [] for name in HOSTINGS}
            for round_ in range(1, args.rounds + 1):
                line = []
                for hosting in HOSTINGS:
                    if hosting == "stunnel":
                        deployment = stunnel.deploy(sup, {"echo": echo_port}, pinned=True)
                        port, ends = deployment.ports["echo"], list(deployment.relay)
                    else:
                        port, ends = _pair(sup, hosting, certs, echo_port)
                    before = [_cpu_seconds(end.pid) for end in ends]
                    result = ctx.client(
                        f"{hosting}-{round_}",
                        [
                            "pingpong",
                            "--port",
                            str(port),
                            "--size",
                            "64",
                            "--count",
                            str(args.count),
                            "--warmup-seconds",
                            "0.3",
                        ],  # fmt: skip
                        pinned=True,
                        timeout=60 + args.count * 0.005,
                    )
                    cpu = [_cpu_seconds(end.pid) - b for end, b in zip(ends, before, strict=True)]
                    for end in ends:
                        sup.stop(end)
                    medians[hosting].append(result["median_us"])
                    per_rt = " + ".join(f"{c / args.count * 1e6:.0f}" for c in cpu)
                    line.append(f"{hosting} {result['median_us']:.1f} us (CPU {per_rt} us/RT)")
                print(f"round {round_}: " + "; ".join(line), flush=True)
            base = statistics.median(medians["stunnel"])
            for hosting in HOSTINGS:
                mid = statistics.median(medians[hosting])
                print(f"{hosting:8} median of medians {mid:7.1f} us  {mid / base:.2f}x stunnel")
        finally:
            sup.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
