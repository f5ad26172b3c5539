"""Valid configs load into the model with every value and default in place."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from config import (
    AdminSection,
    AuthSection,
    Config,
    ConfigError,
    MetricsSection,
    RelaySection,
    TcpBackend,
    TLSSection,
    UnixBackend,
    config_from_dict,
    load_config,
)

from .support import MINIMAL, write_config

FULL = """\
[relay]
listen = ["127.0.0.1:7443", "[::1]:7443"]
state_dir = "var/state"
audit_dir = "/var/log/dbgrelay-audit"
handshake_timeout = "12s"
close_timeout = "3s"
shutdown_grace = "1m"
max_sessions = 64
revocation_interval = "500ms"
checkpoint_interval = "10m"
audit_fsync_interval = 0
final_write_timeout = "500ms"
session_end_timeout = "20s"
server_stop_timeout = "1m"

[tls]
cert = "server.pem"
key = "server.key"
min_version = "1.3"
engine = "pyopenssl"
client_ca = "clients-ca.pem"
require_client_cert = true
require_pq = true
ocsp_response = "ocsp.der"

[auth]
issuer = "relay-admin"
audience = "lab-relay"
jwks = "jwks.json"
leeway = "45s"
audit_key = "audit.key"

[metrics]
listen = "127.0.0.1:9100"
bearer_token_file = "audit.key"
tls_cert = "server.pem"
tls_key = "server.key"
client_ca = "clients-ca.pem"

[admin]
listen = "127.0.0.1:9465"

[[targets]]
name = "build42"
kind = "dbgsrv"
backend = "tcp://10.0.5.42:5005"
allow = ["alice", "bob"]
connect_timeout = "2s"
idle_timeout = "20m"
max_session = "8h"
end_on_token_expiry = false
on_idle = ["{python}", "-c", "pass", "build42"]
on_idle_timeout = "1m"
probe_interval = "1m30s"
record = true
record_max_bytes = 1048576
require_pq = false

[[targets]]
name = "gdb-prog"
kind = "gdbserver"
backend = "tcp://127.0.0.1:{{port}}"
launch = ["{python}", "-m", "http.server", "--bind", "127.0.0.1", "{{port}}"]
launch_timeout = "20s"
kill_grace = "2s"

[[targets]]
name = "kernel.box-1"
kind = "kdsrv"
backend = "unix:///run/kdsrv.sock"
kd_transport = "net:port=50000,key=1.2.3.4"
max_session = "0"
probe_interval = "0"
"""


def test_full_config_round_trips_into_the_model(config_dir: Path) -> None:
    python = sys.executable
    path = write_config(config_dir, FULL.replace("{python}", python).replace("{{port}}", "{port}"))

    config = load_config(path)

    assert config.source == path
    assert config.relay == RelaySection(
        listen=(("127.0.0.1", 7443), ("::1", 7443)),
        state_dir=config_dir / "var" / "state",
        audit_dir=Path("/var/log/dbgrelay-audit"),
        handshake_timeout=12.0,
        close_timeout=3.0,
        shutdown_grace=60.0,
        max_sessions=64,
        revocation_interval=0.5,
        checkpoint_interval=600.0,
        audit_fsync_interval=0.0,
        final_write_timeout=0.5,
        session_end_timeout=20.0,
        server_stop_timeout=60.0,
    )
    assert config.tls == TLSSection(
        cert=config_dir / "server.pem",
        key=config_dir / "server.key",
        min_version="1.3",
        engine="pyopenssl",
        client_ca=config_dir / "clients-ca.pem",
        require_client_cert=True,
        require_pq=True,
        ocsp_response=config_dir / "ocsp.der",
    )
    assert config.auth == AuthSection(
        issuer="relay-admin",
        audience="lab-relay",
        jwks=config_dir / "jwks.json",
        leeway=45.0,
        audit_key=config_dir / "audit.key",
    )
    assert config.metrics == MetricsSection(
        listen=("127.0.0.1", 9100),
        bearer_token_file=config_dir / "audit.key",
        tls_cert=config_dir / "server.pem",
        tls_key=config_dir / "server.key",
        client_ca=config_dir / "clients-ca.pem",
    )
    assert config.metrics.tls
    assert config.admin == AdminSection(listen=("127.0.0.1", 9465))
    assert config.admin.unix_path is None

    build, gdb, kernel = config.targets
    assert build.name == "build42"
    assert build.kind == "dbgsrv"
    assert build.backend == TcpBackend("10.0.5.42", 5005)
    assert build.backend_url == "tcp://10.0.5.42:5005"
    assert build.allow == ("alice", "bob")
    assert build.allows("alice") and not build.allows("mallory")
    assert build.connect_timeout == 2.0
    assert build.idle_timeout == 1200.0
    assert build.max_session == 8 * 3600.0
    assert build.end_on_token_expiry is False
    assert build.launch is None and not build.managed
    assert build.on_idle == (python, "-c", "pass", "build42")
    assert build.on_idle_timeout == 60.0
    assert build.probe_interval == 90.0
    assert build.record is True
    assert build.record_max_bytes == 1048576
    assert build.kd_transport is None
    assert build.require_pq is False
    assert config.requires_pq(build) is False

    assert gdb.managed
    assert gdb.backend == TcpBackend("127.0.0.1", None)
    assert gdb.launch == (python, "-m", "http.server", "--bind", "127.0.0.1", "{port}")
    assert gdb.launch_command(40123)[-1] == "40123"
    assert gdb.backend.with_port(40123) == TcpBackend("127.0.0.1", 40123)
    assert gdb.launch_timeout == 20.0
    assert gdb.kill_grace == 2.0
    assert gdb.require_pq is None
    assert config.requires_pq(gdb) is True

    assert kernel.backend == UnixBackend(Path("/run/kdsrv.sock"))
    assert kernel.kd_transport == "net:port=50000,key=1.2.3.4"
    assert kernel.max_session is None
    assert kernel.probe_interval is None

    assert config.target("gdb-prog") is gdb
    assert config.target("nope") is None


def test_minimal_config_gets_every_default(config_dir: Path) -> None:
    config = load_config(write_config(config_dir, MINIMAL))

    state = config_dir / "state"
    assert config.relay == RelaySection(
        listen=(("127.0.0.1", 7443),),
        state_dir=state,
        audit_dir=state / "audit",
        handshake_timeout=10.0,
        close_timeout=5.0,
        shutdown_grace=30.0,
        max_sessions=256,
        revocation_interval=2.0,
        checkpoint_interval=5.0,
        audit_fsync_interval=2.0,
        final_write_timeout=2.0,
        session_end_timeout=10.0,
        server_stop_timeout=30.0,
    )
    assert config.tls == TLSSection(cert=config_dir / "server.pem", key=config_dir / "server.key")
    assert config.tls.min_version == "1.2"
    assert config.tls.engine == "stdlib"
    assert config.tls.client_ca is None
    assert config.tls.require_client_cert is False
    assert config.tls.require_pq is False
    assert config.tls.ocsp_response is None
    assert config.auth == AuthSection(jwks=config_dir / "jwks.json")
    assert (config.auth.issuer, config.auth.audience) == ("dbgrelay", "dbgrelay")
    assert config.auth.leeway == 30.0
    assert config.auth.audit_key is None
    assert config.metrics == MetricsSection(listen=("127.0.0.1", 9464))
    assert config.metrics.enabled and not config.metrics.tls
    assert config.metrics.bearer_token_file is None
    assert config.admin.listen == state / "admin.sock"
    assert config.admin.unix_path == state / "admin.sock"
    assert config.targets == ()


def test_target_defaults(config_dir: Path) -> None:
    text = MINIMAL + '[[targets]]\nname = "t"\nkind = "tcp"\nbackend = "tcp://10.0.0.1:22"\n'
    (target,) = load_config(write_config(config_dir, text)).targets

    assert target.allow is None and target.allows("anyone")
    assert target.connect_timeout == 5.0
    assert target.idle_timeout == 900.0
    assert target.max_session is None
    assert target.end_on_token_expiry is True
    assert target.launch is None
    assert target.launch_timeout == 10.0
    assert target.kill_grace == 5.0
    assert target.on_idle is None
    assert target.on_idle_timeout == 30.0
    assert target.probe_interval == 30.0
    assert target.record is False
    assert target.record_max_bytes == 64 * 1024 * 1024
    assert target.kd_transport is None
    assert target.require_pq is None


def test_state_dir_moves_audit_dir_and_admin_socket(config_dir: Path) -> None:
    config = load_config(write_config(config_dir, MINIMAL + '[relay]\nstate_dir = "/srv/relay"\n'))
    assert config.relay.state_dir == Path("/srv/relay")
    assert config.relay.audit_dir == Path("/srv/relay/audit")
    assert config.admin.listen == Path("/srv/relay/admin.sock")


def test_relative_paths_follow_the_config_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "dbgrelay"
    etc.mkdir(parents=True)
    (etc / "certs").mkdir()
    for name in ("certs/server.pem", "certs/server.key", "jwks.json"):
        (etc / name).write_bytes(b"placeholder\n")
    write_config(
        etc,
        '[tls]\ncert = "certs/server.pem"\nkey = "certs/server.key"\n'
        '[auth]\njwks = "jwks.json"\n[admin]\nlisten = "unix:run/admin.sock"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("../etc/dbgrelay/dbgrelay.toml"))

    assert config.source == etc / "dbgrelay.toml"
    assert config.tls.cert == etc / "certs" / "server.pem"
    assert config.relay.state_dir == etc / "state"
    assert config.admin.listen == etc / "run" / "admin.sock"


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ('"127.0.0.1:9465"', ("127.0.0.1", 9465)),
        ('"[::1]:9465"', ("::1", 9465)),
        ('"localhost:9465"', ("localhost", 9465)),
        ('"unix:/run/dbgrelay/admin.sock"', Path("/run/dbgrelay/admin.sock")),
        ('"unix:///run/dbgrelay/admin.sock"', Path("/run/dbgrelay/admin.sock")),
    ],
)
def test_admin_listen_forms(config_dir: Path, listen: str, expected: object) -> None:
    config = load_config(write_config(config_dir, MINIMAL + f"[admin]\nlisten = {listen}\n"))
    assert config.admin.listen == expected


def test_empty_metrics_listen_disables_metrics(config_dir: Path) -> None:
    config = load_config(write_config(config_dir, MINIMAL + '[metrics]\nlisten = ""\n'))
    assert config.metrics.listen is None
    assert not config.metrics.enabled


def test_bare_numbers_are_seconds(config_dir: Path) -> None:
    config = load_config(
        write_config(config_dir, MINIMAL + "[relay]\nhandshake_timeout = 7\nshutdown_grace = 2.5\n")
    )
    assert config.relay.handshake_timeout == 7.0
    assert config.relay.shutdown_grace == 2.5


def test_managed_target_on_localhost_and_ipv6_loopback(config_dir: Path) -> None:
    text = MINIMAL
    for index, host in enumerate(["localhost", "[::1]"]):
        text += (
            f'[[targets]]\nname = "m{index}"\nkind = "gdbserver"\n'
            f'backend = "tcp://{host}:{{port}}"\n'
            f'launch = ["sh", "-c", "exec gdbserver --once :{{port}} /bin/true"]\n'
        )
    first, second = load_config(write_config(config_dir, text)).targets
    assert first.backend == TcpBackend("localhost", None)
    assert second.backend == TcpBackend("::1", None)
    assert first.launch_command(5000)[2] == "exec gdbserver --once :5000 /bin/true"


def test_relative_launch_program_is_resolved_against_the_config_folder(config_dir: Path) -> None:
    program = config_dir / "bin" / "start-gdbserver"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = MINIMAL + (
        '[[targets]]\nname = "m"\nkind = "gdbserver"\nbackend = "tcp://127.0.0.1:{port}"\n'
        'launch = ["bin/start-gdbserver", "{port}"]\n'
    )
    (target,) = load_config(write_config(config_dir, text)).targets
    assert target.launch == (str(program), "{port}")


def test_byte_order_mark_is_accepted(config_dir: Path) -> None:
    path = config_dir / "dbgrelay.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(path).tls.cert == config_dir / "server.pem"


def test_config_from_dict_validates_without_a_file(config_dir: Path) -> None:
    data = {
        "tls": {"cert": config_dir / "server.pem", "key": "server.key"},
        "auth": {"jwks": "jwks.json"},
        "relay": {"listen": ("127.0.0.1:0",)},
        "targets": [{"name": "demo", "kind": "tcp", "backend": "tcp://127.0.0.1:9"}],
    }
    config = config_from_dict(data, base_dir=config_dir)
    assert isinstance(config, Config)
    assert config.source is None
    assert config.tls.key == config_dir / "server.key"
    assert config.relay.listen == (("127.0.0.1", 0),)
    assert config.target("demo") is not None

    with pytest.raises(ConfigError) as info:
        config_from_dict({"tls": {}}, base_dir=config_dir, source_name="demo")
    assert info.value.problems == [
        'demo: tls.cert: required key is missing; the PEM certificate chain the relay presents, like cert = "server.pem"',
        'demo: tls.key: required key is missing; the PEM private key of tls.cert, like key = "server.key"',
        'demo: auth.jwks: required key is missing; the JSON Web Key Set tokens are verified with, like jwks = "jwks.json"',
    ]


def test_config_error_carries_reason_and_survives_pickling() -> None:
    error = ConfigError(["a.toml: x: first", "a.toml: y: second"])
    assert error.reason == "bad_config"
    assert str(error) == "a.toml: x: first\na.toml: y: second"
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems
    assert ConfigError("one line").problems == ["one line"]


def test_model_is_frozen(config_dir: Path) -> None:
    config = load_config(write_config(config_dir, MINIMAL))
    with pytest.raises(AttributeError):
        config.relay.max_sessions = 1  # type: ignore[misc]


def test_config_package_does_not_import_trio_relay_or_auth() -> None:
    # Run in a fresh interpreter: this test process has trio loaded already.
    code = (
        "import sys, config; "
        "bad = [m for m in ('trio', 'relay', 'auth') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.stdout.strip() == ""
