"""TLS engines behind one small interface, and the standard library's.

The relay and the connector never touch ``ssl`` or ``OpenSSL`` directly: they
ask an engine to wrap a transport stream, run ``do_handshake()`` and read
:class:`TLSInfo` afterwards.  Every engine's stream is the one
:class:`~relay.datapath.stream.TLSStream` over a
:class:`~relay.datapath.tls.TLSConnection`; an engine only adapts its
library to :class:`~relay.datapath.tls.Engine` and builds its contexts:

* ``stdlib``: the standard library's :class:`ssl.SSLObject` (bound to the
  system OpenSSL) in memory-BIO mode, here.
* ``pyopenssl``: :mod:`relay.tls_openssl`, pyOpenSSL on the OpenSSL that
  ships with ``cryptography`` (hybrid post-quantum key exchange, client
  certificates checked against revocation during the handshake).  It is only
  imported when chosen.

Both send OpenSSL's alert when a handshake fails, which :class:`trio.SSLStream`
does not, so a client reads "protocol version" or "certificate required"
rather than a bare EOF; both report an EOF without ``close_notify`` as an
error (see :data:`~relay.datapath.tls.TRUNCATED`).

The server engine is rebuilt from files on reload; :class:`ServerTLS` holds
the current one so a reload can swap it while live tunnels keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from .datapath.stream import TLSStream
from .datapath.tls import (
    ALPN,
    PQ_GROUPS,
    TLS12_CIPHERS,
    TRUNCATED,
    TLSError,
    TLSInfo,
    attempt,
    is_pq_group,
    min_version,
)
from .errors import LocalProtocolError

__all__ = [
    "TLSInfo",
    "TLSStream",
    "ServerEngine",
    "ClientEngine",
    "ServerTLS",
    "ALPN",
    "PQ_GROUPS",
    "is_pq_group",
    "make_server_engine",
    "make_client_engine",
]


class ServerEngine(Protocol):
    name: str

    def wrap(self, transport: trio.abc.Stream) -> TLSStream: ...


class ClientEngine(Protocol):
    name: str

    def wrap(
        self, transport: trio.abc.Stream, server_hostname: str, *, session: object = None
    ) -> TLSStream: ...


_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _failure(exc: ssl.SSLError) -> TLSError:
    """One line from an ``ssl`` error: OpenSSL's reason, and why a certificate failed."""
    if isinstance(exc, ssl.SSLEOFError):
        return TLSError(TRUNCATED)
    text = exc.reason or str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        text = f"{text}: {exc.verify_message}"
    return TLSError(text)


def _cert_names(cert: dict) -> tuple[str | None, tuple[str, ...]]:
    """Common name and subjectAltName values (email, DNS, URI) of a ``getpeercert()`` dict."""
    cn = None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and cn is None:
                cn = value
    sans = tuple(
        value for kind, value in cert.get("subjectAltName", ()) if kind in ("email", "DNS", "URI")
    )
    return cn, sans


def _subject_string(cert: dict) -> str | None:
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            parts.append(f"{key}={value}")
    return ",".join(parts) or None


class StdlibEngine:
    """The standard library's :class:`ssl.SSLObject` as an :class:`~relay.datapath.tls.Engine`.

    Args:
        context: The configured :class:`ssl.SSLContext`.
        server_side: Whether this is the server end.
        server_hostname: The name to check the server's certificate against
            (client side only).
    """

    __slots__ = (
        "server_side",
        "_incoming",
        "_outgoing",
        "_obj",
        "_ssl",
        "feed",
        "take_outgoing",
        "drained",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.server_side = server_side
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        # The C object behind SSLObject: read, write and pending run for
        # every chunk, and the wrapper's methods only forward to it.  The
        # same calls, with the same arguments and exceptions.
        self._ssl = getattr(self._obj, "_sslobj", self._obj)
        # Engine calls that need no translation are the BIOs' own methods.
        self.feed = self._incoming.write
        #: All ciphertext produced since the last call (``b""`` if none).
        self.take_outgoing = self._outgoing.read
        self.drained = False

    def feed_eof(self) -> None:
        self._incoming.write_eof()

    def buffered(self) -> bool:
        return bool(self._incoming.pending or self._ssl.pending())

    def handshake(self) -> bool:
        return attempt(self._obj.do_handshake, ssl.SSLWantReadError, ssl.SSLError, _failure)

    def read(self, max_bytes: int) -> bytes | None:
        incoming = self._incoming
        if not incoming.pending and not incoming.eof and not self._ssl.pending():
            # Nothing to decrypt: skip the call that could only say "want read".
            return None
        try:
            # Stops at what OpenSSL holds: 0 bytes means close_notify.
            chunk = self._ssl.read(max_bytes)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            return b""
        except ssl.SSLError as exc:
            raise _failure(exc) from exc
        self.drained = not (incoming.pending or incoming.eof or self._ssl.pending())
        return chunk

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise _failure(exc) from exc

    def shutdown(self) -> None:
        try:
            # Writes close_notify; the peer's reply is not awaited (as
            # trio.SSLStream does), so SSLWantReadError is expected.
            self._obj.unwrap()
        except ssl.SSLError:
            pass

    def version(self) -> str | None:
        return self._obj.version()

    def resumed(self) -> bool:
        return self._obj.session_reused

    def session(self) -> ssl.SSLSession | None:
        session = self._obj.session
        # A TLS 1.3 session resumes only with the ticket that came after the handshake.
        return session if session is not None and session.has_ticket else None

    def info(self) -> TLSInfo:
        obj = self._obj
        cipher = obj.cipher()
        peer = obj.getpeercert() if obj.server_side else None
        serial = None
        if peer and peer.get("serialNumber"):
            serial = int(peer["serialNumber"], 16)
        cn, sans = _cert_names(peer) if peer else (None, ())
        return TLSInfo(
            version=obj.version() or "unknown",
            cipher=cipher[0] if cipher else "unknown",
            # The stdlib ssl module has no call that names the negotiated group.
            group="unknown",
            alpn=obj.selected_alpn_protocol(),
            peer_subject=_subject_string(peer) if peer else None,
            peer_serial=serial,
            peer_cn=cn,
            peer_sans=sans,
            resumed=self.resumed(),
        )


def _harden(ctx: ssl.SSLContext, version: str) -> None:
    """The shared hardening (:mod:`relay.datapath.tls`), in ``ssl`` terms."""
    ctx.minimum_version = _MIN_VERSIONS[min_version(version)]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols([ALPN])


def _bad_files(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, reason="bad_tls_files")


def _stdlib_server_context(
    *,
    cert: Path,
    key: Path,
    min_version: str,
    client_ca: Path | None,
    require_client_cert: bool,
    tickets: bool,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, min_version)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    # One TLS 1.3 ticket per handshake (OpenSSL's default is two): the
    # connector keeps the newest per relay, and every ticket a client
    # holds costs it memory (the session carries the server's certificate).
    # The ticket key is OpenSSL's, made with the context; the stdlib has no
    # call to set it, so the relay rotates it by building a new context
    # (Relay.new_ticket_key).  Without tickets, none are sent.
    ctx.num_tickets = 1 if tickets else 0
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            ctx.load_verify_locations(cafile=str(client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        hint = "check that both are PEM files and belong together"
        raise _bad_files(
            f"cannot load the TLS certificate {cert} / key {key}: {exc}; {hint}"
        ) from exc
    return ctx


def _stdlib_client_context(
    *, ca: Path | None, min_version: str, cert: Path | None, key: Path | None
) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        hint = "pass --ca with the relay's CA certificate (PEM)"
        raise _bad_files(
            f"cannot load {ca if ca else 'the system CA store'}: {exc}; {hint}"
        ) from exc
    _harden(ctx, min_version)
    return ctx


def _stdlib_server_stream(context: ssl.SSLContext, transport: trio.abc.Stream) -> TLSStream:
    return TLSStream.over(transport, StdlibEngine(context, server_side=True))


def _stdlib_client_stream(
    context: ssl.SSLContext,
    transport: trio.abc.Stream,
    server_hostname: str,
    session: ssl.SSLSession | None = None,
) -> TLSStream:
    engine = StdlibEngine(
        context, server_side=False, server_hostname=server_hostname, session=session
    )
    return TLSStream.over(transport, engine)


class _BuiltEngine:
    """One side of an engine: its name, a context built from files, and how to wrap.

    Attributes:
        name: ``"stdlib"`` or ``"pyopenssl"``.
        context: The engine's own context object (for tests and tools that
            build a peer by hand).
    """

    __slots__ = ("name", "context", "_wrap")

    def __init__(self, name: str, context: object, wrap: Callable[..., TLSStream]) -> None:
        self.name = name
        self.context = context
        self._wrap = wrap

    def wrap(
        self, transport: trio.abc.Stream, *server_hostname: str, session: object = None
    ) -> TLSStream:
        """A TLS stream over ``transport``.

        A client passes the server's name, and may pass a session from
        :meth:`TLSStream.session` of an earlier connection to the same
        server to resume it.
        """
        if session is not None:
            return self._wrap(self.context, transport, *server_hostname, session)
        return self._wrap(self.context, transport, *server_hostname)


def _unknown_engine(flag: str, engine: str) -> LocalProtocolError:
    return LocalProtocolError(
        f'{flag} must be "stdlib" or "pyopenssl", got {engine!r}', reason="bad_config"
    )


def make_server_engine(
    *,
    engine: str,
    cert: Path,
    key: Path,
    min_version: str = "1.2",
    client_ca: Path | None = None,
    require_client_cert: bool = False,
    is_serial_revoked: Callable[[int], bool] | None = None,
    ocsp_response: Path | None = None,
    ticket_lifetime: float = 0.0,
) -> ServerEngine:
    """Build the server side of a TLS engine from files.

    ``is_serial_revoked`` and ``ocsp_response`` are used by the pyOpenSSL
    engine during the handshake; the stdlib engine's sessions check
    revocation right after it.  With ``ticket_lifetime`` (seconds, the
    rotation interval of ``tls.ticket_key_interval``) the engine issues TLS
    1.3 session tickets under a key of its own, made with it; 0 issues none.
    A resumed handshake skips the certificate checks of a full one, so the
    relay checks a client certificate's revocation after every handshake,
    resumed or not.

    Raises:
        LocalProtocolError: the files cannot be loaded or the engine is unknown.
    """
    files = {
        "cert": Path(cert),
        "key": Path(key),
        "min_version": min_version,
        "client_ca": Path(client_ca) if client_ca is not None else None,
        "require_client_cert": require_client_cert,
    }
    if engine == "stdlib":
        context = _stdlib_server_context(**files, tickets=ticket_lifetime > 0)
        return _BuiltEngine(engine, context, _stdlib_server_stream)
    if engine == "pyopenssl":
        from . import tls_openssl

        context = tls_openssl.make_server_context(
            **files,
            ticket_lifetime=ticket_lifetime,
            is_serial_revoked=is_serial_revoked,
            ocsp_response=Path(ocsp_response) if ocsp_response is not None else None,
        )
        return _BuiltEngine(engine, context, tls_openssl.open_server_stream)
    raise _unknown_engine("tls.engine", engine)


def make_client_engine(
    *,
    engine: str = "stdlib",
    ca: Path | None,
    min_version: str = "1.2",
    cert: Path | None = None,
    key: Path | None = None,
) -> ClientEngine:
    """Build the client side of a TLS engine (used by ``dbgrelay connect``)."""
    if engine == "stdlib":
        context = _stdlib_client_context(ca=ca, min_version=min_version, cert=cert, key=key)
        return _BuiltEngine(engine, context, _stdlib_client_stream)
    if engine == "pyopenssl":
        from . import tls_openssl

        context = tls_openssl.make_client_context(
            ca=Path(ca) if ca is not None else None,
            min_version=min_version,
            cert=Path(cert) if cert is not None else None,
            key=Path(key) if key is not None else None,
        )
        return _BuiltEngine(engine, context, tls_openssl.open_client_stream)
    raise _unknown_engine("--tls-engine", engine)


class ServerTLS:
    """Holds the current server engine so a reload can swap it.

    Live tunnels keep the engine they were wrapped with; new handshakes use
    whatever :attr:`current` is when they start.
    """

    def __init__(self, engine: ServerEngine) -> None:
        self.current = engine

    def swap(self, engine: ServerEngine) -> None:
        self.current = engine

    def wrap(self, transport: trio.abc.Stream) -> TLSStream:
        return self.current.wrap(transport)
