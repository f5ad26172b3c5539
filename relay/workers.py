"""All cores of one host: ``dbgrelay serve --workers N``.

One relay process runs on one core.  With ``--workers N`` a supervisor
starts N worker processes (``dbgrelay serve --worker-index I``), each a
complete relay.  They share:

* the tunnel listeners: every worker binds ``relay.listen`` with
  ``SO_REUSEPORT``, and the kernel spreads new connections over them;
* the state backend: the SQLite file (WAL lets several processes use it) or
  the PostgreSQL database.  With SQLite the workers' live sessions are rows
  of that file (:class:`relay.state.WorkerSessions`), so the per-user cap,
  ``max_sessions`` and worker 0's watcher count the whole host's tunnels.

What stays per worker, because two processes must not share it:

* the metrics endpoint: worker I serves on ``metrics.listen``'s port + I
  (Prometheus scrapes each as its own target, so the metrics are per worker);
* the admin endpoint: worker 0 keeps ``admin.listen``, worker I>0 adds
  ``-I`` to the socket name (or I to the TCP port);
* the audit folder: worker I writes below ``<audit_dir>/worker-I``, since the
  relay-level audit file is one hash chain per day and per writer.

The supervisor restarts a worker that dies (waiting longer after each quick
death, up to :data:`MAX_RESTART_DELAY`), forwards SIGHUP to every worker, and
on SIGTERM or SIGINT forwards SIGTERM so every worker drains its tunnels for
``shutdown_grace``, then exits 0 when all have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from config import Config

__all__ = [
    "MAX_RESTART_DELAY",
    "auto_workers",
    "cpus_available",
    "open_reuseport_listeners",
    "reuseport_available",
    "run_supervisor",
    "worker_config",
]

log = logging.getLogger("dbgrelay.workers")

#: The longest a supervisor waits before restarting a worker that keeps dying.
MAX_RESTART_DELAY = 10.0
#: A worker that ran at least this long before dying is restarted at once.
_STABLE_AFTER = 10.0


def reuseport_available() -> bool:
    """Whether this platform lets several processes bind one port (``SO_REUSEPORT``)."""
    return hasattr(socket, "SO_REUSEPORT")


def cpus_available(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity mask, narrowed by a cgroup v2 CPU quota.

    A container started with ``--cpus 2`` (or a Kubernetes CPU limit) on a
    larger host sees every CPU in its affinity mask but may only use the
    quota's worth; ``cpu_max`` holds ``"<quota> <period>"`` or ``"max <period>"``.
    """
    if hasattr(os, "sched_getaffinity"):
        cpus = max(1, len(os.sched_getaffinity(0)))
    else:
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def auto_workers(config: Config) -> tuple[int, str | None]:
    """How many workers ``serve`` runs by default: one per CPU, where several can run.

    Returns:
        The count, and why it is 1 on a host with several CPUs (or ``None``).
    """
    cpus = cpus_available()
    if cpus == 1:
        return 1, None
    if not reuseport_available():
        return 1, "this platform has no SO_REUSEPORT"
    if any(port == 0 for _host, port in config.relay.listen):
        return 1, "relay.listen has port 0 (the workers need a fixed port to share)"
    return cpus, None


def worker_config(config: Config, index: int) -> Config:
    """``config`` as worker ``index`` runs it: its own metrics port, admin endpoint and audit folder."""
    metrics = config.metrics
    if metrics.listen is not None and index:
        host, port = metrics.listen
        metrics = dataclasses.replace(metrics, listen=(host, port + index if port else 0))
    admin = config.admin
    if index:
        if isinstance(admin.listen, Path):
            path = admin.listen
            admin = dataclasses.replace(
                admin, listen=path.with_name(f"{path.stem}-{index}{path.suffix}")
            )
        else:
            host, port = admin.listen
            admin = dataclasses.replace(admin, listen=(host, port + index if port else 0))
    relay = dataclasses.replace(config.relay, audit_dir=config.relay.audit_dir / f"worker-{index}")
    return dataclasses.replace(config, relay=relay, metrics=metrics, admin=admin)


async def open_reuseport_listeners(port: int, host: str) -> list[trio.SocketListener]:
    """Listeners on every address ``host`` resolves to, with ``SO_REUSEPORT`` set.

    Like :func:`trio.open_tcp_listeners`, which has no way to set the option
    before ``bind``.

    Raises:
        OSError: an address cannot be bound.
    """
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _name, sockaddr in infos:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


async def run_supervisor(argv: list[str], workers: int) -> int:
    """Run ``argv + ["--worker-index", I]`` for I in 0..workers-1 until SIGTERM/SIGINT.

    Returns:
        0 after every worker drained and exited; 2 when the first start of a
        worker failed with a usage error (a bad config: restarting would not
        help).

    Resource handling:
        Every worker is a child of this process; it is sent SIGTERM on stop
        and waited for.  Workers inherit stdout and stderr.
    """
    procs: dict[int, trio.Process] = {}
    stopping = False
    usage_error = False

    def signal_all(signum: int) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    def stop() -> None:
        nonlocal stopping
        stopping = True
        signal_all(signal.SIGTERM)

    async def run_worker(index: int, stop_all: trio.CancelScope) -> None:
        nonlocal usage_error
        delay = 0.5
        first = True
        while not stopping:
            started = trio.current_time()
            proc = await trio.lowlevel.open_process(
                [*argv, "--worker-index", str(index)], stdin=subprocess.DEVNULL
            )
            procs[index] = proc
            log.info("worker.started", extra={"worker": index, "pid": proc.pid})
            # Never abandon a child: on stop it gets SIGTERM and is waited for.
            with trio.CancelScope(shield=True):
                code = await proc.wait()
            if stopping:
                return
            ran = trio.current_time() - started
            log.warning(
                "worker.exited", extra={"worker": index, "pid": proc.pid, "returncode": code}
            )
            if first and code == 2 and ran < _STABLE_AFTER:
                # A bad config or a taken port: restarting would not help.
                usage_error = True
                stop()
                stop_all.cancel()
                return
            first = False
            if ran < _STABLE_AFTER:
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY)
            else:
                delay = 0.5
            log.info("worker.restarting", extra={"worker": index})

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            log.info("supervisor.started", extra={"workers": workers})
            for index in range(workers):
                nursery.start_soon(run_worker, index, nursery.cancel_scope)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    signal_all(signal.SIGHUP)
                    continue
                log.info("supervisor.stopping", extra={"signal": signal.Signals(signum).name})
                stop()
                break
    if usage_error:
        return 2
    log.info("supervisor.stopped")
    return 0


def worker_argv(
    config_path: str, log_format: str | None, log_level: str, workers: int
) -> list[str]:
    """The command line a worker runs (this program, the same config and logging).

    ``--workers`` tells each worker how many siblings it has, so worker 0's
    admin endpoint can list and end their sessions.
    """
    argv = [sys.executable, "-m", "relay"]
    if log_format:
        argv += ["--log-format", log_format]
    return [
        *argv,
        "--log-level",
        log_level,
        "serve",
        "--config",
        config_path,
        "--workers",
        str(workers),
    ]


def sibling_admins(config: Config, workers: int) -> dict[int, Any]:
    """The admin endpoints of workers 1..workers-1, by index, for worker 0 to ask.

    Only with the SQLite backend: with PostgreSQL every worker already lists
    and ends the whole cluster's sessions through the database.
    """
    from .admin_client import AdminEndpoint

    if config.state.backend != "sqlite":
        return {}
    return {
        index: AdminEndpoint.from_config(worker_config(config, index), timeout=5.0)
        for index in range(1, workers)
    }


def log_filter(index: int, pid: int) -> Any:
    """A logging filter that names the worker on every record.

    ``pid`` is the worker's unless the event names a process of its own
    (``server.launched`` and ``server.exited`` carry the server's).
    """

    def add(record: logging.LogRecord) -> bool:
        record.worker = index
        if "pid" not in record.__dict__:
            record.pid = pid
        return True

    return add
