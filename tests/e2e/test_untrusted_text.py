"""Text a client chose never reaches a terminal or a text log raw.

A real relay, run with ``--log-format text``, refuses a tunnel whose token
claims a ``sub`` full of terminal escape sequences, a newline followed by a
fake log line, and a bidi override; a second, valid token has such a ``sub``
too and keeps a tunnel open.  The relay's log, ``dbgrelay audit show`` and
``dbgrelay sessions`` are read as raw bytes: no control or format character
gets through, and no line is forged.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import time
import unicodedata
from pathlib import Path

from auth import issue_token, load_signing_key

from .support import DBGRELAY, READY_TIMEOUT, clean_env, config_text
from .test_audit_crash import tunnel

FORGED = "12:00:00 info    token.accepted sub=admin target=echo"
EVIL_SUB = (
    "mallory\x1b]0;owned window title\x07\x1b[2J\x1b[H"  # set the title, clear the screen
    f"\n{FORGED}\r\n"  # a whole fake log line
    "\u202egnp.exe\x7f\x9b31m\u2028end"  # bidi override, DEL, C1 CSI, line separator
)
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (debug|info|warning|error) +\S")


def b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def unsigned_token(sub: str) -> str:
    """A JWT-shaped token with the given claims and a signature that is not one."""
    return ".".join(
        [b64({"alg": "EdDSA", "typ": "JWT"}), b64({"sub": sub, "jti": "j\x1b[5m"}), "AAAA"]
    )


def assert_safe(data: bytes, what: str) -> str:
    """``data`` decodes as UTF-8 and has no character that acts on a terminal."""
    text = data.decode("utf-8")
    for line in text.split("\n"):
        bad = [c for c in line if not c.isprintable()]
        assert not bad, f"{what}: raw {[unicodedata.name(c, hex(ord(c))) for c in bad]} in {line!r}"
    return text


def test_a_claimed_sub_with_escapes_and_newlines_cannot_reach_terminal_or_log(
    home: Path,
    echo_port: int,  # noqa: F811 - the fixture
) -> None:
    (home / "dbgrelay.toml").write_text(
        config_text([{"name": "echo", "kind": "tcp", "backend": f"tcp://127.0.0.1:{echo_port}"}])
    )
    env = clean_env(home)
    log_path = home / "relay.log"
    with open(log_path, "wb") as log:
        relay = subprocess.Popen(
            [*DBGRELAY, "--log-format", "text", "serve", "--config", "dbgrelay.toml"],
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not (found := re.search(rb"relay\.listening address=(\S+)", log_path.read_bytes())):
            assert relay.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        relay_addr = found.group(1).decode()

        refused = tunnel(home, relay_addr, unsigned_token(EVIL_SUB))
        assert refused.status == b"401"
        refused.close()
        valid = issue_token(
            load_signing_key(home / "keys" / "signing.key"),
            user=EVIL_SUB,
            targets=["echo"],
            ttl=600,
            issuer="dbgrelay",
            audience="dbgrelay",
            now=time.time(),
        )
        live = tunnel(home, relay_addr, valid)
        assert live.status == b"200"

        listed = subprocess.run(
            [*DBGRELAY, "sessions", "--config", "dbgrelay.toml"],
            cwd=home,
            env=env,
            capture_output=True,
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
        table = assert_safe(listed.stdout, "dbgrelay sessions")
        assert len(table.splitlines()) == 2  # the header and one row
        assert "mallory\\x1b]0;owned window title\\x07" in table
        live.close()
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(READY_TIMEOUT)

    log_text = assert_safe(log_path.read_bytes(), "the text log")
    for line in log_text.splitlines():
        assert LOG_LINE.match(line), f"not a log line: {line!r}"
    rejected = [line for line in log_text.splitlines() if " token.rejected " in line]
    assert len(rejected) == 2  # the audit logger's record and the session's
    assert any("claimed_sub=mallory\\x1b]0;owned window title\\x07" in line for line in rejected)
    assert f"\\n{FORGED}\\r\\n\\u202egnp.exe\\x7f\\x9b31m\\u2028end" in log_text

    (relay_file,) = (home / "state" / "audit").glob("relay-*.jsonl")
    shown = subprocess.run(
        [*DBGRELAY, "audit", "show", str(relay_file)],
        cwd=home,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    timeline = assert_safe(shown.stdout, "dbgrelay audit show")
    lines = timeline.splitlines()
    # One line per record, each a header or a record line: none forged.
    assert len(lines) == relay_file.read_bytes().count(b"\n")
    record_line = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  [+-]\d+\.\d{3}s  \S")
    assert all(line.startswith("# ") or record_line.match(line) for line in lines), lines
    (row,) = [line for line in lines if " token.rejected " in line]
    # Inside a quoted value JSON's escapes show C0 controls; the rest are ours.
    assert "mallory\\u001b]0;owned window title\\u0007\\u001b[2J\\u001b[H\\n" in row
    assert "\\u202egnp.exe\\x7f\\x9b31m\\u2028end" in row
    assert "claimed_jti=j\\x1b[5m" in row
