"""TLS engines behind one small interface.

The relay and the connector never touch ``ssl`` or ``OpenSSL`` directly: they
ask an engine to wrap a transport stream, run ``do_handshake()`` and read
:class:`TLSInfo` afterwards.  Two engines exist:

* ``stdlib``: the standard library's :class:`ssl.SSLObject` (bound to the
  system OpenSSL) in memory-BIO mode, driven by :class:`_StdlibStream`, which
  also serves the pump's fast path (:mod:`relay.fastpath`).
* ``pyopenssl``: :mod:`relay.tls_openssl`, pyOpenSSL in memory-BIO mode on the
  OpenSSL that ships with ``cryptography`` (hybrid post-quantum key exchange,
  client certificates checked against revocation during the handshake).

Both send OpenSSL's alert when a handshake fails, which :class:`trio.SSLStream`
does not, so a client reads "protocol version" or "certificate required"
rather than a bare EOF.

The server engine is rebuilt from files on reload; :class:`ServerTLS` holds
the current one so a reload can swap it while live tunnels keep theirs.
"""

from __future__ import annotations

import contextlib
import operator
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import trio

from . import fastpath
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


class _State(Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise :class:`trio.BusyResourceError` when two tasks enter at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._held = False
        self._message = message

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


# Bytes asked of the transport per receive outside the fast path (handshake,
# tunnel request, memory streams in tests).  Below glibc's mmap threshold, so
# each receive buffer is not a fresh mmap.
_RECEIVE_SIZE = 65536


def _subject_string(cert: dict) -> str | None:
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            parts.append(f"{key}={value}")
    return ",".join(parts) or None


class _StdlibStream(trio.abc.Stream):
    """A TLS stream run by the standard library's :class:`ssl.SSLObject`.

    It behaves like ``trio.SSLStream(..., https_compatible=True)``: one task
    may send while another receives, two concurrent senders (or receivers) get
    :class:`trio.BusyResourceError`, TLS errors become
    :class:`trio.BrokenResourceError` raised ``from`` the :class:`ssl.SSLError`,
    and an EOF reads as ``b""`` with or without the peer's ``close_notify``.
    Unlike ``https_compatible`` mode, :meth:`aclose` sends ``close_notify``,
    and a failed handshake sends OpenSSL's alert before raising.

    It is also a :class:`relay.fastpath.Endpoint` (see :meth:`fast_endpoint`)
    when the transport is a :class:`trio.SocketStream`: the pump then reads
    and writes the socket itself and encrypts and decrypts in place, with no
    await per chunk unless the socket would block.  Both ways of moving bytes
    share the same state, so the stream can be used, and closed cleanly, after
    a fast pump stops at any point.

    Args:
        transport_stream: The stream carrying TLS records.
        context: The configured :class:`ssl.SSLContext`.
        server_side: Whether this is the server end.
        server_hostname: The name to check the server's certificate against
            (client side only).

    Resource handling:
        The stream owns ``transport_stream``: :meth:`aclose` closes it.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._state = _State.OK
        self._handshake_ok = False
        self._handshake_lock = trio.Lock()
        # Ciphertext OpenSSL produced that is not on the wire yet: TLS 1.3
        # session tickets held back after the handshake, or what the socket
        # did not take on the fast path.  Every sender sends it first.
        self._pending_out: bytes | memoryview = b""
        # Bytes leave through one sender at a time, in the order OpenSSL wrote them.
        self._send_lock = trio.StrictFIFOLock()
        self._send_conflict = _ConflictDetector("another task is sending on this TLS stream")
        self._recv_conflict = _ConflictDetector("another task is receiving on this TLS stream")
        # Fast path state (see fast_endpoint()).  aclose() uses fd too.
        self.fd = (
            transport_stream.socket.fileno() if type(transport_stream) is trio.SocketStream else -1
        )
        self.sock = (
            fastpath.raw_socket(transport_stream)
            if type(transport_stream) is trio.SocketStream
            else None
        )
        self.maybe_readable = True
        self._eof = False
        self._decrypt_first = False
        self._deferred_error: ssl.SSLError | None = None

    # -- state ----------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLS stream is broken by an earlier error")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLS stream was closed")

    def _broken(self, exc: BaseException) -> trio.BrokenResourceError:
        """Mark the stream broken; the caller raises the result ``from exc``."""
        self._state = _State.BROKEN
        return trio.BrokenResourceError()

    # -- handshake --------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake now, or wait for the one already running.

        Sending or receiving runs the handshake implicitly; call this to
        authenticate the peer before anything else (and under a deadline).

        Raises:
            trio.BrokenResourceError: the handshake failed; the cause is the
                :class:`ssl.SSLError` (certificate checks included).
            trio.ClosedResourceError: the stream was closed.

        Cancellation:
            Cancelling a handshake midway leaves the stream broken: every later
            call raises :class:`trio.BrokenResourceError`, and :meth:`aclose`
            just closes the transport.
        """
        self._check_status()
        if self._handshake_ok:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> None:
        if self._handshake_ok:
            return
        async with self._handshake_lock:
            if self._handshake_ok:
                return
            self._check_status()
            try:
                await self._handshake()
            except BaseException:
                self._state = _State.BROKEN
                raise
            self._handshake_ok = True

    async def _handshake(self) -> None:
        obj = self._obj
        while True:
            done = want_read = False
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                want_read = True
            except ssl.SSLError as exc:
                # OpenSSL queued a fatal alert: send it, best effort, so the
                # peer reads "protocol version" or "certificate required"
                # rather than a bare EOF (trio.SSLStream drops it).
                alert = self._outgoing.read()
                if alert:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        async with self._send_lock:
                            await self.transport_stream.send_all(alert)
                raise self._broken(exc) from exc
            to_send = self._outgoing.read()
            if done and obj.server_side and obj.version() == "TLSv1.3":
                # A TLS 1.3 server ends its handshake by writing session
                # tickets the client only reads when it next reads; over a
                # transport without buffering, sending them now deadlocks.
                # They go out with the first application data instead, as
                # trio.SSLStream and BoringSSL do (openssl/openssl#7948).
                self._pending_out, to_send = to_send, b""
            if to_send:
                async with self._send_lock:
                    await self.transport_stream.send_all(to_send)
            elif want_read:
                data = await self.transport_stream.receive_some(_RECEIVE_SIZE)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
            if done:
                return

    # -- trio.abc.Stream ----------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive and decrypt some data; ``b""`` once the peer closed.

        See :meth:`trio.abc.ReceiveStream.receive_some`.

        Raises:
            trio.BrokenResourceError: a TLS error or a broken transport.
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: this stream was closed.
        """
        with self._recv_conflict:
            if max_bytes is None:
                max_bytes = _RECEIVE_SIZE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_status()
            await self._ensure_handshake()
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
            while True:
                if self._deferred_error is not None:
                    exc, self._deferred_error = self._deferred_error, None
                    raise self._broken(exc) from exc
                try:
                    data = self._obj.read(max_bytes)
                    break
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                    break
                except ssl.SSLError as exc:
                    raise self._broken(exc) from exc
                yielded = True
                if self._outgoing.pending:
                    # A post-handshake message asked for an answer (KeyUpdate).
                    await self._send_outgoing()
                    continue
                chunk = await self.transport_stream.receive_some(_RECEIVE_SIZE)
                if chunk:
                    self._incoming.write(chunk)
                else:
                    self._incoming.write_eof()
            if not yielded:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it on the transport.

        See :meth:`trio.abc.SendStream.send_all`.

        Raises:
            trio.BrokenResourceError: a TLS error or a broken transport.
            trio.BusyResourceError: another task is sending.
            trio.ClosedResourceError: this stream was closed.

        Cancellation:
            Cancelling may leave part of a record sent, so it breaks the
            stream, as with :class:`trio.SSLStream`.
        """
        with self._send_conflict:
            self._check_status()
            await self._ensure_handshake()
            if data:
                # A memory BIO takes everything: this encrypts all of data.
                try:
                    self._obj.write(data)
                except ssl.SSLError as exc:
                    raise self._broken(exc) from exc
            await self._send_outgoing()

    async def _send_outgoing(self) -> None:
        """Send pending ciphertext and whatever OpenSSL wrote since, in order."""
        async with self._send_lock:
            # Taken after the lock: whoever holds it sends everything queued
            # so far, so records reach the wire in the order they were made.
            out = self._take_outgoing()
            if out:
                try:
                    await self.transport_stream.send_all(out)
                except BaseException:
                    # Some unknown part of a record may be on the wire.
                    self._state = _State.BROKEN
                    raise

    def _take_outgoing(self) -> bytes:
        out = self._outgoing.read()
        if self._pending_out:
            out = bytes(self._pending_out) + out
            self._pending_out = b""
        return out

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        with self._send_conflict:
            self._check_status()
            async with self._send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort), then close the transport.

        Ciphertext a fast pump left queued goes out before ``close_notify``.
        On a socket both are first written without waiting, so even a
        cancelled close (:func:`trio.aclose_forcefully`) tells the peer the
        stream ended cleanly whenever the socket has room.

        Cancellation:
            Safe: a cancelled ``aclose`` still closes the transport and leaves
            the stream closed.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._state is _State.BROKEN or not self._handshake_ok:
            self._state = _State.CLOSED
            await self.transport_stream.aclose()
            return
        self._state = _State.CLOSED
        try:
            with contextlib.suppress(ssl.SSLError):
                # Writes close_notify; the peer's reply is not awaited (as
                # trio.SSLStream does), so SSLWantReadError is expected.
                self._obj.unwrap()
            out = self._take_outgoing()
            if out and self.fd >= 0:
                with contextlib.suppress(OSError):
                    out = out[fastpath.write_nowait(self.sock, out) :]
            if out:
                with contextlib.suppress(trio.BrokenResourceError, trio.BusyResourceError):
                    async with self._send_lock:
                        await self.transport_stream.send_all(out)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()

    # -- fast path (relay.fastpath.Endpoint) ------------------------------------------

    def fast_endpoint(self) -> _StdlibStream | None:
        """This stream as a :class:`relay.fastpath.Endpoint`, or ``None``.

        Only a stream over a :class:`trio.SocketStream`, with its handshake
        done and not broken or closed, qualifies.  The caller must not call
        the stream's async methods while it uses the endpoint.
        """
        if self.fd < 0 or self._state is not _State.OK or not self._handshake_ok:
            return None
        self.maybe_readable = True
        self._decrypt_first = bool(self._incoming.pending or self._obj.pending())
        return self

    def receive_nowait(self) -> memoryview | None:
        """See :meth:`relay.fastpath.Endpoint.receive_nowait`.

        Reads the socket once, then decrypts every complete record into the
        shared plaintext buffer, so several records cost one call.
        """
        if self._deferred_error is not None:
            exc, self._deferred_error = self._deferred_error, None
            raise self._broken(exc) from exc
        if self._eof:
            return fastpath.EMPTY
        incoming = self._incoming
        if self._decrypt_first:
            # Complete records may wait in OpenSSL: the plaintext buffer filled
            # up last time, or they came in behind the tunnel request.
            self._decrypt_first = False
        else:
            try:
                data = fastpath.read_nowait(self)
            except OSError as exc:
                raise self._broken(exc) from exc
            if data is None:
                return None
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
        obj = self._obj
        view = fastpath.PLAINTEXT_VIEW
        size = fastpath.PLAINTEXT_SIZE
        got = 0
        while True:
            try:
                count = obj.read(size - got, view[got:])
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # EOF without close_notify counts as EOF, as in https_compatible mode.
                self._eof = True
                break
            except ssl.SSLError as exc:
                if not got:
                    raise self._broken(exc) from exc
                # Deliver what decrypted cleanly first.
                self._deferred_error = exc
                break
            if not count:
                # The ssl module reads close_notify as 0 bytes.
                self._eof = True
                break
            got += count
            if got == size:
                self._decrypt_first = self.maybe_readable = True
                break
            if not incoming.pending and not obj.pending():
                # Everything received is decrypted; skip the SSLWantReadError.
                break
        if self._outgoing.pending:
            # A post-handshake message asked for an answer (KeyUpdate).  What
            # the socket does not take now goes out ahead of the next send.
            self._write_out(b"")
        if got:
            if self._eof or self._deferred_error is not None:
                # Reported by the next call, which must not wait for the
                # socket: the peer may send nothing more.
                self.maybe_readable = True
            return view[:got]
        return fastpath.EMPTY if self._eof else None

    def send_nowait(self, data: memoryview) -> bool:
        """See :meth:`relay.fastpath.Endpoint.send_nowait`."""
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise self._broken(exc) from exc
        return self._write_out(self._outgoing.read())

    def flush_nowait(self) -> bool:
        """See :meth:`relay.fastpath.Endpoint.flush_nowait`."""
        if not self._pending_out:
            return True
        return self._write_out(b"")

    def _write_out(self, out: bytes) -> bool:
        if self._pending_out:
            out = bytes(self._pending_out) + out
        try:
            sent = fastpath.write_nowait(self.sock, out)
        except OSError as exc:
            raise self._broken(exc) from exc
        if sent == len(out):
            self._pending_out = b""
            return True
        self._pending_out = memoryview(out)[sent:]
        return False

    # -- introspection ----------------------------------------------------------

    def tls_info(self) -> TLSInfo:
        """What the handshake negotiated.

        Raises:
            trio.NeedHandshakeError: the handshake has not completed.
        """
        if not self._handshake_ok:
            raise trio.NeedHandshakeError("call do_handshake() before tls_info()")
        obj = self._obj
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
        # No TLS 1.3 session tickets: the connector never resumes a session,
        # and each client kept two of them (with the server's certificate),
        # about 16 KiB per tunnel, besides the server's work to issue them.
        ctx.num_tickets = 0
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
        return _StdlibStream(transport, self.context, server_side=True)


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
            transport, self.context, server_side=False, server_hostname=server_hostname
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
