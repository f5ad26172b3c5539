"""Parsing ``host:port`` addresses and backend URLs: the one parser of both.

Listen addresses in the config (``relay.listen``, ``metrics.listen``,
``admin.listen``), the connector's ``--relay`` and ``--listen`` and the
HTTP endpoints' listeners are all read by :func:`parse_host_port`, so they
accept the same forms and fail with the same messages::

    invalid address "::1:7443": put IPv6 addresses in brackets; write "host:port" like "127.0.0.1:7443" or "[::1]:7443"

Sans-IO: nothing here resolves a name or opens a socket.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from .schema import Address, Backend, NpipeBackend, TcpBackend, UnixBackend

__all__ = [
    "BACKEND_FORMS",
    "LISTEN_FORMS",
    "PORT_PLACEHOLDER",
    "parse_backend_url",
    "parse_host_port",
    "parse_listen_address",
    "same_socket",
]

_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"\d{1,5}")
#: What a managed target's backend URL says where the relay's port goes.
PORT_PLACEHOLDER = "{port}"

#: The accepted forms of an address, as problem lines show them.
LISTEN_FORMS = 'write "host:port" like "127.0.0.1:7443" or "[::1]:7443"'
#: The accepted forms of a backend URL, as problem lines show them.
BACKEND_FORMS = "use tcp://HOST:PORT, unix:///abs/path or npipe://HOST/PIPE"


def _is_host_name(host: str) -> bool:
    """A DNS name (letters, digits, ``-`` and ``_`` in dot-separated labels)."""
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return False
    # An all-numeric last label is a mistyped IPv4 address, not a name
    # (RFC 3696 section 2).
    return not labels[-1].isdigit()


def _check_host(host: str, text: str, what: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _is_host_name(host):
            raise ValueError(
                f"invalid {what} {json.dumps(text)}: {json.dumps(host)} is not an IP "
                "address or a host name"
            ) from None


def _split_host_port(
    text: str, what: str, forms: str, *, whole: str | None = None
) -> tuple[str, str]:
    """Split ``host:port`` or ``[v6]:port`` into host (no brackets) and port text.

    ``whole`` is the full value to quote in messages when ``text`` is part of
    it (the authority of a URL).
    """
    whole = text if whole is None else whole
    shown = json.dumps(whole)
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError(f'invalid {what} {shown}: missing "]" after the IPv6 address; {forms}')
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f'invalid {what} {shown}: missing ":PORT" after "]"; {forms}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid {what} {shown}: {json.dumps(host)} in brackets is not an IPv6 address"
            ) from None
        return host, rest[1:]
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f'invalid {what} {shown}: missing ":PORT"; {forms}')
    if ":" in host:
        raise ValueError(f"invalid {what} {shown}: put IPv6 addresses in brackets; {forms}")
    if not host:
        raise ValueError(f"invalid {what} {shown}: missing host; {forms}")
    _check_host(host, whole, what)
    return host, port_text


def _parse_port(port_text: str, text: str, what: str, *, lowest: int) -> int:
    if not _PORT.fullmatch(port_text) or not lowest <= int(port_text) <= 65535:
        raise ValueError(
            f"invalid {what} {json.dumps(text)}: the port must be a number from "
            f"{lowest} to 65535, got {json.dumps(port_text)}"
        )
    return int(port_text)


def parse_host_port(text: str, *, lowest_port: int = 0) -> Address:
    """Parse ``host:port`` or ``[v6]:port``: every address the relay and connector read.

    Args:
        text: ``"host:port"`` where host is an IPv4 address or a host name, or
            ``"[v6]:port"``.
        lowest_port: The smallest port accepted: 0 (any free port) where the
            address is bound, 1 where it is connected to.

    Returns:
        ``(host, port)`` with IPv6 hosts unbracketed: ``"[::1]:7443"`` gives
        ``("::1", 7443)``.

    Raises:
        ValueError: the text is not in that form; the message quotes it and
            shows the accepted form.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid address {text!r}: {LISTEN_FORMS}")
    host, port_text = _split_host_port(text, "address", LISTEN_FORMS)
    return host, _parse_port(port_text, text, "address", lowest=lowest_port)


def parse_listen_address(text: str) -> Address:
    """Parse a listen address for ``relay.listen``, ``metrics`` or ``admin``.

    :func:`parse_host_port` with port 0 allowed (any free port).

    Raises:
        ValueError: the text is not in that form.
    """
    return parse_host_port(text, lowest_port=0)


def parse_backend_url(text: str) -> Backend:
    """Parse a target's ``backend`` URL.

    Args:
        text: ``tcp://HOST:PORT`` (HOST an IP literal, ``[v6]`` or a name;
            PORT 1-65535 or the literal ``{port}`` for managed targets),
            ``unix:///abs/path`` or ``npipe://HOST/PIPE`` (HOST ``.`` for this
            machine), or WinDbg's ``npipe:pipe=NAME`` /
            ``npipe:server=HOST,pipe=NAME``.

    Returns:
        A :class:`TcpBackend` (port ``None`` for ``{port}``),
        :class:`UnixBackend` or :class:`NpipeBackend`.  Whether the URL is
        usable here (``{port}`` only with ``launch``, named pipes only on
        Windows) is checked by the loader, which knows the target.

    Raises:
        ValueError: the URL is malformed; the message quotes it and shows the
            accepted forms.
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid backend {text!r}: {BACKEND_FORMS}")
    shown = json.dumps(text)
    if text[:6].lower() == "npipe:" and not text[6:].startswith("//"):
        return _parse_windbg_npipe(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"invalid backend {shown}: {BACKEND_FORMS}")
    scheme = scheme.lower()
    if scheme == "tcp":
        if "/" in rest:
            raise ValueError(
                f"invalid backend {shown}: tcp:// URLs end after the port; {BACKEND_FORMS}"
            )
        host, port_text = _split_host_port(rest, "backend", BACKEND_FORMS, whole=text)
        if port_text == PORT_PLACEHOLDER:
            return TcpBackend(host=host, port=None)
        return TcpBackend(host=host, port=_parse_port(port_text, text, "backend", lowest=1))
    if scheme == "unix":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                f"invalid backend {shown}: unix:// needs an absolute socket path, "
                "like unix:///run/dbgsrv.sock"
            )
        if "\0" in rest:
            raise ValueError(f"invalid backend {shown}: the socket path contains a NUL byte")
        return UnixBackend(path=Path(rest))
    if scheme == "npipe":
        host, slash, pipe = rest.partition("/")
        if not slash or not pipe or "/" in pipe or "\\" in pipe or len(pipe) > 256:
            raise ValueError(
                f"invalid backend {shown}: expected npipe://HOST/PIPE with one pipe name, "
                "like npipe://./dbgsrv"
            )
        if host != ".":
            if not host:
                raise ValueError(
                    f'invalid backend {shown}: missing host; use "." for this machine, '
                    "like npipe://./dbgsrv"
                )
            _check_host(host, text, "backend")
        _check_pipe_format(pipe, shown)
        return NpipeBackend(host=host, pipe=pipe)
    raise ValueError(
        f"invalid backend {shown}: unknown scheme {json.dumps(scheme)}; {BACKEND_FORMS}"
    )


_PIPE_FORMAT = re.compile(r"%(.?)")


def _check_pipe_format(pipe: str, shown: str) -> None:
    """Only WinDbg's ``%d``, ``%x`` (the server's process id) and ``%%`` may follow a ``%``."""
    for match in _PIPE_FORMAT.finditer(pipe):
        if match.group(1) not in ("d", "x", "%"):
            raise ValueError(
                f"invalid backend {shown}: in a pipe name % may only start %d or %x (the "
                "debug server's process id) or %% (a percent sign)"
            )


def _parse_windbg_npipe(text: str) -> NpipeBackend:
    """WinDbg's own pipe syntax: ``npipe:pipe=NAME`` or ``npipe:server=HOST,pipe=NAME``.

    The same string a debug server was started with (``cdb -server
    npipe:pipe=NAME``, ``dbgsrv -t npipe:pipe=NAME``) or a client connects with.
    """
    shown = json.dumps(text)
    form = "npipe:pipe=NAME or npipe:server=HOST,pipe=NAME"
    fields: dict[str, str] = {}
    for item in text[len("npipe:") :].split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("pipe", "server") or key in fields or not value:
            raise ValueError(f"invalid backend {shown}: expected {form}")
        fields[key] = value
    pipe = fields.get("pipe")
    if pipe is None or "/" in pipe or "\\" in pipe or len(pipe) > 256:
        raise ValueError(f"invalid backend {shown}: expected {form} with one pipe name")
    _check_pipe_format(pipe, shown)
    host = fields.get("server", ".")
    if host != ".":
        _check_host(host, text, "backend")
    return NpipeBackend(host=host, pipe=pipe)


def same_socket(a: Address, b: Address) -> bool:
    """Whether binding both addresses would fail (same port, overlapping host)."""
    if a[1] != b[1]:
        return False
    if a[0] == b[0]:
        return True
    # A wildcard bind takes the port on every address of its family.
    wildcards = {"0.0.0.0": 4, "::": 6}
    for host, other in ((a[0], b[0]), (b[0], a[0])):
        if host in wildcards:
            try:
                return ipaddress.ip_address(other).version == wildcards[host]
            except ValueError:
                return True  # a host name may resolve to anything
    return False
