"""Prometheus metrics for the relay.

:class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so two relays in one process, or two tests,
never share counters.  The relay is handed a metrics object and calls plain
methods on it; tests hand it :class:`NilMetrics`, which does nothing (the
``LiveMetrics``/``NilMetrics`` split from ghostunnel).

Naming follows https://prometheus.io/docs/practices/naming/: base units
(seconds, bytes), ``_total`` on counters, and only low-cardinality labels
(``target``, ``outcome``, ``reason``, ``direction``, ``version``, ``group``,
``status``).  User names, token IDs and session IDs never become labels: they
belong in the logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from auth import TOKEN_REJECT_REASONS

if TYPE_CHECKING:
    # Imported where used: a relay without a metrics endpoint runs on
    # NilMetrics and never loads prometheus_client (about 2 MiB of RSS).
    from prometheus_client import CollectorRegistry, Counter

__all__ = [
    "Metrics",
    "NilMetrics",
    "SESSION_OUTCOMES",
    "HANDSHAKE_OUTCOMES",
    "AUTH_FAILURE_REASONS",
    "REFUSAL_REASONS",
    "SESSION_DURATION_BUCKETS",
    "TLS_HANDSHAKE_BUCKETS",
]

#: Close reasons a session ends with; pre-created per target so ``rate()``
#: sees the first increment.  Other reasons are still accepted.
SESSION_OUTCOMES = (
    "client_closed",
    "backend_closed",
    "idle",
    "max_session",
    "token_expired",
    "revoked",
    "ended_by_admin",
    "shutdown",
    "error",
)

#: Outcomes of the TLS handshake plus preamble read.
HANDSHAKE_OUTCOMES = ("ok", "tls_error", "timeout", "refused", "cert_revoked")

#: Reasons a tunnel is refused after TLS: the token's own (``TokenRejected``)
#: plus the relay's access decisions (:mod:`relay.access`).
AUTH_FAILURE_REASONS = (*TOKEN_REJECT_REASONS, "unknown_target", "not_allowed", "pq_required")

#: Refusal reasons pre-created so ``rate()`` sees the first one: the limits'
#: (:data:`relay.limits.LIMIT_REASONS`), the PROXY header's, the per-user cap
#: and relay capacity.  Token and access reasons are added on first use.
REFUSAL_REASONS = (
    "unauthenticated_total",
    "unauthenticated_per_source",
    "handshake_rate",
    "auth_rate",
    "source_table_full",
    "proxy_untrusted",
    "proxy_invalid",
    "user_sessions",
    "relay_full",
)

#: Debug sessions last from seconds (a failed attach) to a working day.
SESSION_DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
)

#: A loopback handshake takes about a millisecond; 10 s is the default
#: handshake timeout, so anything slower ends up in ``+Inf``.
TLS_HANDSHAKE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _Families:
    """Every metric family, registered into one registry."""

    __slots__ = (
        "sessions_active",
        "sessions_total",
        "session_duration",
        "tunnel_bytes",
        "handshakes",
        "tls_handshake_seconds",
        "tls_sessions",
        "auth_failures",
        "preamble_rejections",
        "backend_up",
        "backend_connect_errors",
        "managed_servers",
        "idle_kills",
        "forgotten_servers",
        "audit_write_errors",
        "refusals",
        "unauthenticated",
        "accept_errors",
        "accept_paused",
        "admin_refusals",
        "state_up",
        "state_outages",
        "state_notifications",
        "build_info",
        "labelled",
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.sessions_active = Gauge(
            "dbgrelay_sessions_active", "Tunnels open right now.", ["target"], registry=r
        )
        self.sessions_total = Counter(
            "dbgrelay_sessions_total",
            "Tunnels closed, by close reason.",
            ["target", "outcome"],
            registry=r,
        )
        self.session_duration = Histogram(
            "dbgrelay_session_duration_seconds",
            "How long closed tunnels were open.",
            ["target"],
            buckets=SESSION_DURATION_BUCKETS,
            registry=r,
        )
        self.tunnel_bytes = Counter(
            "dbgrelay_tunnel_bytes_total",
            "Bytes relayed; direction is to_backend or to_client.",
            ["target", "direction"],
            registry=r,
        )
        self.handshakes = Counter(
            "dbgrelay_handshakes_total",
            "Incoming connections by handshake outcome "
            "(ok, tls_error, timeout, refused, cert_revoked).",
            ["outcome"],
            registry=r,
        )
        self.tls_handshake_seconds = Histogram(
            "dbgrelay_tls_handshake_seconds",
            "Time from accept to a finished TLS handshake.",
            buckets=TLS_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.tls_sessions = Counter(
            "dbgrelay_tls_sessions_total",
            "Finished TLS handshakes by protocol version and key-exchange group.",
            ["version", "group"],
            registry=r,
        )
        self.auth_failures = Counter(
            "dbgrelay_auth_failures_total",
            "Tunnels refused because of their token, by reason.",
            ["reason"],
            registry=r,
        )
        self.preamble_rejections = Counter(
            "dbgrelay_preamble_rejections_total",
            "Tunnel preambles refused before authentication, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.backend_up = Gauge(
            "dbgrelay_backend_up",
            "1 if the last probe of the target's debug server succeeded, else 0.",
            ["target"],
            registry=r,
        )
        self.backend_connect_errors = Counter(
            "dbgrelay_backend_connect_errors_total",
            "Failed connections to a target's debug server.",
            ["target"],
            registry=r,
        )
        self.managed_servers = Gauge(
            "dbgrelay_managed_servers",
            "Debug server processes the relay runs for a target.",
            ["target"],
            registry=r,
        )
        self.idle_kills = Counter(
            "dbgrelay_idle_kills_total",
            "Managed debug servers stopped because nobody used them.",
            ["target"],
            registry=r,
        )
        self.forgotten_servers = Gauge(
            "dbgrelay_forgotten_servers",
            "Managed debug servers left running with no tunnel attached.",
            ["target"],
            registry=r,
        )
        self.audit_write_errors = Counter(
            "dbgrelay_audit_write_errors_total",
            "Audit records that could not be written.",
            registry=r,
        )
        self.refusals = Counter(
            "dbgrelay_refusals_total",
            "Connections and requests refused, by reason (limits, tokens, access, capacity).",
            ["reason"],
            registry=r,
        )
        self.unauthenticated = Gauge(
            "dbgrelay_unauthenticated_connections",
            "Connections accepted and not yet through the token check.",
            registry=r,
        )
        self.accept_errors = Counter(
            "dbgrelay_accept_errors_total",
            "accept() failures for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM), by errno.",
            ["errno"],
            registry=r,
        )
        self.accept_paused = Gauge(
            "dbgrelay_accept_paused",
            "1 while accepting is backing off for lack of resources, else 0.",
            registry=r,
        )
        self.admin_refusals = Counter(
            "dbgrelay_admin_refusals_total",
            "Admin API requests refused for want of credentials, by reason.",
            ["reason"],
            registry=r,
        )
        self.state_up = Gauge(
            "dbgrelay_state_up",
            "1 while the shared state database is reachable, 0 during an outage; "
            "only with the postgres backend.",
            ["backend"],
            registry=r,
        )
        self.state_outages = Counter(
            "dbgrelay_state_outages_total",
            "Times the shared state database became unreachable.",
            registry=r,
        )
        self.state_notifications = Counter(
            "dbgrelay_state_notifications_total",
            "Revocation notifications received from the shared state database.",
            registry=r,
        )
        self.build_info = Gauge(
            "dbgrelay_build_info", "Always 1; the version is a label.", ["version"], registry=r
        )
        # (family, number of labels) for every labelled family; metric_names() needs it.
        self.labelled = [
            (self.sessions_active, 1),
            (self.sessions_total, 2),
            (self.session_duration, 1),
            (self.tunnel_bytes, 2),
            (self.handshakes, 1),
            (self.tls_sessions, 2),
            (self.auth_failures, 1),
            (self.preamble_rejections, 1),
            (self.backend_up, 1),
            (self.backend_connect_errors, 1),
            (self.managed_servers, 1),
            (self.idle_kills, 1),
            (self.forgotten_servers, 1),
            (self.refusals, 1),
            (self.accept_errors, 1),
            (self.admin_refusals, 1),
            (self.state_up, 1),
            (self.build_info, 1),
        ]


class _TargetSeries:
    """The labelled children of one target, looked up once."""

    __slots__ = (
        "active",
        "duration",
        "to_backend",
        "to_client",
        "connect_errors",
        "managed",
        "idle_kills",
        "forgotten",
        "outcomes",
        "_sessions_total",
        "_target",
    )

    def __init__(self, families: _Families, target: str) -> None:
        f = families
        self.active = f.sessions_active.labels(target)
        self.duration = f.session_duration.labels(target)
        self.to_backend = f.tunnel_bytes.labels(target, "to_backend")
        self.to_client = f.tunnel_bytes.labels(target, "to_client")
        self.connect_errors = f.backend_connect_errors.labels(target)
        self.managed = f.managed_servers.labels(target)
        self.idle_kills = f.idle_kills.labels(target)
        self.forgotten = f.forgotten_servers.labels(target)
        self._sessions_total = f.sessions_total
        self._target = target
        self.outcomes = {o: f.sessions_total.labels(target, o) for o in SESSION_OUTCOMES}

    def outcome(self, outcome: str) -> Counter:
        child = self.outcomes.get(outcome)
        if child is None:
            child = self.outcomes[outcome] = self._sessions_total.labels(self._target, outcome)
        return child


class Metrics:
    """Live metrics in a private registry.

    Every per-target series (and every known outcome and reason) exists from
    the start with value 0, so dashboards show a flat line instead of "no
    data" and ``rate()`` counts the first event.  ``dbgrelay_backend_up`` is
    the exception: it appears with the first probe result, because a 0 before
    any probe ran would fire the "backend down" alert for a healthy target.

    A target not named at construction (added by a reload) gets its series on
    first use.

    Args:
        version: The relay's version, exported as ``dbgrelay_build_info{version}``.
        targets: Names of the configured targets.

    Attributes:
        registry: The registry holding every ``dbgrelay_*`` family.
    """

    def __init__(self, *, version: str, targets: Iterable[str] = ()) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self._f = _Families(self.registry)
        self._targets: dict[str, _TargetSeries] = {}
        for target in targets:
            self._series(target)
        self._handshakes = {o: self._f.handshakes.labels(o) for o in HANDSHAKE_OUTCOMES}
        self._auth = {r: self._f.auth_failures.labels(r) for r in AUTH_FAILURE_REASONS}
        self._refusals = {r: self._f.refusals.labels(r) for r in REFUSAL_REASONS}
        self._f.accept_paused.set(0)
        self._f.build_info.labels(version).set(1)

    def _series(self, target: str) -> _TargetSeries:
        series = self._targets.get(target)
        if series is None:
            series = self._targets[target] = _TargetSeries(self._f, target)
        return series

    def session_opened(self, target: str) -> None:
        """Count a tunnel that passed authentication and reached its backend."""
        self._series(target).active.inc()

    def session_closed(self, target: str, *, outcome: str, duration: float) -> None:
        """Count a closed tunnel.

        Args:
            target: The target the tunnel was for.
            outcome: The close reason (``client_closed``, ``idle``, ...).
            duration: Seconds the tunnel was open.
        """
        series = self._series(target)
        series.active.dec()
        series.outcome(outcome).inc()
        series.duration.observe(duration)

    def add_bytes(self, target: str, *, to_backend: int, to_client: int) -> None:
        """Add relayed bytes; the pump calls this in batches, not per chunk."""
        series = self._series(target)
        if to_backend:
            series.to_backend.inc(to_backend)
        if to_client:
            series.to_client.inc(to_client)

    def handshake(self, outcome: str, *, seconds: float | None = None) -> None:
        """Count an incoming connection's handshake outcome.

        Args:
            outcome: ``ok``, ``tls_error``, ``timeout``, ``refused`` or
                ``cert_revoked`` (a revoked client certificate, stdlib engine).
            seconds: How long the TLS handshake took, when it finished.
        """
        child = self._handshakes.get(outcome)
        if child is None:
            child = self._handshakes[outcome] = self._f.handshakes.labels(outcome)
        child.inc()
        if seconds is not None:
            self._f.tls_handshake_seconds.observe(seconds)

    def tls_session(self, version: str, group: str) -> None:
        """Count a finished handshake by protocol version and key-exchange group."""
        self._f.tls_sessions.labels(version, group).inc()

    def auth_failure(self, reason: str) -> None:
        """Count a tunnel refused because of its token (the ``AuthError`` reason)."""
        child = self._auth.get(reason)
        if child is None:
            child = self._auth[reason] = self._f.auth_failures.labels(reason)
        child.inc()

    def preamble_rejected(self, status: int) -> None:
        """Count a preamble refused with an HTTP status (400, 405, 408, ...)."""
        self._f.preamble_rejections.labels(str(status)).inc()

    def backend_up(self, target: str, up: bool) -> None:
        """Record the result of the latest probe of a target's debug server."""
        self._f.backend_up.labels(target).set(1 if up else 0)

    def backend_connect_error(self, target: str) -> None:
        """Count a failed connection to a target's debug server."""
        self._series(target).connect_errors.inc()

    def managed_servers(self, target: str, count: int) -> None:
        """Set how many debug server processes run for a target."""
        self._series(target).managed.set(count)

    def idle_kill(self, target: str) -> None:
        """Count a managed debug server stopped for being idle."""
        self._series(target).idle_kills.inc()

    def forgotten_server(self, target: str, forgotten: bool) -> None:
        """Mark whether the target's managed server runs with nobody attached.

        This sets the gauge (1 or 0) rather than adding to it, so reporting
        the same state twice does not drift.
        """
        self._series(target).forgotten.set(1 if forgotten else 0)

    def audit_write_error(self) -> None:
        """Count an audit record that could not be written."""
        self._f.audit_write_errors.inc()

    def refusal(self, reason: str) -> None:
        """Count a refused connection or request (``handshake_rate``, ``expired``, ...)."""
        child = self._refusals.get(reason)
        if child is None:
            child = self._refusals[reason] = self._f.refusals.labels(reason)
        child.inc()

    def unauthenticated(self, count: int) -> None:
        """Set how many connections wait for their token check."""
        self._f.unauthenticated.set(count)

    def accept_error(self, errno_name: str) -> None:
        """Count an ``accept()`` that failed for lack of resources."""
        self._f.accept_errors.labels(errno_name).inc()

    def accept_paused(self, paused: bool) -> None:
        """Mark whether accepting is backing off."""
        self._f.accept_paused.set(1 if paused else 0)

    def admin_refused(self, reason: str) -> None:
        """Count an admin request refused with 401 or 403."""
        self._f.admin_refusals.labels(reason).inc()

    def state_up(self, up: bool) -> None:
        """Whether the shared state database (postgres backend) is reachable."""
        self._f.state_up.labels("postgres").set(1 if up else 0)

    def state_outage(self) -> None:
        """Count an outage of the shared state database (once per episode)."""
        self._f.state_outages.inc()

    def state_notification(self) -> None:
        """Count a revocation notification from the shared state database."""
        self._f.state_notifications.inc()

    def render(self) -> tuple[bytes, str]:
        """Return the exposition body and its ``Content-Type``."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def metric_names(self) -> set[str]:
        """Every sample name this registry can emit.

        Includes the suffixed names (``_bucket``, ``_sum``, ``_count``,
        ``_created``) exactly as :func:`prometheus_client.generate_latest`
        writes them, whether or not a series exists yet.
        """
        from prometheus_client import CollectorRegistry

        scratch = CollectorRegistry()
        # A labelled family emits no sample until it has a child: give each one.
        for family, n_labels in _Families(scratch).labelled:
            family.labels(*["x"] * n_labels)
        return {sample.name for metric in scratch.collect() for sample in metric.samples}


class NilMetrics:
    """Metrics that record nothing, for tests and for a relay without a metrics endpoint."""

    def session_opened(self, target: str) -> None:
        """Do nothing."""

    def session_closed(self, target: str, *, outcome: str, duration: float) -> None:
        """Do nothing."""

    def add_bytes(self, target: str, *, to_backend: int, to_client: int) -> None:
        """Do nothing."""

    def handshake(self, outcome: str, *, seconds: float | None = None) -> None:
        """Do nothing."""

    def tls_session(self, version: str, group: str) -> None:
        """Do nothing."""

    def auth_failure(self, reason: str) -> None:
        """Do nothing."""

    def preamble_rejected(self, status: int) -> None:
        """Do nothing."""

    def backend_up(self, target: str, up: bool) -> None:
        """Do nothing."""

    def backend_connect_error(self, target: str) -> None:
        """Do nothing."""

    def managed_servers(self, target: str, count: int) -> None:
        """Do nothing."""

    def idle_kill(self, target: str) -> None:
        """Do nothing."""

    def forgotten_server(self, target: str, forgotten: bool) -> None:
        """Do nothing."""

    def audit_write_error(self) -> None:
        """Do nothing."""

    def refusal(self, reason: str) -> None:
        """Do nothing."""

    def unauthenticated(self, count: int) -> None:
        """Do nothing."""

    def accept_error(self, errno_name: str) -> None:
        """Do nothing."""

    def accept_paused(self, paused: bool) -> None:
        """Do nothing."""

    def admin_refused(self, reason: str) -> None:
        """Do nothing."""

    def state_up(self, up: bool) -> None:
        """Do nothing."""

    def state_outage(self) -> None:
        """Do nothing."""

    def state_notification(self) -> None:
        """Do nothing."""

    def render(self) -> tuple[bytes, str]:
        """Return an empty exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return b"", CONTENT_TYPE_LATEST

    def metric_names(self) -> set[str]:
        """Return an empty set: nothing is emitted."""
        return set()
