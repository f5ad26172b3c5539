"""``dbgrelay connect``: the developer's end of the tunnel.

It listens on a loopback address and, for every connection the debugger
makes, opens a TLS connection to the relay, sends ``CONNECT <target>`` with
the token, and then moves bytes.  At start-up an ``OPTIONS`` preflight checks
the token once and asks the relay what kind of debug server the target is, so
the connector can print the exact debugger command line.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from config import parse_host_port

from .credentials import TokenSource
from .datapath.sockets import open_tcp, try_receive
from .errors import RelayError, RemoteProtocolError
from .preamble import NEED_DATA, ResponseParser, TunnelResponse, render_request
from .pump import Traffic, driver_for
from .tls import ClientEngine, make_client_engine

__all__ = [
    "ConnectorSettings",
    "RelayRefused",
    "ConnectFailed",
    "check_password",
    "debugger_commands",
    "ListenFailed",
    "preflight",
    "open_tunnel",
    "serve_connector",
    "check_loopback",
]

log = logging.getLogger("dbgrelay.connect")

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)

# Tunnels being opened (TCP, TLS handshake, request) at once.  A debugger that
# opens many connections together (or a benchmark opening a thousand) would
# otherwise run every handshake at once, and their buffers, freed in between
# the tunnels that stay, leave the connector's heap at its burst size.
_OPENING_AT_ONCE = 32


class RelayRefused(RelayError):
    """The relay answered with a refusal (401, 403, 404, 502, 503...)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"relay refused the tunnel: {status} {reason}: {message}", reason=reason)
        self.status = status
        self.message = message


class ConnectFailed(RelayError):
    """The relay could not be reached or the TLS handshake failed."""


class ListenFailed(RelayError):
    """The connector cannot listen where it was told (the port is taken...)."""


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """What ``dbgrelay connect`` was told.

    Attributes:
        relay_host: The relay's host name or address.
        relay_port: The relay's TLS port.
        server_name: Name checked against the relay's certificate (default
            ``relay_host``).
        target: The target to tunnel to.
        token: The bearer token (JWT).
        listen: Loopback ``(host, port)`` for the debugger; port 0 picks one.
        engine: The client TLS engine.
        handshake_timeout: Seconds for TLS plus the relay's answer.
        token_source: Where a fresh token comes from; when set, its current
            token is sent instead of ``token``.
        data_plane: Who moves an open tunnel's bytes, as ``relay.data_plane``
            (:func:`relay.pump.driver_for`).
        tls_sessions: The newest TLS session of each relay (by host, port
            and server name) with the engine that made it (``None`` when the
            relay gave that engine no ticket), resumed by the next tunnel to
            it through that engine: a resumed
            handshake skips the certificate exchange.  The relay checks the
            token of every tunnel, resumed or not.
    """

    relay_host: str
    relay_port: int
    server_name: str
    target: str
    token: str
    listen: tuple[str, int]
    engine: ClientEngine
    handshake_timeout: float = 15.0
    token_source: TokenSource | None = None
    data_plane: str = "auto"
    tls_sessions: dict[tuple[str, int, str], tuple[ClientEngine, object]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def current_token(self) -> str:
        """The token the next request sends."""
        return self.token_source.token if self.token_source is not None else self.token


def check_loopback(host: str) -> None:
    """Refuse a non-loopback listen address.

    Anyone who can reach the connector's port uses the developer's token, so
    it must only be reachable from this machine.

    Raises:
        ValueError: ``host`` is not a loopback address.
    """
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"--listen must be a loopback address such as 127.0.0.1, got {host!r}: "
            "anyone who can reach that port would use your token"
        )


# Characters an argument may hold unquoted in both cmd.exe and PowerShell.
# Anything else (PowerShell's "," and "@{", cmd's "<", ">", "&", "|") goes
# inside double quotes, which both shells strip before the program runs.
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/=+-")

# Characters a server password may hold so that the pasted line stays the
# password: none of cmd's "%" and "!" expansions, PowerShell's "$" and "`",
# the quote itself, or WinDbg's own option syntax ("," "{" "}").
_PASSWORD_UNSAFE = frozenset('"%!$`,{}')


def _shell_arg(text: str) -> str:
    """``text`` as one argument that cmd.exe and PowerShell pass on unchanged."""
    if text and set(text) <= _BARE:
        return text
    if '"' in text or "%" in text or "$" in text or "`" in text:
        raise ValueError(f"cannot quote {text!r} for both cmd.exe and PowerShell")
    return f'"{text}"'


def check_password(password: str) -> None:
    """Refuse a debug-server password the printed command line would mangle.

    Raises:
        ValueError: ``password`` is empty, not printable ASCII, or holds a
            character from :data:`_PASSWORD_UNSAFE`.
    """
    if not password:
        raise ValueError("the password is empty")
    bad = sorted({c for c in password if c in _PASSWORD_UNSAFE or not " " < c <= "~"})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise ValueError(
            f"the password holds {shown}, which a command line pasted into cmd.exe or "
            "PowerShell (or WinDbg's option string) would change; give the debug server "
            'a password of letters, digits and punctuation other than " % ! $ ` , { }'
        )


def debugger_commands(
    kind: str,
    host: str,
    port: int,
    *,
    kd_transport: str | None = None,
    password: str | None = None,
) -> list[str]:
    """The command lines to paste for a target of ``kind`` reached at ``host:port``.

    Every line works pasted into cmd.exe, PowerShell or a POSIX shell: no
    placeholders, and arguments with separators are double-quoted.

    Args:
        kind: The target kind the relay reported (``dbgsrv``, ``server``,
            ``kdsrv``, ``gdbserver``, ``tcp``).
        host: The connector's listening address (IPv4 or IPv6 literal).
        port: The connector's port.
        kd_transport: For ``kdsrv``, the kernel connection string
            (``net:port=N,key=K``); without it there is no line to print.
        password: The debug server's password (WinDbg's ``password=``).

    Returns:
        One line per debugger (``windbg`` first), or no line when ``kdsrv``
        lacks its transport.

    Raises:
        ValueError: ``password`` cannot be printed safely (see
            :func:`check_password`).
    """
    v6 = ":" in host
    tcp = f"tcp:server={host},port={port}"
    if password is not None:
        check_password(password)
        tcp += f",password={password}"
    if v6:
        tcp += ",ipversion=6"
    if kind == "dbgsrv":
        return [f"{dbg} -premote {_shell_arg(tcp)}" for dbg in ("windbg", "cdb")]
    if kind == "server":
        return [f"{dbg} -remote {_shell_arg(tcp)}" for dbg in ("windbg", "cdb", "kd")]
    if kind == "kdsrv":
        if not kd_transport:
            return []
        spec = _shell_arg(f"kdsrv:server=@{{{tcp}}},trans=@{{{kd_transport}}}")
        return [f"{dbg} -k {spec}" for dbg in ("windbg", "kd")]
    address = f"[{host}]:{port}" if v6 else f"{host}:{port}"
    if kind == "gdbserver":
        return [f"gdb -ex {_shell_arg(f'target remote {address}')}"]
    return [f"connect your client to {address}"]


async def _exchange(
    settings: ConnectorSettings, method: str, early: Callable[[], bytes] | None = None
) -> tuple[trio.abc.Stream, TunnelResponse]:
    """Open TLS to the relay, send one request, read the answer head.

    The TLS session resumes the relay's last one when there is one, and the
    newest is kept for the next tunnel.  ``early``, called once the
    handshake is done, returns bytes sent in the same write as the request,
    without waiting for the answer: the relay forwards them only after the
    token check passed, and drops them with the connection on a refusal.
    """
    try:
        with trio.fail_after(settings.handshake_timeout):
            raw = await open_tcp(settings.relay_host, settings.relay_port)
    except (OSError, trio.TooSlowError) as exc:
        raise ConnectFailed(
            f"cannot reach the relay at {settings.relay_host}:{settings.relay_port}: "
            f"{getattr(exc, 'strerror', None) or exc or 'timed out'}; check --relay",
            reason="relay_unreachable",
        ) from exc
    relay_key = (settings.relay_host, settings.relay_port, settings.server_name)
    # A session resumes only with the engine (and context) that made it.
    made_by, session = settings.tls_sessions.get(relay_key, (None, None))
    # (engine, None) records that this relay gave that engine no ticket.
    known = made_by is settings.engine
    tls = settings.engine.wrap(raw, settings.server_name, session=session if known else None)
    try:
        with trio.fail_after(settings.handshake_timeout):
            try:
                await tls.do_handshake()
            except _BROKEN as exc:
                raise ConnectFailed(
                    f"TLS handshake with {settings.relay_host}:{settings.relay_port} failed: "
                    f"{exc.__cause__ or exc}; check --ca and that the relay's certificate names "
                    f"{settings.server_name!r}",
                    reason="tls_error",
                ) from exc
            request = render_request(
                method=method,
                target=settings.target,
                token=settings.current_token,
                host=settings.target,
            )
            await tls.send_all(request + early() if early is not None else request)
            parser = ResponseParser(method=method)
            while True:
                event = parser.next_event()
                if event is not NEED_DATA:
                    break
                parser.receive_data(await tls.receive_some(16384))
            # The relay's ticket came before its answer.  One session serves
            # every tunnel that resumes it: a new one is taken only after the
            # first handshake and after a full one where a session was offered
            # (the relay's ticket key changed).  Reading the session costs
            # CPython 3.11's stdlib engine 6.5 KiB that is never freed, so a
            # relay that gave no ticket is not asked again.
            if not known or (session is not None and not tls.resumed()):
                settings.tls_sessions[relay_key] = (settings.engine, tls.session())
    except trio.TooSlowError as exc:
        await trio.aclose_forcefully(tls)
        raise ConnectFailed(
            f"the relay did not answer within {settings.handshake_timeout:g}s", reason="timeout"
        ) from exc
    except (RemoteProtocolError, *_BROKEN) as exc:
        await trio.aclose_forcefully(tls)
        raise ConnectFailed(
            f"the relay closed the connection: {exc}", reason="relay_error"
        ) from exc
    except ConnectFailed:
        await trio.aclose_forcefully(tls)
        raise
    if event.status != 200:
        await trio.aclose_forcefully(tls)
        raise RelayRefused(event.status, event.reason or "refused", event.message or "")
    return tls, event


async def preflight(settings: ConnectorSettings) -> dict[str, str]:
    """Check the token and learn the target's kind, without touching the backend.

    Returns:
        The relay's answer headers (``dbgrelay-target-kind`` and, for kdsrv,
        ``dbgrelay-kd-transport``).

    Raises:
        RelayRefused: the relay refused the token or target.
        ConnectFailed: the relay could not be reached.
    """
    tls, event = await _exchange(settings, "OPTIONS")
    await trio.aclose_forcefully(tls)
    return dict(event.headers)


async def open_tunnel(
    settings: ConnectorSettings, *, early: Callable[[], bytes] | None = None
) -> tuple[trio.abc.Stream, str, bytes]:
    """Open one tunnel.

    Args:
        settings: Where and as whom.
        early: Called after the TLS handshake; what it returns (the
            debugger's first bytes) goes with the request, before the answer.

    Returns:
        The TLS stream (raw bytes from now on), the relay's session id, and
        any tunnel bytes that arrived with the answer.
    """
    tls, event = await _exchange(settings, "CONNECT", early)
    return tls, event.headers.get("dbgrelay-session", "?"), event.trailing


async def serve_connector(
    settings: ConnectorSettings,
    *,
    on_refused: Callable[[RelayRefused | ConnectFailed], None] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept debugger connections on loopback and tunnel each one.

    Args:
        settings: Where to connect and with what.
        on_refused: Called when a tunnel cannot be opened.
        task_status: Receives the bound listeners once listening.

    Raises:
        ListenFailed: the listen address cannot be bound (in use, not local).
    """
    host, port = settings.listen
    check_loopback(host)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ListenFailed(
            f"cannot listen on {shown}: {exc.strerror or exc}; choose another --listen port "
            "(port 0 picks a free one)",
            reason="listen_failed",
        ) from exc
    opening = trio.CapacityLimiter(_OPENING_AT_ONCE)

    async def handle(local: trio.SocketStream) -> None:
        sent_early: list[bytes] = []

        def early() -> bytes:
            # What the debugger sent while TLS was set up; never waits.
            data = try_receive(local, 65536)
            sent_early.append(data)
            return data

        try:
            async with opening:
                tls, session_id, first = await open_tunnel(settings, early=early)
        except (RelayRefused, ConnectFailed) as exc:
            log.warning("tunnel.refused", extra={"reason": exc.reason, "error": str(exc)})
            if on_refused is not None:
                on_refused(exc)
            await local.aclose()
            return
        log.info("tunnel.opened", extra={"session_id": session_id, "target": settings.target})
        traffic = Traffic()
        traffic.to_backend = sum(map(len, sent_early))
        try:
            if first:
                await local.send_all(first)
            result = await driver_for(settings.data_plane)(local, tls, traffic)
            reason = result.reason
        except _BROKEN:
            reason = "client_error"
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(tls)
                await trio.aclose_forcefully(local)
        log.info(
            "tunnel.closed",
            extra={
                "session_id": session_id,
                "reason": reason.replace("client", "debugger").replace("backend", "relay"),
                "bytes_sent": traffic.to_backend,
                "bytes_received": traffic.to_client + len(first),
            },
        )

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(listeners)
    finally:
        for lst in listeners:
            with trio.CancelScope(shield=True):
                await lst.aclose()


def make_settings(
    *,
    relay: str,
    ca: Path | None,
    target: str,
    token: str,
    listen: str,
    engine: str = "stdlib",
    server_name: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    min_version: str = "1.2",
    token_source: TokenSource | None = None,
    data_plane: str = "auto",
) -> ConnectorSettings:
    """Build settings from command-line strings.

    Raises:
        ValueError: an address is malformed (the message names the flag).
    """
    relay_host, relay_port = _split_hostport(relay, "--relay", lowest_port=1)
    listen_host, listen_port = _split_hostport(listen, "--listen", lowest_port=0)
    check_loopback(listen_host)
    client = make_client_engine(engine=engine, ca=ca, min_version=min_version, cert=cert, key=key)
    return ConnectorSettings(
        relay_host=relay_host,
        relay_port=relay_port,
        server_name=server_name or relay_host,
        target=target,
        token=token,
        listen=(listen_host, listen_port),
        engine=client,
        token_source=token_source,
        data_plane=data_plane,
    )


def _split_hostport(text: str, flag: str, *, lowest_port: int) -> tuple[str, int]:
    try:
        return parse_host_port(text, lowest_port=lowest_port)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
