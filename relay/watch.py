"""Watching targets that nobody uses: forgotten servers and ``on_idle``.

A debug server left running after its session is a standing target.  For
targets the relay does not launch, it probes the backend address on the
target's ``probe_interval``; a backend that accepts connections although it
has had no tunnel for longer than ``idle_timeout`` is reported (log, audit,
metric) and triggers the target's ``on_idle`` command.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from config import TargetConfig

from .backends import probe_backend

if TYPE_CHECKING:
    from .server import Relay

__all__ = ["run_watch", "run_probes", "run_on_idle"]

log = logging.getLogger("dbgrelay.watch")


async def run_watch(relay: Relay) -> None:
    """All of the relay's watching of idle targets."""
    await run_probes(relay)


async def run_probes(relay: Relay) -> None:
    """Forgotten-server detection for targets the relay does not launch.

    A backend that accepts connections while it has had no tunnel for
    longer than its ``idle_timeout`` is a standing target: report it
    (log, audit, metric) once per idle spell and run ``on_idle``.
    """
    next_probe: dict[str, float] = {}
    while True:
        now = trio.current_time()
        soonest = now + 60
        for target in relay.config.targets:
            if target.managed or not target.probe_interval:
                continue
            due = next_probe.setdefault(target.name, now)
            if due <= now:
                await _probe(relay, target)
                due = next_probe[target.name] = now + target.probe_interval
            soonest = min(soonest, due)
        await trio.sleep_until(soonest)


async def _probe(relay: Relay, target: TargetConfig) -> None:
    up = await probe_backend(target.backend, connect_timeout=target.connect_timeout)
    relay.metrics.backend_up(target.name, up)
    busy = any(s.target == target.name for s in relay.sessions.values())
    idle_since = relay.last_activity.setdefault(target.name, trio.current_time())
    forgotten = up and not busy and trio.current_time() - idle_since >= target.idle_timeout
    if forgotten and target.name not in relay.forgotten:
        relay.forgotten.add(target.name)
        relay.metrics.forgotten_server(target.name, True)
        relay.audit_event(
            "server.forgotten",
            target=target.name,
            backend=target.backend_url,
            idle_seconds=round(trio.current_time() - idle_since, 3),
        )
        log.warning("server.forgotten", extra={"target": target.name})
        if target.on_idle:
            await run_on_idle(relay, target)
    elif not forgotten and target.name in relay.forgotten:
        relay.forgotten.discard(target.name)
        relay.metrics.forgotten_server(target.name, False)


async def run_on_idle(relay: Relay, target: TargetConfig) -> None:
    """Run the target's ``on_idle`` command once, bounded; audit its outcome."""
    assert target.on_idle
    fields: dict[str, Any] = {"target": target.name, "argv": list(target.on_idle)}
    with trio.move_on_after(target.on_idle_timeout) as scope:
        try:
            done = await trio.run_process(
                list(target.on_idle), capture_stdout=True, capture_stderr=True, check=False
            )
            fields |= {
                "returncode": done.returncode,
                "output": (done.stdout + done.stderr).decode(errors="replace")[:2000],
            }
        except OSError as exc:
            fields["error"] = str(exc)
    if scope.cancelled_caught:
        fields["error"] = f"timed out after {target.on_idle_timeout:g}s"
    relay.audit_event("on_idle.ran", **fields)
    log.info("on_idle.ran", extra=fields)
