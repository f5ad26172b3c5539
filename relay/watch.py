"""Watching targets that nobody uses: ``on_idle`` and forgotten servers.

A debug server left running after its session is a standing target.  Two
things notice it:

* **The idle trigger.**  When a target's last tunnel has closed and no new
  tunnel has opened for its ``idle_timeout``, its ``on_idle`` command runs.
* **The forgotten-server probe.**  For targets the relay does not launch, the
  backend address is probed every ``probe_interval`` (a connection opened and
  closed at once; never while a tunnel to the target is open).  A backend
  that accepts although the target has had no tunnel for longer than its
  ``idle_timeout`` (counted from relay start if it never had one) is
  reported: log and audit event ``server.forgotten``, and the metric
  ``dbgrelay_forgotten_servers``.  It is reported once, not on every probe;
  it is reported again only after a tunnel was opened or the backend stopped
  accepting.  The report also runs ``on_idle``.

An *idle spell* runs from a target's last tunnel closing (or relay start)
until its next tunnel opens; ``on_idle`` runs at most once per spell,
whichever trigger comes first.  Its exit status and (truncated) output go to
the relay's audit log as ``on_idle.ran``.

Probing a server that serves one client and then exits (``gdbserver --once``)
would use up that one client: set ``probe_interval = "0"`` on such targets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from auth import AuthError
from config import TargetConfig

from .backends import probe_backend
from .context import RelayContext

if TYPE_CHECKING:
    from collections.abc import Mapping

    from config import TcpBackend, UnixBackend

    from .session import Session

__all__ = ["run_watch", "run_on_idle", "ON_IDLE_OUTPUT_LIMIT", "WatchContext"]

log = logging.getLogger("dbgrelay.watch")

#: Bytes of an ``on_idle`` command's output kept for the audit record.
ON_IDLE_OUTPUT_LIMIT = 2000
# The longest the watcher sleeps when nothing is due.
_MAX_NAP = 60.0
# After on_idle exits, how long to keep reading output its children may hold open.
_DRAIN_TIMEOUT = 1.0


class SharedSessions(Protocol):
    """The shared sessions table, as far as the watcher looks at it (:mod:`relay.state`)."""

    #: Targets with a live session held by another relay (or worker), as of the last look.
    busy_elsewhere: frozenset[str]

    async def refresh_busy(self, relay: WatchContext) -> None:
        """Look at the table now; a target whose last session elsewhere closed starts a spell.

        A spell starts when that session closed, even if it opened and closed
        between two looks (``relay.last_activity`` moves forward to it).

        Raises:
            AuthError: the table cannot be read.
        """
        ...


class WatchContext(RelayContext, Protocol):
    """What the watcher uses of the relay: :class:`relay.server.Relay` provides it.

    Its ``config``'s targets are re-read on every wake-up.
    """

    #: The relay's live sessions by id.
    sessions: Mapping[str, Session]
    #: The shared sessions table, or ``None`` for a single SQLite relay.
    leases: SharedSessions | None
    #: Monotonic (trio) time each target last saw a tunnel end.
    last_activity: dict[str, float]
    #: Targets reported forgotten (for the admin API).
    forgotten: set[str]

    async def open_backend(
        self, backend: TcpBackend | UnixBackend, *, connect_timeout: float
    ) -> trio.abc.Stream:
        """Connect to a backend."""
        ...


@dataclass(slots=True)
class _TargetState:
    """What the watcher remembers about one target between wake-ups."""

    next_probe: float
    probing: bool = False
    # The idle spell (its start time) that was reported forgotten, or None.
    reported_spell: float | None = None
    # The idle spell on_idle last ran for, or None.
    on_idle_spell: float | None = None
    on_idle_running: bool = False


class _Watcher:
    def __init__(self, relay: WatchContext, nursery: trio.Nursery) -> None:
        self.relay = relay
        self.nursery = nursery
        self.started = trio.current_time()
        self.states: dict[str, _TargetState] = {}

    def busy(self, name: str) -> bool:
        # With a shared sessions table, tunnels on other relays (or workers) count too.
        leases = self.relay.leases
        return any(s.target == name for s in self.relay.sessions.values()) or (
            leases is not None and name in leases.busy_elsewhere
        )

    async def busy_anywhere(self, name: str) -> bool:
        """:meth:`busy`, after a fresh look at the shared sessions table.

        Called before the watcher acts on a target: a tunnel opened on
        another relay since the last registration round must stop it.  A
        table that cannot be read counts as busy (nothing is run on a guess).
        """
        leases = self.relay.leases
        if leases is not None:
            try:
                await leases.refresh_busy(self.relay)
            except AuthError as exc:
                log.warning("watch.state_unreadable", extra={"target": name, "error": str(exc)})
                return True
        return self.busy(name)

    def spell(self, name: str) -> float:
        """When the target's current idle spell began (relay start if it had no tunnel)."""
        return self.relay.last_activity.get(name, self.started)

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            wake = now + _MAX_NAP
            for target in self.relay.config.targets:  # re-read: reload may change them
                state = self.states.setdefault(target.name, _TargetState(next_probe=now))
                if target.on_idle:
                    wake = min(wake, self.check_idle(target, state, now))
                if not target.managed and target.probe_interval:
                    if state.next_probe <= now and not state.probing:
                        state.probing = True
                        self.nursery.start_soon(self.probe, target, state)
                        state.next_probe += target.probe_interval
                        if state.next_probe <= now:  # fell behind: no burst of probes
                            state.next_probe = now + target.probe_interval
                    wake = min(wake, state.next_probe)
            await trio.sleep_until(wake)

    def check_idle(self, target: TargetConfig, state: _TargetState, now: float) -> float:
        """Run ``on_idle`` if the target has gone idle; return when to look again.

        The watcher looks at least every ``idle_timeout``: a tunnel that
        closes while it sleeps then cannot go idle before the next look.
        """
        name = target.name
        again = now + target.idle_timeout
        if name not in self.relay.last_activity or self.busy(name):
            return again
        spell = self.relay.last_activity[name]
        due = spell + target.idle_timeout
        if state.on_idle_spell == spell:
            return again
        if now >= due:
            self.start_on_idle(target, state, spell, trigger="idle")
            return again
        return min(again, due)

    def start_on_idle(
        self, target: TargetConfig, state: _TargetState, spell: float, *, trigger: str
    ) -> None:
        state.on_idle_spell = spell
        if state.on_idle_running:
            log.warning(
                "on_idle.skipped",
                extra={"target": target.name, "trigger": trigger, "why": "still running"},
            )
            return
        state.on_idle_running = True

        async def run() -> None:
            try:
                if await self.busy_anywhere(target.name):
                    return  # in use on another relay: its close starts a new spell
                if self.relay.leases is not None and self.spell(target.name) != spell:
                    return  # a tunnel elsewhere closed since: its spell is not over yet
                await run_on_idle(self.relay, target, trigger=trigger)
            finally:
                state.on_idle_running = False

        self.nursery.start_soon(run)

    async def probe(self, target: TargetConfig, state: _TargetState) -> None:
        relay, name = self.relay, target.name
        try:
            if self.busy(name):
                # A tunnel is using it: it is up, and nobody forgot it.  A
                # probe connection could disturb a one-client debug server.
                relay.metrics.backend_up(name, True)
                _mark_forgotten(relay, name, False)
                return
            up = await probe_backend(
                target.backend, connect_timeout=target.connect_timeout, opener=relay.open_backend
            )
            relay.metrics.backend_up(name, up)
            if self.busy(name):
                return  # a tunnel opened while we probed
            spell = self.spell(name)
            idle_for = trio.current_time() - spell
            if not up:
                # Gone: if it comes back, it is a new standing target.
                state.reported_spell = None
            forgotten = up and idle_for >= target.idle_timeout
            if forgotten and state.reported_spell != spell and relay.leases is not None:
                # About to report it: first a fresh look at the other relays' tunnels.
                if await self.busy_anywhere(name):
                    _mark_forgotten(relay, name, False)
                    return
                spell = self.spell(name)  # a tunnel elsewhere may have closed meanwhile
                idle_for = trio.current_time() - spell
                forgotten = idle_for >= target.idle_timeout
            _mark_forgotten(relay, name, forgotten)
            if not forgotten:
                return
            if state.reported_spell == spell:
                return
            state.reported_spell = spell
            fields = {
                "target": name,
                "backend": target.backend_url,
                "idle_seconds": round(idle_for, 3),
            }
            relay.audit_event("server.forgotten", **fields)
            log.warning("server.forgotten", extra=fields)
            if target.on_idle and state.on_idle_spell != spell:
                self.start_on_idle(target, state, spell, trigger="forgotten")
        finally:
            state.probing = False


def _mark_forgotten(relay: WatchContext, name: str, forgotten: bool) -> None:
    relay.metrics.forgotten_server(name, forgotten)
    if forgotten:
        relay.forgotten.add(name)
    else:
        relay.forgotten.discard(name)


async def run_watch(relay: WatchContext) -> None:
    """Run the idle trigger and the forgotten-server probes until cancelled.

    Targets are re-read from ``relay.config`` on every wake-up, so a reload
    takes effect at the next one.

    Cancellation:
        Cancelling kills ``on_idle`` commands still running (their records
        say so).
    """
    async with trio.open_nursery() as nursery:
        await _Watcher(relay, nursery).run()


async def run_on_idle(relay: WatchContext, target: TargetConfig, *, trigger: str = "idle") -> None:
    """Run the target's ``on_idle`` command once, bounded; audit its outcome.

    The command runs in its own session with standard input from /dev/null;
    standard output and error are read together and the first
    :data:`ON_IDLE_OUTPUT_LIMIT` bytes kept.  After ``on_idle_timeout`` its
    whole process group is killed.  The ``on_idle.ran`` record has
    ``target``, ``argv``, ``trigger`` (``"idle"`` or ``"forgotten"``),
    ``duration`` and either ``returncode`` (plus ``signal``), ``output`` and
    ``output_truncated``, or ``error``.

    Args:
        relay: For the audit log.
        target: The target whose ``on_idle`` runs.
        trigger: What started it, for the record.

    Cancellation:
        Kills the command's process group and records ``error`` before the
        cancellation goes on.
    """
    assert target.on_idle
    argv = list(target.on_idle)
    fields: dict[str, Any] = {"target": target.name, "argv": argv, "trigger": trigger}
    started = trio.current_time()
    try:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        fields["error"] = f"cannot run {argv[0]}: {exc.strerror or exc}"
        _report(relay, fields, started)
        return
    output = bytearray()
    dropped = 0

    async def read_output() -> None:
        nonlocal dropped
        assert process.stdout is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await process.stdout.receive_some(65536):
                room = max(0, ON_IDLE_OUTPUT_LIMIT - len(output))
                output.extend(chunk[:room])
                dropped += len(chunk) - len(chunk[:room])

    try:
        with trio.move_on_after(target.on_idle_timeout) as limit:
            async with trio.open_nursery() as nursery:
                reader = trio.CancelScope()

                async def read() -> None:
                    with reader:
                        await read_output()

                nursery.start_soon(read)
                await process.wait()
                # Children that inherited the pipe may keep it open: bounded drain.
                reader.deadline = trio.current_time() + _DRAIN_TIMEOUT
        if limit.cancelled_caught:
            fields["error"] = f"timed out after {target.on_idle_timeout:g}s; killed"
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                # Cancelled from outside: the relay is stopping.
                fields.setdefault("error", "interrupted: the relay stopped while it ran; killed")
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with trio.move_on_after(5):
                    await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
            if process.returncode is not None:
                fields["returncode"] = process.returncode
                if process.returncode < 0:
                    fields["signal"] = signal.Signals(-process.returncode).name
            fields["output"] = output.decode(errors="replace")
            fields["output_truncated"] = dropped > 0
            _report(relay, fields, started)


def _report(relay: WatchContext, fields: dict[str, Any], started: float) -> None:
    fields["duration"] = round(trio.current_time() - started, 3)
    relay.audit_event("on_idle.ran", **fields)
    if "error" in fields or fields.get("returncode"):
        log.warning("on_idle.ran", extra=fields)
    else:
        log.info("on_idle.ran", extra=fields)
