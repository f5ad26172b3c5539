"""The Dockerfile cannot be built here (no container engine): check it statically,
and run its HEALTHCHECK command against a real metrics endpoint."""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from functools import partial

import trio

from relay.httpd import metrics_handler, open_http_listeners, serve_http
from relay.metrics import NilMetrics

from ._util import DEPLOY

DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "container" / "Dockerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends with a line continuation"
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def only(keyword: str) -> str:
    [args] = [args for kw, args in instructions() if kw == keyword]
    return args


def test_base_image_and_install():
    assert only("FROM") == "python:3.11-slim"
    assert ("COPY", ". /src") in instructions()
    assert any(kw == "RUN" and "pip install /src" in args for kw, args in instructions())
    for keyword, args in instructions():
        assert not (keyword == "ADD" and re.search(r"https?://", args)), args


def test_runs_as_a_non_root_user():
    user = only("USER").split(":")[0]
    assert user not in ("root", "0")
    # The uid the image creates is the one it switches to.
    assert any(
        kw == "RUN" and f"--uid {user}" in args and "useradd" in args for kw, args in instructions()
    )


def test_ports_volume_and_command():
    assert only("EXPOSE").split() == ["7443", "9464"]
    assert json.loads(only("VOLUME")) == ["/var/lib/dbgrelay"]
    assert json.loads(only("ENTRYPOINT")) == ["dbgrelay"]
    assert json.loads(only("CMD")) == ["serve", "--config", "/etc/dbgrelay/dbgrelay.toml"]


def healthcheck_command() -> list[str]:
    args = only("HEALTHCHECK")
    assert "--interval=" in args and "--timeout=" in args
    exec_form = args[args.index("CMD ") + len("CMD ") :]
    command = json.loads(exec_form)
    assert command[0] == "python"
    assert "http://127.0.0.1:9464/healthz" in command[-1]
    return command


async def test_healthcheck_command_passes_on_healthz_and_fails_otherwise():
    command = healthcheck_command()
    async with trio.open_nursery() as nursery:
        listeners = await open_http_listeners("127.0.0.1:0")
        listeners = await nursery.start(
            partial(serve_http, listeners, metrics_handler(NilMetrics()))
        )
        port = listeners[0].socket.getsockname()[1]
        # The container's python, pointed at this test's port.
        healthy = [sys.executable, *command[1:-1], command[-1].replace("9464", str(port))]
        ok = await trio.run_process(healthy, check=False, capture_stderr=True)
        # A 404 (wrong path) must count as unhealthy.
        wrong_path = [*healthy[:-1], healthy[-1].replace("/healthz", "/nope")]
        bad = await trio.run_process(wrong_path, check=False, capture_stderr=True)
        nursery.cancel_scope.cancel()
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0
    # Nothing listening also counts as unhealthy.
    down = [*healthy[:-1], healthy[-1].replace(f":{port}/", ":1/")]
    refused = await trio.run_process(down, check=False, capture_stderr=True)
    assert refused.returncode != 0


def ignored(path: str) -> bool:
    """Whether the ignore file drops ``path`` (last matching rule wins, like Docker)."""
    result = False
    for rule in DOCKERIGNORE.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!")
        candidates = {pattern, pattern.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for p in prefixes + parts for c in candidates):
            result = not negate
    return result


def test_build_context_keeps_the_package_and_drops_secrets():
    for needed in (
        "pyproject.toml",
        "README.md",
        "relay/cli.py",
        "auth/tokens.py",
        "config/load.py",
    ):
        assert not ignored(needed), needed
    for dropped in (".git/config", ".venv/bin/python", "server.key", "certs/ca.pem", "tests/x.py"):
        assert ignored(dropped), dropped


def test_creates_the_target_account_and_documents_the_capabilities_for_launch():
    runs = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert "--uid 10002" in runs and "dbgrelay-target" in runs
    text = DOCKERFILE.read_text()
    for cap in ("SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"):
        assert f"--cap-add {cap}" in text, cap
    assert 'relay.user = "dbgrelay"' in text
