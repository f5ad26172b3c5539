"""The table the bench prints: absolute figures and each path's ratio to stunnel."""

from __future__ import annotations

from collections.abc import Sequence

from .workloads import Metric

__all__ = ["ratios", "format_table", "format_value"]


def format_value(value: float | None) -> str:
    """Three significant digits, thousands separated; ``-`` for no value."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _value(results: dict, path: str, metric: Metric) -> float | None:
    record = results.get(path, {}).get(metric.workload)
    if not record or record.get("status") != "ok":
        return None
    return record["metrics"].get(metric.key)


def ratios(results: dict, paths: Sequence[str], metrics: Sequence[Metric]) -> dict:
    """``{path: {metric key: value / stunnel's value}}`` where both exist."""
    table: dict[str, dict[str, float]] = {}
    for path in paths:
        for metric in metrics:
            if not metric.to_stunnel:
                continue
            value = _value(results, path, metric)
            base = _value(results, "stunnel", metric)
            if value is not None and base:
                table.setdefault(path, {})[metric.key] = value / base
    return table


def format_table(
    results: dict,
    paths: Sequence[str],
    metrics: Sequence[Metric],
    machine: dict,
    method: Sequence[str],
) -> str:
    """One plain-text table: a row per metric, a column per path, ``value (ratio x)``."""
    ratio = ratios(results, paths, metrics)
    head = [
        f"dbgrelay bench {machine['date']}  kernel {machine['kernel']}  "
        f"{machine['cpu_model']} x{machine['cpus']}",
        f"Python {machine['python']}  {machine['openssl_stdlib']} (ssl)  "
        f"{machine['openssl_cryptography'] or '?'} (cryptography)  "
        f"{machine['stunnel'] or 'no stunnel'}"
        + (f" ({machine['stunnel_openssl']})" if machine.get("stunnel_openssl") else ""),
        *method,
        "cells: value (value / stunnel's value); the 'better' column says which way is good",
        "",
    ]
    rows = [["workload", "unit", "better", *paths]]
    for metric in metrics:
        cells = [metric.label, metric.unit, metric.better]
        for path in paths:
            record = results.get(path, {}).get(metric.workload)
            if record is None:
                cells.append("skipped")
                continue
            if record.get("status") != "ok":
                cells.append(record.get("status", "error"))
                continue
            text = format_value(record["metrics"].get(metric.key))
            if metric.key in ratio.get(path, {}):
                text += f" ({ratio[path][metric.key]:.2f}x)"
            cells.append(text)
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        left = [row[i].ljust(widths[i]) for i in range(3)]
        right = [row[i].rjust(widths[i]) for i in range(3, len(row))]
        lines.append("  ".join(left + right).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(head + lines)
