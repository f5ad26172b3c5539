"""The command lines ``dbgrelay connect`` prints: pasteable into cmd.exe and PowerShell."""

from __future__ import annotations

import re

import pytest

from relay.connector import check_password, debugger_commands

# An argument both shells pass on unchanged: bare characters with no meaning
# to either, or a double-quoted string without cmd's "%" or PowerShell's "$"
# and "`" (the only characters either expands inside double quotes).
_ARG = re.compile(r'[A-Za-z0-9._:/=+\-]+|"[^"%$`]*"')


def _shell_args(line: str) -> list[str]:
    """Split ``line`` the way cmd.exe's CRT and PowerShell both would, or fail."""
    words = re.findall(r'"[^"]*"|[^ "]+', line)
    assert " ".join(words) == line, f"{line!r}: stray quote or doubled space"
    for word in words:
        assert _ARG.fullmatch(word), f"{word!r} in {line!r} is not safe in cmd.exe and PowerShell"
    return [word[1:-1] if word.startswith('"') else word for word in words]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "dbgsrv",
            [
                ["windbg", "-premote", "tcp:server=127.0.0.1,port=5005"],
                ["cdb", "-premote", "tcp:server=127.0.0.1,port=5005"],
            ],
        ),
        (
            "server",
            [
                ["windbg", "-remote", "tcp:server=127.0.0.1,port=5005"],
                ["cdb", "-remote", "tcp:server=127.0.0.1,port=5005"],
                ["kd", "-remote", "tcp:server=127.0.0.1,port=5005"],
            ],
        ),
        ("gdbserver", [["gdb", "-ex", "target remote 127.0.0.1:5005"]]),
    ],
)
def test_each_kind_prints_one_pasteable_line_per_debugger(
    kind: str, expected: list[list[str]]
) -> None:
    lines = debugger_commands(kind, "127.0.0.1", 5005)

    assert [_shell_args(line) for line in lines] == expected


def test_kdsrv_line_quotes_windbg_braces_for_powershell() -> None:
    lines = debugger_commands("kdsrv", "127.0.0.1", 5005, kd_transport="net:port=50000,key=1.2.3.4")

    spec = "kdsrv:server=@{tcp:server=127.0.0.1,port=5005},trans=@{net:port=50000,key=1.2.3.4}"
    assert [_shell_args(line) for line in lines] == [["windbg", "-k", spec], ["kd", "-k", spec]]


def test_kdsrv_without_transport_prints_no_placeholder_line() -> None:
    assert debugger_commands("kdsrv", "127.0.0.1", 5005) == []


def test_password_goes_into_every_windbg_connection_string() -> None:
    lines = debugger_commands("server", "127.0.0.1", 5005, password="Tr0ub4dor&3")

    for args in map(_shell_args, lines):
        assert args[2] == "tcp:server=127.0.0.1,port=5005,password=Tr0ub4dor&3"
    (_windbg, kd) = debugger_commands(
        "kdsrv", "127.0.0.1", 5005, kd_transport="net:port=1,key=a.b.c.d", password="pw"
    )
    assert "@{tcp:server=127.0.0.1,port=5005,password=pw}" in kd


def test_ipv6_listener_adds_ipversion_6_and_brackets_for_gdb() -> None:
    (windbg, _cdb) = debugger_commands("dbgsrv", "::1", 5005)
    assert _shell_args(windbg) == ["windbg", "-premote", "tcp:server=::1,port=5005,ipversion=6"]
    (gdb,) = debugger_commands("gdbserver", "::1", 5005)
    assert _shell_args(gdb) == ["gdb", "-ex", "target remote [::1]:5005"]
    assert debugger_commands("tcp", "::1", 5005) == ["connect your client to [::1]:5005"]


@pytest.mark.parametrize(
    "password", ["", "a b", 'a"b', "100%", "a!b", "$x", "a`b", "a,b", "{", "é"]
)
def test_password_the_shells_or_windbg_would_change_is_refused(password: str) -> None:
    with pytest.raises(ValueError, match="password"):
        check_password(password)
    with pytest.raises(ValueError, match="password"):
        debugger_commands("dbgsrv", "127.0.0.1", 5005, password=password)
