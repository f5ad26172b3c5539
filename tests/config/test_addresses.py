"""Listen addresses and backend URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import (
    NpipeBackend,
    TcpBackend,
    UnixBackend,
    format_address,
    parse_backend_url,
    parse_host_port,
    parse_listen_address,
)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7443", ("127.0.0.1", 7443)),
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("[::1]:7443", ("::1", 7443)),
        ("[::]:7443", ("::", 7443)),
        ("localhost:9464", ("localhost", 9464)),
        ("relay.example.com:7443", ("relay.example.com", 7443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
        ("[2001:db8::7]:1", ("2001:db8::7", 1)),
    ],
)
def test_listen_address_good(text: str, address: tuple[str, int]) -> None:
    assert parse_listen_address(text) == address
    assert format_address(address) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", 'missing ":PORT"'),
        ("::1:7443", "put IPv6 addresses in brackets"),
        (":7443", "missing host"),
        ("[::1]7443", 'missing ":PORT" after "]"'),
        ("[::1:7443", 'missing "]"'),
        ("[127.0.0.1]:80", "is not an IPv6 address"),
        ("127.0.0.1:65536", "from 0 to 65535"),
        ("127.0.0.1:-1", "from 0 to 65535"),
        ("127.0.0.1:http", "from 0 to 65535"),
        ("127.0.0.1:", "from 0 to 65535"),
        ("1.2.3.999:80", "is not an IP address or a host name"),
        ("bad host:80", "is not an IP address or a host name"),
        ("-bad.example:80", "is not an IP address or a host name"),
        ("relay..example:80", "is not an IP address or a host name"),
        ("[relay.example.com]:80", "in brackets is not an IPv6 address"),
        ("2001:db8::7:7443", "put IPv6 addresses in brackets"),
        ("[::1]", 'missing ":PORT" after "]"'),
    ],
)
def test_listen_address_bad(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen_address(text)
    message = str(info.value)
    assert expected in message
    assert f'"{text}"' in message


def test_an_address_to_connect_to_needs_a_port_from_1() -> None:
    # Port 0 only makes sense for a socket that is bound, not connected to.
    assert parse_host_port("[::1]:1", lowest_port=1) == ("::1", 1)
    assert parse_host_port("relay.example.com:65535", lowest_port=1) == (
        "relay.example.com",
        65535,
    )
    for port in ("0", "65536"):
        with pytest.raises(ValueError) as info:
            parse_host_port(f"relay.example.com:{port}", lowest_port=1)
        assert str(info.value) == (
            f'invalid address "relay.example.com:{port}": the port must be a number '
            f'from 1 to 65535, got "{port}"'
        )


def test_listen_address_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match='"host:port"'):
        parse_listen_address(7443)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "backend"),
    [
        ("tcp://10.0.5.42:5005", TcpBackend("10.0.5.42", 5005)),
        ("tcp://[::1]:5005", TcpBackend("::1", 5005)),
        ("tcp://build42.lab.example:2159", TcpBackend("build42.lab.example", 2159)),
        ("TCP://10.0.5.42:1", TcpBackend("10.0.5.42", 1)),
        ("tcp://127.0.0.1:{port}", TcpBackend("127.0.0.1", None)),
        ("unix:///run/dbgsrv.sock", UnixBackend(Path("/run/dbgsrv.sock"))),
        ("npipe://./dbgsrv", NpipeBackend(".", "dbgsrv")),
        ("npipe://build42/kd_pipe", NpipeBackend("build42", "kd_pipe")),
        # WinDbg's own syntax, as given to cdb -server or dbgsrv -t.
        ("npipe:pipe=dbgsrv", NpipeBackend(".", "dbgsrv")),
        ("npipe:server=build42,pipe=kd_pipe", NpipeBackend("build42", "kd_pipe")),
        ("NPIPE:Pipe=a,Server=10.0.5.42", NpipeBackend("10.0.5.42", "a")),
        # WinDbg's process-id formats in pipe names.
        ("npipe:pipe=dbg%d", NpipeBackend(".", "dbg%d")),
        ("npipe://./kd%x-100%%", NpipeBackend(".", "kd%x-100%%")),
    ],
)
def test_backend_url_good(url: str, backend: object) -> None:
    assert parse_backend_url(url) == backend


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("10.0.5.42:5005", "use tcp://HOST:PORT, unix:///abs/path or npipe://HOST/PIPE"),
        ("http://10.0.5.42:80", 'unknown scheme "http"'),
        ("tcp://10.0.5.42", 'missing ":PORT"'),
        ("tcp://10.0.5.42:0", "from 1 to 65535"),
        ("tcp://10.0.5.42:65536", "from 1 to 65535"),
        ("tcp://10.0.5.42:5005/x", "end after the port"),
        ("tcp://::1:5005", "put IPv6 addresses in brackets"),
        ("tcp://:5005", "missing host"),
        ("unix://dbgsrv.sock", "needs an absolute socket path"),
        ("unix://", "needs an absolute socket path"),
        ("npipe://./", "one pipe name"),
        ("npipe://build42", "one pipe name"),
        ("npipe://./a/b", "one pipe name"),
        ("npipe:///dbgsrv", "missing host"),
        ("npipe:server=build42", "npipe:pipe=NAME or npipe:server=HOST,pipe=NAME"),
        ("npipe:pipe=", "npipe:pipe=NAME or npipe:server=HOST,pipe=NAME"),
        ("npipe:pipe=a,pipe=b", "npipe:pipe=NAME or npipe:server=HOST,pipe=NAME"),
        ("npipe:pipe=a,port=5", "npipe:pipe=NAME or npipe:server=HOST,pipe=NAME"),
        ("npipe:pipe=a/b", "one pipe name"),
        ("npipe:server=bad host,pipe=a", "is not an IP address or a host name"),
        ("npipe:pipe=dbg%s", "% may only start %d or %x"),
        ("npipe:pipe=dbg%", "% may only start %d or %x"),
        ("npipe://./dbg%20x", "% may only start %d or %x"),
    ],
)
def test_backend_url_bad(url: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_backend_url(url)
    assert expected in str(info.value)
    assert f'"{url}"' in str(info.value)


def test_backend_strings_read_back_as_urls() -> None:
    assert str(TcpBackend("10.0.5.42", 5005)) == "tcp://10.0.5.42:5005"
    assert str(TcpBackend("::1", None)) == "tcp://[::1]:{port}"
    assert str(UnixBackend(Path("/run/x.sock"))) == "unix:///run/x.sock"
    assert str(NpipeBackend(".", "dbgsrv")) == "npipe://./dbgsrv"
    assert NpipeBackend("build42", "dbgsrv").path == "\\\\build42\\pipe\\dbgsrv"


def test_tcp_backend_with_port_fills_in_the_managed_port() -> None:
    managed = parse_backend_url("tcp://127.0.0.1:{port}")
    assert isinstance(managed, TcpBackend)
    picked = managed.with_port(40123)
    assert picked == TcpBackend("127.0.0.1", 40123)
    assert managed.port is None
    with pytest.raises(ValueError, match="1-65535"):
        managed.with_port(0)
    with pytest.raises(ValueError, match="1-65535"):
        managed.with_port(70000)


@pytest.mark.parametrize(
    ("pipe", "names_process", "for_1234"),
    [
        ("dbgsrv", False, "dbgsrv"),
        ("dbg%d", True, "dbg1234"),
        ("kd-%x", True, "kd-4d2"),
        ("%d-%x", True, "1234-4d2"),
        ("100%%d", False, "100%d"),  # %% is a percent sign, so no %d here
        ("a%%%d", True, "a%1234"),
    ],
)
def test_pipe_names_with_windbg_process_id_formats(
    pipe: str, names_process: bool, for_1234: str
) -> None:
    backend = NpipeBackend(".", pipe)
    assert backend.names_process is names_process
    assert backend.for_process(1234) == NpipeBackend(".", for_1234)
