"""The one escaping helper, and the outputs for people that use it."""

from __future__ import annotations

import logging

import pytest
import trio

from relay.cli import TextFormatter, _err, _say, _table
from relay.connector import RelayRefused
from relay.printable import escape_text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("alice", "alice"),
        ("zoë 日本", "zoë 日本"),  # printable text is left alone
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x1b]0;title\x07\x1b[2J", "\\x1b]0;title\\x07\\x1b[2J"),  # C0
        ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),  # DEL, C1 (NEL, CSI)
        ("\u202egnp.exe\u2066\u200b", "\\u202egnp.exe\\u2066\\u200b"),  # bidi, zero width
        ("\u2028\u2029\u00a0", "\\u2028\\u2029\\xa0"),  # line/paragraph separators, NBSP
        ("\U000e0041\udc80", "\\U000e0041\\udc80"),  # tag character, lone surrogate
    ],
)
def test_escape_text_leaves_printable_text_and_escapes_the_rest(raw, shown):
    assert escape_text(raw) == shown
    assert escape_text(raw).isprintable()


def test_text_log_lines_cannot_be_forged_or_drive_the_terminal():
    record = logging.LogRecord("audit", logging.INFO, __file__, 1, "token.rejected", (), None)
    record.claimed_sub = "x\n12:00:00 info    token.accepted sub=admin\x1b[2J"
    try:
        raise ValueError("boom\n12:00:00 info    forged")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()

    text = TextFormatter().format(record)

    first, *trace = text.split("\n")
    assert first.endswith(
        "token.rejected claimed_sub=x\\n12:00:00 info    token.accepted sub=admin\\x1b[2J"
    )
    assert trace and all(line.startswith("  ") for line in trace)
    assert all(line.isprintable() for line in text.split("\n"))


def test_cli_tables_escape_what_peers_sent(capsys):
    _err("problem one\x1b[2J\nproblem two")
    _table([{"user": "m\x1b[31mallory", "target": "t\u202e"}], ["user", "target"])
    _say("ended session s1 of mal\nlory\x1b[2J")

    out, err = capsys.readouterr()
    assert err == "dbgrelay: problem one\\x1b[2J\ndbgrelay: problem two\n"
    assert out.splitlines()[1:] == [
        "m\\x1b[31mallory  t\\u202e",
        "ended session s1 of mal\\nlory\\x1b[2J",
    ]


async def test_connect_prints_a_relay_refusal_as_one_escaped_line(monkeypatch, capsys, tmp_path):
    from relay import cli, connector

    async def preflight(settings):
        raise RelayRefused(403, "not_allowed", "go away\x1b]0;pwned\x07\ndbgrelay: fake line")

    monkeypatch.setattr(connector, "preflight", preflight)
    token = tmp_path / "token"
    token.write_text("x.y.z")
    args = cli.build_parser().parse_args(
        ["connect", "--relay", "127.0.0.1:1", "--target", "t", "--token-file", str(token)]
    )

    code = await trio.to_thread.run_sync(args.func, args)

    assert code == cli.EXIT_REFUSED
    assert capsys.readouterr().err == (
        "dbgrelay: relay refused the tunnel: 403 not_allowed: "
        "go away\\x1b]0;pwned\\x07\\ndbgrelay: fake line\n"
    )


def test_logging_set_up_by_the_cli_does_not_walk_the_stack(monkeypatch):
    # Neither formatter shows where an event came from, so no record looks
    # for it: the lookup costs every log line, and the frames it touches stay
    # materialised for as long as their coroutine (a tunnel's session).
    from relay.cli import setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logging, "_srcfile", logging._srcfile)
    records = []
    setup_logging("json", "info")
    monkeypatch.setattr(root.handlers[0], "emit", records.append)
    logging.getLogger("dbgrelay.test").info("tunnel.opened", extra={"target": "t"})
    [record] = records
    assert record.lineno == 0 and record.funcName == "(unknown function)"
