"""Tests for relay.metrics: values read back through the text exposition."""

from __future__ import annotations

import inspect

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import (
    AUTH_FAILURE_REASONS,
    SESSION_OUTCOMES,
    Metrics,
    NilMetrics,
)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Parse the exposition into {(sample name, labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_per_target_series_exist_at_zero_before_any_event():
    m = Metrics(version="1.2.3", targets=["win", "linux"])
    for target in ("win", "linux"):
        assert value(m, "dbgrelay_sessions_active", target=target) == 0
        assert value(m, "dbgrelay_managed_servers", target=target) == 0
        assert value(m, "dbgrelay_forgotten_servers", target=target) == 0
        assert value(m, "dbgrelay_idle_kills_total", target=target) == 0
        assert value(m, "dbgrelay_backend_connect_errors_total", target=target) == 0
        assert value(m, "dbgrelay_session_duration_seconds_count", target=target) == 0
        for direction in ("to_backend", "to_client"):
            assert value(m, "dbgrelay_tunnel_bytes_total", target=target, direction=direction) == 0
        for outcome in SESSION_OUTCOMES:
            assert value(m, "dbgrelay_sessions_total", target=target, outcome=outcome) == 0
    for reason in AUTH_FAILURE_REASONS:
        assert value(m, "dbgrelay_auth_failures_total", reason=reason) == 0
    for outcome in ("ok", "tls_error", "timeout", "refused", "cert_revoked"):
        assert value(m, "dbgrelay_handshakes_total", outcome=outcome) == 0
    # No probe has run: a 0 here would fire the backend-down alert.
    assert value(m, "dbgrelay_backend_up", target="win") is None
    assert value(m, "dbgrelay_build_info", version="1.2.3") == 1


def test_session_lifecycle():
    m = Metrics(version="t", targets=["win"])
    m.session_opened("win")
    m.session_opened("win")
    assert value(m, "dbgrelay_sessions_active", target="win") == 2
    m.session_closed("win", outcome="idle", duration=0.5)
    m.session_closed("win", outcome="client_closed", duration=7200.0)
    assert value(m, "dbgrelay_sessions_active", target="win") == 0
    assert value(m, "dbgrelay_sessions_total", target="win", outcome="idle") == 1
    assert value(m, "dbgrelay_sessions_total", target="win", outcome="client_closed") == 1
    assert value(m, "dbgrelay_session_duration_seconds_count", target="win") == 2
    assert value(m, "dbgrelay_session_duration_seconds_sum", target="win") == 7200.5
    bucket = "dbgrelay_session_duration_seconds_bucket"
    assert value(m, bucket, target="win", le="1.0") == 1
    assert value(m, bucket, target="win", le="3600.0") == 1
    assert value(m, bucket, target="win", le="7200.0") == 2
    assert value(m, bucket, target="win", le="28800.0") == 2


def test_unlisted_outcome_and_new_target_are_counted():
    m = Metrics(version="t", targets=["win"])
    m.session_opened("added-by-reload")
    m.session_closed("added-by-reload", outcome="backend_refused", duration=3)
    assert (
        value(m, "dbgrelay_sessions_total", target="added-by-reload", outcome="backend_refused")
        == 1
    )
    assert value(m, "dbgrelay_sessions_active", target="added-by-reload") == 0


def test_add_bytes_accumulates_each_direction():
    m = Metrics(version="t", targets=["win"])
    m.add_bytes("win", to_backend=100, to_client=0)
    m.add_bytes("win", to_backend=5, to_client=4096)
    assert value(m, "dbgrelay_tunnel_bytes_total", target="win", direction="to_backend") == 105
    assert value(m, "dbgrelay_tunnel_bytes_total", target="win", direction="to_client") == 4096


def test_handshakes_and_latency():
    m = Metrics(version="t")
    m.handshake("ok", seconds=0.003)
    m.handshake("ok", seconds=0.2)
    m.handshake("timeout")
    assert value(m, "dbgrelay_handshakes_total", outcome="ok") == 2
    assert value(m, "dbgrelay_handshakes_total", outcome="timeout") == 1
    assert value(m, "dbgrelay_tls_handshake_seconds_count") == 2
    assert value(m, "dbgrelay_tls_handshake_seconds_bucket", le="0.005") == 1
    assert value(m, "dbgrelay_tls_handshake_seconds_bucket", le="0.25") == 2
    m.tls_session("TLSv1.3", "X25519MLKEM768")
    assert value(m, "dbgrelay_tls_sessions_total", version="TLSv1.3", group="X25519MLKEM768") == 1


def test_refusals():
    m = Metrics(version="t")
    m.auth_failure("expired")
    m.auth_failure("expired")
    m.auth_failure("something_new")
    m.preamble_rejected(408)
    assert value(m, "dbgrelay_auth_failures_total", reason="expired") == 2
    assert value(m, "dbgrelay_auth_failures_total", reason="something_new") == 1
    assert value(m, "dbgrelay_preamble_rejections_total", status="408") == 1


def test_backend_and_managed_server_state():
    m = Metrics(version="t", targets=["gdb"])
    m.backend_up("gdb", True)
    assert value(m, "dbgrelay_backend_up", target="gdb") == 1
    m.backend_up("gdb", False)
    assert value(m, "dbgrelay_backend_up", target="gdb") == 0
    m.backend_connect_error("gdb")
    assert value(m, "dbgrelay_backend_connect_errors_total", target="gdb") == 1
    m.managed_servers("gdb", 3)
    assert value(m, "dbgrelay_managed_servers", target="gdb") == 3
    m.idle_kill("gdb")
    assert value(m, "dbgrelay_idle_kills_total", target="gdb") == 1
    # Reporting the same state twice must not drift.
    m.forgotten_server("gdb", True)
    m.forgotten_server("gdb", True)
    assert value(m, "dbgrelay_forgotten_servers", target="gdb") == 1
    m.forgotten_server("gdb", False)
    assert value(m, "dbgrelay_forgotten_servers", target="gdb") == 0
    m.audit_write_error()
    assert value(m, "dbgrelay_audit_write_errors_total") == 1


def test_negative_byte_count_is_refused():
    m = Metrics(version="t", targets=["win"])
    with pytest.raises(ValueError):
        m.add_bytes("win", to_backend=-1, to_client=0)


def test_registries_are_private():
    a = Metrics(version="t", targets=["win"])
    b = Metrics(version="t", targets=["win"])
    a.idle_kill("win")
    assert value(a, "dbgrelay_idle_kills_total", target="win") == 1
    assert value(b, "dbgrelay_idle_kills_total", target="win") == 0
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("dbgrelay") for name in global_names)


def exercise(m) -> None:
    m.session_opened("t")
    m.session_closed("t", outcome="idle", duration=1.0)
    m.add_bytes("t", to_backend=1, to_client=1)
    m.handshake("ok", seconds=0.01)
    m.tls_session("TLSv1.3", "X25519")
    m.auth_failure("expired")
    m.preamble_rejected(400)
    m.backend_up("t", True)
    m.backend_connect_error("t")
    m.managed_servers("t", 1)
    m.idle_kill("t")
    m.forgotten_server("t", True)
    m.audit_write_error()
    m.refusal("handshake_rate")
    m.unauthenticated(3)
    m.accept_error("EMFILE")
    m.accept_paused(True)
    m.admin_refused("peer_not_allowed")
    m.state_up(False)
    m.state_outage()
    m.state_notification()


def test_metric_names_is_exactly_what_render_emits():
    fresh = Metrics(version="t")
    names_before = fresh.metric_names()
    exercise(fresh)
    emitted = {name for name, _labels in samples(fresh)}
    assert emitted == names_before
    assert {
        "dbgrelay_sessions_total",
        "dbgrelay_session_duration_seconds_bucket",
        "dbgrelay_tls_handshake_seconds_sum",
        "dbgrelay_backend_up",
        "dbgrelay_build_info",
    } <= names_before


def test_nil_metrics_mirrors_metrics():
    public = {
        name
        for name, member in inspect.getmembers(Metrics, inspect.isfunction)
        if not name.startswith("_")
    }
    for name in public:
        nil = getattr(NilMetrics, name, None)
        assert nil is not None, f"NilMetrics lacks {name}"
        assert inspect.signature(nil) == inspect.signature(getattr(Metrics, name)), name
    nil = NilMetrics()
    exercise(nil)
    body, content_type = nil.render()
    assert body == b""
    assert content_type.startswith("text/plain")
    assert nil.metric_names() == set()
