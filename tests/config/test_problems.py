"""Every kind of mistake gives one clear line naming the file, key and fix."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from config import ConfigError, config_from_dict, load_config
from config.schema import file_keys, file_tables

from .support import MINIMAL, problems_of, write_config

F = "dbgrelay.toml"


def target(body: str, name: str = "t") -> str:
    """A [[targets]] table with the given extra lines."""
    return f'[[targets]]\nname = "{name}"\n{body}\n'


TCP = 'kind = "tcp"\nbackend = "tcp://10.0.5.42:5005"'


# -- unknown keys and tables --------------------------------------------------


def test_unknown_key_names_the_known_keys(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + '[relay]\nidle_timeout = "5m"\n')
    assert line == (
        f"{F}: relay.idle_timeout: unknown key (it belongs in [[targets]]); known keys: "
        "listen, state_dir, audit_dir, handshake_timeout, close_timeout, shutdown_grace, "
        "max_sessions, revocation_interval, checkpoint_interval, audit_fsync_interval, "
        "final_write_timeout, session_end_timeout, server_stop_timeout, proxy_protocol, "
        "proxy_trusted, user, run_as, data_plane"
    )


def test_misspelt_key_gets_a_suggestion(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + '[relay]\nhandshake_timout = "5s"\n')
    assert line.startswith(
        f'{F}: relay.handshake_timout: unknown key (did you mean "handshake_timeout"?); known keys: '
    )


def test_unknown_key_in_a_target(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + target(TCP + "\nport = 5005"))
    assert line.startswith(f"{F}: targets[0].port: unknown key; known keys: name, kind, backend,")


def test_unknown_tables_and_top_level_keys(config_dir: Path) -> None:
    lines = problems_of(config_dir, 'listen = "x"\n' + MINIMAL + "[logging]\nlevel = 1\n")
    known = "known tables: relay, tls, auth, identity, metrics, admin, limits, state, targets"
    assert lines == [f"{F}: listen: unknown key; {known}", f"{F}: logging: unknown table; {known}"]


def test_single_targets_table_instead_of_an_array(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + f"[targets]\n{TCP}\n")
    assert line == (
        f"{F}: targets: expected [[targets]] tables (an array of tables), got a single "
        "[targets] table; write [[targets]]"
    )


def test_section_that_is_not_a_table(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, 'relay = "fast"\n' + MINIMAL)
    assert line == f'{F}: relay: expected a [relay] table, got "fast"'


# -- wrong types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "[relay]\nmax_sessions = true",
            "relay.max_sessions: expected a positive integer, got true",
        ),
        ("[relay]\nmax_sessions = 0", "relay.max_sessions: expected a positive integer, got 0"),
        (
            '[relay]\nmax_sessions = "10"',
            'relay.max_sessions: expected a positive integer, got "10"',
        ),
        (
            "[relay]\nmax_sessions = 10.0",
            "relay.max_sessions: expected a positive integer, got 10.0",
        ),
        ("[relay]\nstate_dir = 5", "relay.state_dir: expected a file path, got 5"),
        ('[relay]\nstate_dir = ""', 'relay.state_dir: expected a file path, got ""'),
        ("[tls]\nmin_version = 1.3", 'tls.min_version: expected "1.2" or "1.3", got 1.3'),
        ('[tls]\nmin_version = "1.1"', 'tls.min_version: expected "1.2" or "1.3", got "1.1"'),
        (
            '[tls]\nengine = "boringssl"',
            'tls.engine: expected "stdlib" or "pyopenssl", got "boringssl"',
        ),
        (
            '[tls]\nrequire_client_cert = "yes"',
            'tls.require_client_cert: expected true or false, got "yes"',
        ),
        ("[auth]\nissuer = 5", "auth.issuer: expected a non-empty string, got 5"),
        ('[auth]\naudience = ""', 'auth.audience: expected a non-empty string, got ""'),
        (
            "[metrics]\nlisten = 9464",
            'metrics.listen: expected "host:port" like "127.0.0.1:7443", got 9464',
        ),
    ],
)
def test_wrong_types_in_sections(config_dir: Path, lines: str, expected: str) -> None:
    section, assignment = lines.split("\n")
    # Put the key into the section MINIMAL already has, or add the section.
    text = MINIMAL.replace(f"{section}\n", f"{section}\n{assignment}\n")
    if section not in MINIMAL:
        text = MINIMAL + lines + "\n"
    assert problems_of(config_dir, text) == [f"{F}: {expected}"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('record = "yes"', 'record: expected true or false, got "yes"'),
        ("end_on_token_expiry = 1", "end_on_token_expiry: expected true or false, got 1"),
        ("record_max_bytes = 0", "record_max_bytes: expected a positive integer, got 0"),
        ("record_max_bytes = false", "record_max_bytes: expected a positive integer, got false"),
        (
            'allow = "alice"',
            'allow: expected a list of user names like ["alice", "bob"], got "alice"',
        ),
        (
            'allow = ["alice", 7]',
            'allow: expected a list of user names like ["alice", "bob"], got ["alice", 7]',
        ),
        (
            'on_idle = "kill-dbgsrv build42"',
            "on_idle: expected a non-empty list of strings, the program first, like "
            '["gdbserver", "--once", "127.0.0.1:{port}", "/path/prog"], got "kill-dbgsrv build42"',
        ),
        ("require_pq = 1", "require_pq: expected true or false, got 1"),
    ],
)
def test_wrong_types_in_targets(config_dir: Path, line: str, expected: str) -> None:
    assert problems_of(config_dir, MINIMAL + target(f"{TCP}\n{line}")) == [
        f"{F}: targets[0].{expected}"
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('name = "build 42"', "targets[0].name: expected 1-64 letters, digits"),
        ('name = "-build"', "targets[0].name: expected 1-64 letters, digits"),
        (f'name = "{"x" * 65}"', "targets[0].name: expected 1-64 letters, digits"),
        ("name = 42", "targets[0].name: expected a non-empty string, got 42"),
        (
            'kind = "windbg"',
            'targets[0].kind: expected "dbgsrv" or "kdsrv" or "server" or "gdbserver" or "tcp", got "windbg"',
        ),
    ],
)
def test_bad_target_name_and_kind(config_dir: Path, lines: str, expected: str) -> None:
    body = '[[targets]]\nkind = "tcp"\nbackend = "tcp://10.0.5.42:5005"\nname = "t"\n'
    key = lines.split(" = ")[0]
    body = (
        "\n".join(line for line in body.splitlines() if not line.startswith(f"{key} ="))
        + f"\n{lines}\n"
    )
    (line,) = problems_of(config_dir, MINIMAL + body)
    assert line.startswith(f"{F}: {expected}")


def test_missing_required_target_keys(config_dir: Path) -> None:
    lines = problems_of(config_dir, MINIMAL + "[[targets]]\n")
    assert lines == [
        f'{F}: targets[0].name: required key is missing; a unique target name, like name = "build42"',
        f"{F}: targets[0].kind: required key is missing; one of dbgsrv, kdsrv, server, gdbserver, tcp",
        f'{F}: targets[0].backend: required key is missing; where the debug server listens, like backend = "tcp://10.0.5.42:5005"',
    ]


def test_targets_entry_that_is_not_a_table(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, "targets = [1]\n" + MINIMAL)
    assert line == f"{F}: targets[0]: expected a [[targets]] table, got 1"


# -- durations ------------------------------------------------------------------


def test_negative_duration(config_dir: Path) -> None:
    text = MINIMAL + target(TCP, "a") + target(TCP + "\nidle_timeout = -5", "b")
    assert problems_of(config_dir, text) == [
        f'{F}: targets[1].idle_timeout: expected a duration like "30s", "15m" or "8h", got -5'
    ]


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('connect_timeout = "5 minutes"', '"5 minutes"'),
        ('connect_timeout = "30m1h"', '"30m1h"'),
        ("connect_timeout = true", "true"),
        ("connect_timeout = [5]", "[5]"),
        ("connect_timeout = nan", "nan"),
        ("connect_timeout = inf", "inf"),
    ],
)
def test_malformed_durations(config_dir: Path, line: str, shown: str) -> None:
    assert problems_of(config_dir, MINIMAL + target(f"{TCP}\n{line}")) == [
        f'{F}: targets[0].connect_timeout: expected a duration like "30s", "15m" or "8h", got {shown}'
    ]


@pytest.mark.parametrize(
    "key",
    [
        "handshake_timeout",
        "revocation_interval",
        "checkpoint_interval",
        "final_write_timeout",
        "session_end_timeout",
        "server_stop_timeout",
    ],
)
def test_zero_where_a_positive_duration_is_needed(config_dir: Path, key: str) -> None:
    assert problems_of(config_dir, MINIMAL + f'[relay]\n{key} = "0s"\n') == [
        f'{F}: relay.{key}: expected a duration like "30s", "15m" or "8h" and greater than 0, got "0s"'
    ]


@pytest.mark.parametrize(
    "key", ["connect_timeout", "idle_timeout", "launch_timeout", "on_idle_timeout"]
)
def test_zero_target_timeouts_are_rejected(config_dir: Path, key: str) -> None:
    (line,) = problems_of(config_dir, MINIMAL + target(f"{TCP}\n{key} = 0"))
    assert line.startswith(f"{F}: targets[0].{key}: expected a duration")
    assert line.endswith("greater than 0, got 0")


# -- duplicate names ------------------------------------------------------------


def test_duplicate_target_names(config_dir: Path) -> None:
    text = MINIMAL + "".join(target(TCP, name) for name in ["build42", "a", "b", "build42"])
    assert problems_of(config_dir, text) == [
        f'{F}: targets[3].name: duplicate target name "build42" (also targets[0])'
    ]


# -- files that cannot be read ------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "required"),
    [
        ("tls", "cert", True),
        ("tls", "key", True),
        ("auth", "jwks", True),
        ("tls", "client_ca", False),
        ("auth", "audit_key", False),
    ],
)
def test_missing_files(config_dir: Path, section: str, key: str, required: bool) -> None:
    text = MINIMAL.replace(f"[{section}]\n", f'[{section}]\n{key} = "missing.pem"\n', 1)
    if required:
        text = "\n".join(
            line for line in MINIMAL.splitlines() if not line.startswith(f"{key} =")
        ).replace(f"[{section}]", f'[{section}]\n{key} = "missing.pem"')
    (line,) = problems_of(config_dir, text)
    assert line == (
        f"{F}: {section}.{key}: cannot read {config_dir / 'missing.pem'}: No such file or directory"
    )


def test_ocsp_response_missing_file(config_dir: Path) -> None:
    text = MINIMAL.replace("[tls]\n", '[tls]\nengine = "pyopenssl"\nocsp_response = "gone.der"\n')
    assert problems_of(config_dir, text) == [
        f"{F}: tls.ocsp_response: cannot read {config_dir / 'gone.der'}: No such file or directory"
    ]


def test_directory_instead_of_a_file(config_dir: Path) -> None:
    (config_dir / "certs").mkdir()
    text = MINIMAL.replace('cert = "server.pem"', 'cert = "certs"')
    assert problems_of(config_dir, text) == [
        f"{F}: tls.cert: cannot read {config_dir / 'certs'}: Is a directory"
    ]


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root reads any file; POSIX modes"
)
def test_unreadable_key(config_dir: Path) -> None:
    (config_dir / "server.key").chmod(0)
    assert problems_of(config_dir, MINIMAL) == [
        f"{F}: tls.key: cannot read {config_dir / 'server.key'}: Permission denied"
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_place_of_a_file_does_not_hang(config_dir: Path) -> None:
    os.mkfifo(config_dir / "jwks.fifo")
    text = MINIMAL.replace('jwks = "jwks.json"', 'jwks = "jwks.fifo"')
    assert problems_of(config_dir, text) == [
        f"{F}: auth.jwks: cannot read {config_dir / 'jwks.fifo'}: not a regular file"
    ]


def test_missing_tls_and_auth_sections(config_dir: Path) -> None:
    lines = problems_of(config_dir, "")
    assert [line.split(": ")[1] for line in lines] == ["tls.cert", "tls.key", "auth.jwks"]
    assert all("required key is missing" in line for line in lines)


# -- TLS cross-checks ---------------------------------------------------------------


def test_require_client_cert_needs_client_ca(config_dir: Path) -> None:
    text = MINIMAL.replace("[tls]\n", "[tls]\nrequire_client_cert = true\n")
    assert problems_of(config_dir, text) == [
        f"{F}: tls.require_client_cert: needs tls.client_ca, the CA bundle client "
        "certificates are verified against"
    ]


def test_require_pq_needs_the_pyopenssl_engine(config_dir: Path) -> None:
    text = MINIMAL.replace("[tls]\n", "[tls]\nrequire_pq = true\n") + target(
        f"{TCP}\nrequire_pq = true"
    )
    reason = "; the stdlib engine cannot limit key exchange to post-quantum groups"
    assert problems_of(config_dir, text) == [
        f'{F}: tls.require_pq: needs tls.engine = "pyopenssl"{reason}',
        f'{F}: targets[0].require_pq: needs tls.engine = "pyopenssl"{reason}',
    ]


def test_ocsp_stapling_needs_the_pyopenssl_engine(config_dir: Path) -> None:
    text = MINIMAL.replace("[tls]\n", '[tls]\nocsp_response = "ocsp.der"\n')
    assert problems_of(config_dir, text) == [
        f'{F}: tls.ocsp_response: needs tls.engine = "pyopenssl"; the stdlib engine '
        "cannot staple OCSP responses"
    ]


# -- backends -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("10.0.5.42:5005", 'invalid backend "10.0.5.42:5005": use tcp://HOST:PORT'),
        ("ssh://10.0.5.42:22", 'invalid backend "ssh://10.0.5.42:22": unknown scheme "ssh"'),
        (
            "tcp://10.0.5.42:0",
            'invalid backend "tcp://10.0.5.42:0": the port must be a number from 1 to 65535',
        ),
        (
            "unix://dbg.sock",
            'invalid backend "unix://dbg.sock": unix:// needs an absolute socket path',
        ),
    ],
)
def test_bad_backend_urls(config_dir: Path, backend: str, expected: str) -> None:
    (line,) = problems_of(config_dir, MINIMAL + target(f'kind = "tcp"\nbackend = "{backend}"'))
    assert line.startswith(f"{F}: targets[0].backend: {expected}")


def test_backend_must_be_a_string(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + target('kind = "tcp"\nbackend = 5005'))
    assert line == (
        f"{F}: targets[0].backend: expected a string URL (use tcp://HOST:PORT, "
        "unix:///abs/path or npipe://HOST/PIPE), got 5005"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes work on Windows")
def test_npipe_backend_off_windows(config_dir: Path) -> None:
    text = (
        MINIMAL
        + target(TCP, "a")
        + target(TCP, "b")
        + target('kind = "dbgsrv"\nbackend = "npipe://./dbgsrv"', "c")
    )
    assert problems_of(config_dir, text) == [
        f"{F}: targets[2].backend: npipe:// backends need the relay to run on Windows; "
        "use tcp:// or unix://"
    ]


# -- {port} and launch ---------------------------------------------------------------


def test_port_placeholder_without_launch(config_dir: Path) -> None:
    text = MINIMAL + target('kind = "gdbserver"\nbackend = "tcp://127.0.0.1:{port}"')
    assert problems_of(config_dir, text) == [
        f"{F}: targets[0].backend: {{port}} is only allowed on targets with launch; "
        'write the real port, got "tcp://127.0.0.1:{port}"'
    ]


def test_port_placeholder_in_on_idle_without_launch(config_dir: Path) -> None:
    text = MINIMAL + target(f'{TCP}\non_idle = ["sh", "-c", "echo {{port}}"]')
    assert problems_of(config_dir, text) == [
        f"{F}: targets[0].on_idle: {{port}} is only filled in for targets with launch; "
        "write the real port number"
    ]


@pytest.mark.parametrize(
    "backend",
    ["tcp://127.0.0.1:2000", "tcp://10.0.5.42:{port}", "unix:///run/gdb.sock"],
)
def test_launch_needs_a_loopback_port_placeholder_backend(config_dir: Path, backend: str) -> None:
    text = MINIMAL + target(
        f'kind = "gdbserver"\nbackend = "{backend}"\nlaunch = ["sh", "-c", "gdbserver :{{port}}"]'
    )
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].backend: a target with launch must use backend = "tcp://127.0.0.1:{{port}}" '
        f'(or localhost / [::1]) so the relay can pick the port, got "{backend}"'
    ]


def test_launch_must_mention_the_port(config_dir: Path) -> None:
    text = MINIMAL + target(
        'kind = "gdbserver"\nbackend = "tcp://127.0.0.1:{port}"\n'
        'launch = ["sh", "-c", "gdbserver :2000"]'
    )
    assert problems_of(config_dir, text) == [
        f"{F}: targets[0].launch: must contain {{port}} where the server's listen port goes, "
        'like ["gdbserver", "--once", "127.0.0.1:{port}", "/path/prog"]'
    ]


MANAGED = 'kind = "gdbserver"\nbackend = "tcp://127.0.0.1:{port}"\n'


def test_launch_program_not_on_path(config_dir: Path) -> None:
    text = MINIMAL + target(
        MANAGED + 'launch = ["no-such-gdbserver-xyz", "127.0.0.1:{port}"]', "build42"
    )
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].launch: target "build42": program "no-such-gdbserver-xyz" was not '
        "found on PATH; install it or give its absolute path"
    ]


def test_launch_program_absolute_path_missing(config_dir: Path) -> None:
    missing = config_dir / "opt" / "gdbserver"
    text = MINIMAL + target(MANAGED + f'launch = ["{missing}", "127.0.0.1:{{port}}"]', "build42")
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].launch: target "build42": program {missing} does not exist'
    ]


def test_launch_program_not_executable(config_dir: Path) -> None:
    script = config_dir / "gdbserver.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    text = MINIMAL + target(MANAGED + f'launch = ["{script}", "{{port}}"]', "build42")
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].launch: target "build42": program {script} is not an executable file'
    ]


def test_on_idle_program_is_checked_too(config_dir: Path) -> None:
    text = MINIMAL + target(f'{TCP}\non_idle = ["kill-dbgsrv-xyz", "t"]')
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].on_idle: target "t": program "kill-dbgsrv-xyz" was not found on '
        "PATH; install it or give its absolute path"
    ]


def test_empty_launch_list(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + target(MANAGED + "launch = []"))
    assert line.startswith(f"{F}: targets[0].launch: expected a non-empty list of strings")


# -- kd_transport ---------------------------------------------------------------------


def test_kd_transport_only_for_kdsrv(config_dir: Path) -> None:
    text = MINIMAL + target(
        'kind = "dbgsrv"\nbackend = "tcp://10.0.5.42:5005"\nkd_transport = "net:port=50000"'
    )
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].kd_transport: only valid for kind = "kdsrv" targets; '
        'this target is kind = "dbgsrv"'
    ]


# -- listen addresses -------------------------------------------------------------------


def test_admin_tcp_listen_must_be_loopback(config_dir: Path) -> None:
    text = MINIMAL + '[admin]\nlisten = "0.0.0.0:9465"\n'
    assert problems_of(config_dir, text) == [
        f"{F}: admin.listen: the admin endpoint must listen on a loopback address like "
        '"127.0.0.1:9465" or "[::1]:9465", or on "unix:PATH", got "0.0.0.0:9465"'
    ]


@pytest.mark.parametrize("value", ['""', '"unix:"', "9465"])
def test_admin_listen_bad_values(config_dir: Path, value: str) -> None:
    (line,) = problems_of(config_dir, MINIMAL + f"[admin]\nlisten = {value}\n")
    assert line == (
        f'{F}: admin.listen: expected "unix:PATH" or a loopback "host:port" like '
        f'"127.0.0.1:9465", got {value}'
    )


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes are the default there")
def test_admin_pipe_is_refused_off_windows(config_dir: Path) -> None:
    text = MINIMAL + '[admin]\nlisten = "npipe:dbgrelay-admin"\n'
    assert problems_of(config_dir, text) == [
        f'{F}: admin.listen: named pipes exist only on Windows; use "unix:PATH"'
    ]


@pytest.mark.parametrize("value", ['"npipe:"', '"npipe:a\\\\b"', '"npipe:a/b"'])
def test_admin_pipe_needs_one_pipe_name(config_dir: Path, value: str) -> None:
    (line,) = problems_of(config_dir, MINIMAL + f"[admin]\nlisten = {value}\n")
    assert line.startswith(f'{F}: admin.listen: expected "npipe:NAME" with one pipe name, got ')


def test_relay_listen_entries(config_dir: Path) -> None:
    text = MINIMAL + (
        '[relay]\nlisten = ["127.0.0.1:7443", "localhost", "::1:7443", 7443, '
        '"127.0.0.1:7443", "127.0.0.1:70000"]\n'
    )
    assert problems_of(config_dir, text) == [
        f'{F}: relay.listen[1]: invalid address "localhost": missing ":PORT"; '
        'write "host:port" like "127.0.0.1:7443" or "[::1]:7443"',
        f'{F}: relay.listen[2]: invalid address "::1:7443": put IPv6 addresses in brackets; '
        'write "host:port" like "127.0.0.1:7443" or "[::1]:7443"',
        f'{F}: relay.listen[3]: expected "host:port" like "127.0.0.1:7443", got 7443',
        f'{F}: relay.listen[4]: "127.0.0.1:7443" is listed twice (also relay.listen[0])',
        f'{F}: relay.listen[5]: invalid address "127.0.0.1:70000": the port must be a '
        'number from 0 to 65535, got "70000"',
    ]


@pytest.mark.parametrize("value", ['"127.0.0.1:7443"', "[]"])
def test_relay_listen_must_be_a_non_empty_list(config_dir: Path, value: str) -> None:
    assert problems_of(config_dir, MINIMAL + f"[relay]\nlisten = {value}\n") == [
        f'{F}: relay.listen: expected a non-empty list of "host:port" strings like '
        f'["127.0.0.1:7443"], got {value}'
    ]


def test_endpoints_may_not_share_a_port(config_dir: Path) -> None:
    text = MINIMAL + (
        '[relay]\nlisten = ["0.0.0.0:7443"]\n'
        '[metrics]\nlisten = "127.0.0.1:7443"\n'
        '[admin]\nlisten = "127.0.0.1:7443"\n'
    )
    assert problems_of(config_dir, text) == [
        f"{F}: metrics.listen: 127.0.0.1:7443 clashes with relay.listen[0] (0.0.0.0:7443); "
        "give each endpoint its own port",
        f"{F}: admin.listen: 127.0.0.1:7443 clashes with relay.listen[0] (0.0.0.0:7443); "
        "give each endpoint its own port",
    ]


def test_same_port_on_other_addresses_is_fine(config_dir: Path) -> None:
    text = MINIMAL + (
        '[relay]\nlisten = ["127.0.0.2:7443"]\n'
        '[metrics]\nlisten = "[::1]:7443"\n'
        '[admin]\nlisten = "127.0.0.1:7443"\n'
    )
    write_config(config_dir, text)
    assert load_config(Path(F)).metrics.listen == ("::1", 7443)


# -- several problems, broken files ---------------------------------------------------------


def test_every_problem_is_reported_together(config_dir: Path) -> None:
    text = (
        '[relay]\nmax_sessions = -1\ncolor = "blue"\n'
        '[tls]\ncert = "nope.pem"\nkey = "server.key"\nengine = "gnutls"\n'
        '[auth]\njwks = "jwks.json"\nleeway = "soon"\n'
        + target(TCP, "x")
        + target('kind = "tcp"\nbackend = "tcp://h:0"', "x")
    )
    write_config(config_dir, text)
    with pytest.raises(ConfigError) as info:
        load_config(Path(F))
    keys = [line.split(": ")[1] for line in info.value.problems]
    assert keys == [
        "relay.color",
        "relay.max_sessions",
        "tls.cert",
        "tls.engine",
        "auth.leeway",
        "targets[1].backend",
        "targets[1].name",
    ]
    assert all(line.startswith(f"{F}: ") for line in info.value.problems)
    assert str(info.value) == "\n".join(info.value.problems)
    assert info.value.reason == "bad_config"


def test_toml_syntax_error_is_one_line_with_its_position(config_dir: Path) -> None:
    lines = problems_of(config_dir, MINIMAL + "[relay]\nmax_sessions = \n")
    assert len(lines) == 1
    assert lines[0].startswith(f"{F}: invalid TOML: ")
    assert "(at line 8, column 16)" in lines[0]


def test_missing_config_file(config_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Path("nowhere.toml"))
    assert info.value.problems == [
        f"nowhere.toml: cannot read the config file {config_dir / 'nowhere.toml'}: "
        "No such file or directory"
    ]


def test_config_path_that_is_a_directory(config_dir: Path) -> None:
    (config_dir / "conf.d").mkdir()
    with pytest.raises(ConfigError) as info:
        load_config("conf.d")
    assert info.value.problems == [
        f"conf.d: cannot read the config file {config_dir / 'conf.d'}: Is a directory"
    ]


def test_config_file_that_is_not_utf8(config_dir: Path) -> None:
    (config_dir / F).write_bytes(b'[tls]\ncert = "\xff.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(Path(F))
    assert info.value.problems == [
        f"{F}: the config file is not valid UTF-8 (bad byte at offset 14)"
    ]


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ('tls_cert = "server.pem"', "metrics.tls_key, metrics.client_ca"),
        ('tls_cert = "server.pem"\ntls_key = "server.key"', "metrics.client_ca"),
        ('client_ca = "clients-ca.pem"', "metrics.tls_cert, metrics.tls_key"),
    ],
)
def test_metrics_https_needs_certificate_key_and_client_ca_together(
    config_dir: Path, given: str, missing: str
) -> None:
    (line,) = problems_of(config_dir, MINIMAL + f"[metrics]\n{given}\n")
    first = given.split(" ", 1)[0]
    assert line == (
        f"{F}: metrics.{first}: HTTPS for /metrics needs tls_cert, tls_key and client_ca "
        f"together (scrapers must present a client certificate); add {missing}"
    )


def test_metrics_bearer_token_file_must_exist(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + '[metrics]\nbearer_token_file = "absent"\n')
    assert line.startswith(f"{F}: metrics.bearer_token_file: ")
    assert "absent" in line


def test_data_plane_names_the_drivers(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + '[relay]\ndata_plane = "epoll"\n')
    assert line.startswith(f"{F}: relay.data_plane: ")
    assert '"trio"' in line and '"thread"' in line and "epoll" in line


# -- debugger_restrictions ------------------------------------------------------------


def _debugger(config_dir: Path, name: str) -> str:
    """An executable stand-in for a debugger program, as a path relative to the config."""
    (config_dir / "bin").mkdir(exist_ok=True)
    program = config_dir / "bin" / name
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    return f"bin/{name}"


SERVER_TARGET = 'kind = "server"\nbackend = "tcp://127.0.0.1:{port}"\n'


@pytest.mark.parametrize(
    ("program", "flags"),
    [("kd", ("-noshell", "-secure")), ("cdb.exe", ("-noshell",)), ("CDB.EXE", ("-noshell",))],
)
def test_debugger_restrictions_add_the_options_the_debugger_offers(
    config_dir: Path, program: str, flags: tuple[str, ...]
) -> None:
    path = _debugger(config_dir, program)
    text = MINIMAL + target(
        SERVER_TARGET + f'launch = ["{path}", "-server", "tcp:port={{port}}", "-p", "42"]\n'
        "debugger_restrictions = true"
    )
    (loaded,) = load_config(write_config(config_dir, text)).targets
    argv = loaded.launch_command(5005)
    assert argv == (argv[0], *flags, "-server", "tcp:port=5005", "-p", "42")
    assert argv[0].endswith(program)


def test_debugger_restrictions_default_to_off(config_dir: Path) -> None:
    path = _debugger(config_dir, "cdb")
    text = MINIMAL + target(SERVER_TARGET + f'launch = ["{path}", "-server", "tcp:port={{port}}"]')
    (loaded,) = load_config(write_config(config_dir, text)).targets
    assert loaded.debugger_restrictions is False
    assert loaded.launch_command(5005)[1:] == ("-server", "tcp:port=5005")


@pytest.mark.parametrize("program", ["dbgsrv.exe", "kdsrv"])
def test_debugger_restrictions_refused_for_servers_without_them(
    config_dir: Path, program: str
) -> None:
    path = _debugger(config_dir, program)
    text = MINIMAL + target(
        SERVER_TARGET + f'launch = ["{path}", "-t", "tcp:port={{port}}"]\n'
        "debugger_restrictions = true"
    )
    assert problems_of(config_dir, text) == [
        f"{F}: targets[0].debugger_restrictions: {config_dir / 'bin' / program} offers no "
        "-noshell or -secure option (only cdb, kd, ntsd, windbg do; dbgsrv and kdsrv take "
        "neither); remove the key or launch one of those"
    ]


def test_debugger_restrictions_need_a_launch_command(config_dir: Path) -> None:
    text = MINIMAL + target(
        'kind = "server"\nbackend = "tcp://10.0.5.42:5005"\ndebugger_restrictions = true'
    )
    assert problems_of(config_dir, text) == [
        f"{F}: targets[0].debugger_restrictions: only applies to targets with launch "
        "(the relay adds the options to that command)"
    ]


def test_debugger_restrictions_must_be_a_boolean(config_dir: Path) -> None:
    path = _debugger(config_dir, "cdb")
    text = MINIMAL + target(
        SERVER_TARGET + f'launch = ["{path}", "-server", "tcp:port={{port}}"]\n'
        'debugger_restrictions = "yes"'
    )
    assert problems_of(config_dir, text) == [
        f'{F}: targets[0].debugger_restrictions: expected true or false, got "yes"'
    ]


@pytest.mark.parametrize(
    ("table", "cls"),
    [(name, cls) for name, cls in file_tables().items() if name != "targets"],
)
def test_each_table_accepts_exactly_its_schema_fields(
    config_dir: Path, table: str, cls: type
) -> None:
    # The accepted keys are the dataclass's fields in their order: a field
    # added to the schema is a key the loader accepts and the message lists.
    data: dict[str, dict[str, object]] = {
        "tls": {"cert": "server.pem", "key": "server.key"},
        "auth": {"jwks": "jwks.json"},
    }
    data.setdefault(table, {})["no_such_key"] = 1
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, base_dir=config_dir, source_name=F)
    (line,) = info.value.problems
    assert line == (
        f"{F}: {table}.no_such_key: unknown key; known keys: " + ", ".join(file_keys(cls))
    )
    assert len(file_keys(cls)) == len(dataclasses.fields(cls))
