"""One-shot commands: ``keys init``, ``certs init``, ``token issue``, ``check-config``."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path

import jwt

from .support import config_text, run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_init_writes_private_keys_owner_only(tmp_path: Path) -> None:
    # umask 0 would leave 0666 files: the modes must not depend on the caller's umask.
    done = run_cli("keys", "init", "--out", "keys", cwd=tmp_path, umask=0)

    assert done.returncode == 0, done.stderr
    keys = tmp_path / "keys"
    assert _mode(keys / "signing.key") == 0o600
    assert _mode(keys / "audit.key") == 0o600
    assert json.loads((keys / "jwks.json").read_text())["keys"][0]["crv"] == "Ed25519"
    assert (keys / "audit.pub").read_text().strip()


def test_certs_init_writes_private_keys_owner_only(tmp_path: Path) -> None:
    done = run_cli(
        "certs", "init", "--out", "pki", "--host", "127.0.0.1", "--host", "localhost",
        cwd=tmp_path, umask=0,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    pki = tmp_path / "pki"
    assert _mode(pki / "ca.key") == 0o600
    assert _mode(pki / "server.key") == 0o600
    assert (pki / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (pki / "server.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def _b64(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_token_issue_prints_only_the_jwt_on_stdout(home: Path) -> None:
    done = run_cli(
        "token", "issue", "--key", "keys/signing.key", "--user", "alice", "--target", "build42",
        "--ttl", "2h", cwd=home,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n", done.stdout), (
        done.stdout
    )
    token = done.stdout.strip()
    header, payload = _b64(token.split(".")[0]), _b64(token.split(".")[1])
    assert header["alg"] == "EdDSA"
    assert payload["sub"] == "alice" and payload["targets"] == ["build42"]
    assert payload["exp"] - payload["iat"] in (7200, 7201)
    # It verifies against the public keys the relay is configured with.
    jwks = jwt.PyJWKSet.from_json((home / "keys" / "jwks.json").read_text())
    claims = jwt.decode(
        token, jwks[header["kid"]], algorithms=["EdDSA"], audience="dbgrelay", issuer="dbgrelay"
    )
    assert claims["jti"] == payload["jti"]


def test_check_config_reports_every_problem_one_per_line(home: Path) -> None:
    text = config_text(
        [
            {"name": "build42", "kind": "gdbsrv", "backend": "tcp://127.0.0.1:1"},
            {"name": "build43", "kind": "tcp", "backend": "tcp://127.0.0.1:2", "idle_timeout": -5},
        ]
    )
    text = text.replace('state_dir = "state"', 'state_dir = "state"\nidle_timeot = "5s"')
    text = text.replace('cert = "pki/server.pem"', 'cert = "pki/missing.pem"')
    (home / "dbgrelay.toml").write_text(text)

    done = run_cli("check-config", "--config", "dbgrelay.toml", cwd=home)

    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 4, done.stderr
    for line in lines:
        assert line.startswith("dbgrelay: dbgrelay.toml: "), line
    keys = sorted(line.split(": ")[2] for line in lines)
    assert keys == [
        "relay.idle_timeot",
        "targets[0].kind",
        "targets[1].idle_timeout",
        "tls.cert",
    ], lines
    assert any("missing.pem" in line for line in lines), lines


def test_check_config_names_unusable_key_file_without_traceback(home: Path) -> None:
    (home / "pki" / "server.key").write_text("not a key\n")
    (home / "dbgrelay.toml").write_text(
        config_text([{"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:1"}])
    )

    done = run_cli("check-config", "--config", "dbgrelay.toml", cwd=home)

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "server.key" in lines[0], lines


def test_check_config_accepts_a_valid_config(home: Path) -> None:
    (home / "dbgrelay.toml").write_text(
        config_text([{"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:1"}])
    )

    done = run_cli("check-config", "--config", "dbgrelay.toml", cwd=home)

    assert done.returncode == 0, done.stderr
    assert "ok (1 targets)" in done.stderr
