"""TLS engines behind one small interface.

The relay and the connector never touch ``ssl`` or ``OpenSSL`` directly: they
ask an engine to wrap a transport stream, run ``do_handshake()`` and read
:class:`TLSInfo` afterwards.  Two engines exist:

* ``stdlib``: :class:`trio.SSLStream` over the standard library's ``ssl``
  module (bound to the system OpenSSL).
* ``pyopenssl``: :mod:`relay.tls_openssl`, pyOpenSSL in memory-BIO mode on the
  OpenSSL that ships with ``cryptography`` (hybrid post-quantum key exchange,
  real alerts on failed handshakes).

The server engine is rebuilt from files on reload; :class:`ServerTLS` holds
the current one so a reload can swap it while live tunnels keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

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

#: The one application protocol we speak inside TLS: an HTTP/1.1 CONNECT.
ALPN = "http/1.1"

# TLS 1.2 suites: forward secrecy and AEAD only (RFC 7525 section 4.2).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: Hybrid post-quantum key-exchange groups (draft-ietf-tls-ecdhe-mlkem).
PQ_GROUPS = frozenset({"X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024"})


def is_pq_group(group: str) -> bool:
    """Whether ``group`` is a hybrid post-quantum key-exchange group."""
    return group in PQ_GROUPS


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What a finished handshake negotiated.

    Attributes:
        version: ``"TLSv1.3"`` or ``"TLSv1.2"``.
        cipher: The cipher suite name, e.g. ``"TLS_AES_256_GCM_SHA384"``.
        group: The key-exchange group, e.g. ``"X25519MLKEM768"``; ``"unknown"``
            where the engine cannot tell (the stdlib engine).
        alpn: The negotiated application protocol, if any.
        peer_subject: The client certificate's subject (RFC 4514) when one was
            presented and verified.
        peer_serial: That certificate's serial number.
    """

    version: str
    cipher: str
    group: str
    alpn: str | None
    peer_subject: str | None = None
    peer_serial: int | None = None


class TLSStream(Protocol):
    """A :class:`trio.abc.Stream` that also reports what its handshake negotiated."""

    transport_stream: trio.abc.Stream

    async def do_handshake(self) -> None: ...
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...
    async def wait_send_all_might_not_block(self) -> None: ...
    async def aclose(self) -> None: ...
    def tls_info(self) -> TLSInfo: ...


class ServerEngine(Protocol):
    name: str

    def wrap(self, transport: trio.abc.Stream) -> TLSStream: ...


class ClientEngine(Protocol):
    name: str

    def wrap(self, transport: trio.abc.Stream, server_hostname: str) -> TLSStream: ...


def _min_version(text: str) -> ssl.TLSVersion:
    try:
        return {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[text]
    except KeyError:
        raise LocalProtocolError(
            f'tls.min_version must be "1.2" or "1.3", got {text!r}', reason="bad_config"
        ) from None


def _subject_string(cert: dict) -> str | None:
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            parts.append(f"{key}={value}")
    return ",".join(parts) or None


class _StdlibStream(trio.abc.Stream):
    """:class:`trio.SSLStream` (which cannot be subclassed) plus :meth:`tls_info`.

    The stream methods are the SSLStream's own bound methods, set on the
    instance, so the wrapper adds no call of its own on the data path.
    """

    def __init__(self, ssl_stream: trio.SSLStream) -> None:
        self.ssl_stream = ssl_stream
        self.transport_stream = ssl_stream.transport_stream
        self.do_handshake = ssl_stream.do_handshake
        self.send_all = ssl_stream.send_all
        self.receive_some = ssl_stream.receive_some
        self.wait_send_all_might_not_block = ssl_stream.wait_send_all_might_not_block
        self.aclose = ssl_stream.aclose

    # The class-level definitions satisfy trio.abc.Stream; instances use the
    # SSLStream's bound methods assigned above.
    async def do_handshake(self) -> None:  # pragma: no cover - shadowed per instance
        await self.ssl_stream.do_handshake()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:  # pragma: no cover
        await self.ssl_stream.send_all(data)

    async def receive_some(
        self, max_bytes: int | None = None
    ) -> bytes | bytearray:  # pragma: no cover
        return await self.ssl_stream.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:  # pragma: no cover
        await self.ssl_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:  # pragma: no cover
        await self.ssl_stream.aclose()

    def tls_info(self) -> TLSInfo:
        obj = self.ssl_stream._ssl_object
        cipher = obj.cipher()
        peer = obj.getpeercert() if obj.server_side else None
        serial = None
        if peer and peer.get("serialNumber"):
            serial = int(peer["serialNumber"], 16)
        return TLSInfo(
            version=obj.version() or "unknown",
            cipher=cipher[0] if cipher else "unknown",
            # The stdlib ssl module has no call that names the negotiated group.
            group="unknown",
            alpn=obj.selected_alpn_protocol(),
            peer_subject=_subject_string(peer) if peer else None,
            peer_serial=serial,
        )


def _harden(ctx: ssl.SSLContext, min_version: str) -> None:
    ctx.minimum_version = _min_version(min_version)
    # No compression (CRIME) and no renegotiation (RFC 7457): nothing we carry needs either.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.set_alpn_protocols([ALPN])


class _StdlibServer:
    name = "stdlib"

    def __init__(
        self,
        *,
        cert: Path,
        key: Path,
        min_version: str,
        client_ca: Path | None,
        require_client_cert: bool,
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _harden(ctx, min_version)
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        try:
            ctx.load_cert_chain(str(cert), str(key))
            if client_ca is not None:
                ctx.load_verify_locations(cafile=str(client_ca))
                ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        except (OSError, ssl.SSLError) as exc:
            raise LocalProtocolError(
                f"cannot load the TLS certificate {cert} / key {key}: {exc}; "
                "check that both are PEM files and belong together",
                reason="bad_tls_files",
            ) from exc
        self.context = ctx

    def wrap(self, transport: trio.abc.Stream) -> TLSStream:
        return _StdlibStream(
            trio.SSLStream(transport, self.context, server_side=True, https_compatible=True)
        )


class _StdlibClient:
    name = "stdlib"

    def __init__(
        self,
        *,
        ca: Path | None,
        min_version: str,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        try:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise LocalProtocolError(
                f"cannot load {ca if ca else 'the system CA store'}: {exc}; "
                "pass --ca with the relay's CA certificate (PEM)",
                reason="bad_tls_files",
            ) from exc
        _harden(ctx, min_version)
        self.context = ctx

    def wrap(self, transport: trio.abc.Stream, server_hostname: str) -> TLSStream:
        return _StdlibStream(
            trio.SSLStream(
                transport, self.context, server_hostname=server_hostname, https_compatible=True
            )
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
) -> ServerEngine:
    """Build the server side of a TLS engine from files.

    Raises:
        LocalProtocolError: the files cannot be loaded or the engine is unknown.
    """
    if engine == "stdlib":
        return _StdlibServer(
            cert=cert,
            key=key,
            min_version=min_version,
            client_ca=client_ca,
            require_client_cert=require_client_cert,
        )
    if engine == "pyopenssl":
        from . import tls_openssl

        return tls_openssl.ServerEngine(
            cert=cert,
            key=key,
            min_version=min_version,
            client_ca=client_ca,
            require_client_cert=require_client_cert,
            is_serial_revoked=is_serial_revoked,
            ocsp_response=ocsp_response,
        )
    raise LocalProtocolError(
        f'tls.engine must be "stdlib" or "pyopenssl", got {engine!r}', reason="bad_config"
    )


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
        return _StdlibClient(ca=ca, min_version=min_version, cert=cert, key=key)
    if engine == "pyopenssl":
        from . import tls_openssl

        return tls_openssl.ClientEngine(ca=ca, min_version=min_version, cert=cert, key=key)
    raise LocalProtocolError(
        f'--tls-engine must be "stdlib" or "pyopenssl", got {engine!r}', reason="bad_config"
    )


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
