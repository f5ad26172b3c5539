"""The ``pyopenssl`` TLS engine: pyOpenSSL in memory-BIO mode, adapted to one stream.

Why a second engine: the standard library's ``ssl`` module is bound to the
system OpenSSL, which has no post-quantum key exchange.  pyOpenSSL runs on the
OpenSSL that ships inside the ``cryptography`` wheel, which offers the hybrid
group X25519MLKEM768 first (draft-ietf-tls-ecdhe-mlkem).  Debugging traffic can
carry process memory, so a recorded session has to stay secret long after the
fact ("harvest now, decrypt later").

This module is the engine's thin part: :class:`OpenSSLEngine` (handshake,
read, write over the memory BIOs), the contexts and the verification.  The
stream, the handshake loop, alerts on failure and what an EOF means are the
same for both engines (:class:`relay.datapath.stream.TLSStream`,
:class:`relay.datapath.tls.TLSConnection`).

Hostname verification: pyOpenSSL 26 has no public call for OpenSSL's
``X509_VERIFY_PARAM_set1_host``, so the client checks the name itself inside the
per-connection certificate verification callback, against the leaf
certificate's subjectAltName as parsed by ``cryptography``.  Doing it in the
callback (rather than after the handshake) means a mismatch aborts the
handshake before the client sends its Finished message or its own certificate.
DNS names match ``dNSName`` entries (a ``*`` is allowed as the whole leftmost
label only, RFC 6125 section 6.4.3); IP literals match ``iPAddress`` entries
only.  The subject common name is never consulted (RFC 6125 section 6.4.4; the
CA/Browser Forum requires SANs).

Revocation: a client certificate whose serial ``is_serial_revoked`` reports is
refused by the verification callback, so the handshake fails with a fatal
alert before any byte of the tunnel is read.  The callback has no public way to
set OpenSSL's verification error, so OpenSSL reports the refusal to the client
as ``internal_error`` rather than ``certificate_revoked``; the server-side
error names the revoked serial.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from OpenSSL.crypto import X509

from .datapath.stream import TLSStream
from .datapath.tls import (
    ALPN,
    RECORD_PLAINTEXT,
    TLS12_CIPHERS,
    TRUNCATED,
    TLSError,
    TLSInfo,
    attempt,
    min_version,
)
from .errors import LocalProtocolError

__all__ = [
    "OpenSSLEngine",
    "make_server_context",
    "make_client_context",
    "open_server_stream",
    "open_client_stream",
    "wrap_connection",
]

log = logging.getLogger(__name__)

# A server name to check: a lower-case A-label DNS name or an IP address.
_Wanted = str | ipaddress.IPv4Address | ipaddress.IPv6Address
_Verifier = Callable[[SSL.Connection, X509, int, int, int], bool]

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# Bytes taken from the outgoing memory BIO per read.  64 KiB of plaintext is
# four records, i.e. 64 KiB plus up to 4 * 29 bytes of record overhead, so this
# size drains a typical send_all() in one read instead of two plus a join.
_BIO_READ_SIZE = 65536 + 4096

# Verification error codes by number, for readable messages
# ("ERR_CERT_HAS_EXPIRED" rather than 10).
_X509_ERRORS = {
    value: name
    for name, value in vars(SSL.X509VerificationCodes).items()
    if name.startswith("ERR_") and isinstance(value, int)
}


class _Notes:
    """What a verification callback found, for the error message.

    Stored as the connection's app data so callbacks reach it without a
    reference cycle between the connection and the stream.
    """

    __slots__ = ("failure",)

    def __init__(self) -> None:
        self.failure: str | None = None


def _note(conn: SSL.Connection, failure: str) -> None:
    notes = conn.get_app_data()
    if isinstance(notes, _Notes) and notes.failure is None:
        notes.failure = failure


def _describe(exc: SSL.Error) -> str:
    """One line from a pyOpenSSL error: the OpenSSL reason strings."""
    if isinstance(exc, SSL.SysCallError):
        # The only system call a memory BIO makes fail is reading past its EOF.
        return TRUNCATED
    reasons: list[str] = []
    if exc.args and isinstance(exc.args[0], list):
        for entry in exc.args[0]:
            if isinstance(entry, tuple) and entry and entry[-1] and entry[-1] not in reasons:
                reasons.append(str(entry[-1]))
    return "; ".join(reasons) or repr(exc)


class OpenSSLEngine:
    """A pyOpenSSL connection as an :class:`~relay.datapath.tls.Engine`.

    OpenSSL reads from and writes to in-memory buffers (``Connection(ctx, None)``);
    the one :class:`~relay.datapath.stream.TLSStream` and the pump move
    those bytes.

    Args:
        conn: A memory-BIO :class:`OpenSSL.SSL.Connection`, already put in
            accept (server) or connect (client) state.
        server_side: Whether ``conn`` is the server end.
    """

    __slots__ = ("server_side", "_conn", "_notes", "_records", "drained")

    def __init__(self, conn: SSL.Connection, *, server_side: bool) -> None:
        self.server_side = server_side
        self._conn = conn
        self._notes = _Notes()
        conn.set_app_data(self._notes)
        self._records = _RecordCounter()
        self.drained = False

    def _failure(self, exc: SSL.Error) -> TLSError:
        return TLSError(self._notes.failure or _describe(exc))

    def feed(self, data: bytes | memoryview) -> None:
        self._conn.bio_write(bytes(data))
        self._records.feed(data)

    def feed_eof(self) -> None:
        self._conn.bio_shutdown()
        self._records.forget()  # OpenSSL tells a clean close from a cut

    def buffered(self) -> bool:
        return bool(self._records.pending or self._conn.pending())

    def handshake(self) -> bool:
        return attempt(self._conn.do_handshake, SSL.WantReadError, SSL.Error, self._failure)

    def read(self, max_bytes: int) -> bytes | None:
        conn = self._conn
        records = self._records
        # Without a complete record, SSL_read can only fail, and pyOpenSSL's
        # failure (an exception built from OpenSSL's error queue) costs about
        # as much as decrypting a small record.
        if not records.pending and not conn.pending():
            return None
        try:
            chunk = conn.recv(max_bytes)
        except SSL.WantReadError:
            records.drained()
            return None
        except SSL.ZeroReturnError:
            return b""
        except SSL.Error as exc:
            raise self._failure(exc) from exc
        pending = conn.pending()
        if not pending:
            records.consumed()
        self.drained = not (pending or records.pending)
        return chunk

    def write(self, data: bytes | memoryview) -> None:
        conn = self._conn
        try:
            # pyOpenSSL enables partial writes: one SSL_write takes one record
            # (16 KiB).  This loop is sendall() without its per-call cost.
            sent = conn.send(data)
            while sent < len(data):
                sent += conn.send(data[sent:])
        except SSL.Error as exc:
            raise self._failure(exc) from exc

    def take_outgoing(self) -> bytes:
        conn = self._conn
        try:
            first = conn.bio_read(_BIO_READ_SIZE)
        except SSL.WantReadError:
            return b""
        # A memory BIO hands out everything it holds up to the size asked, so a
        # short read means it is now empty.
        if len(first) < _BIO_READ_SIZE:
            return first
        chunks = [first]
        while True:
            try:
                chunk = conn.bio_read(_BIO_READ_SIZE)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _BIO_READ_SIZE:
                break
        return b"".join(chunks)

    def shutdown(self) -> None:
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()

    def version(self) -> str | None:
        return self._conn.get_protocol_version_name()

    def resumed(self) -> bool:
        # pyOpenSSL has no call for it; OpenSSL's own, on the same SSL object.
        return bool(_lib.SSL_session_reused(self._conn._ssl))

    def session(self) -> SSL.Session | None:
        # pyOpenSSL cannot tell whether a ticket came (the stdlib can): a
        # session without one is harmless, OpenSSL then runs a full handshake.
        return self._conn.get_session()

    def info(self) -> TLSInfo:
        """What the handshake negotiated.

        ``peer_subject``/``peer_serial`` describe the client certificate and
        are set on the server side only, when the client presented one.
        """
        conn = self._conn
        alpn = conn.get_alpn_proto_negotiated()
        subject = serial = cn = None
        sans: tuple[str, ...] = ()
        if self.server_side:
            peer = conn.get_peer_certificate(as_cryptography=True)
            if peer is not None:
                subject = peer.subject.rfc4514_string()
                serial = peer.serial_number
                cn, sans = _cert_names(peer)
        return TLSInfo(
            version=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name() or "unknown",
            group=conn.get_group_name() or "unknown",
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            peer_subject=subject,
            peer_serial=serial,
            peer_cn=cn,
            peer_sans=sans,
            resumed=self.resumed(),
        )


def _cert_names(cert: x509.Certificate) -> tuple[str | None, tuple[str, ...]]:
    """Common name and subjectAltName values (email, DNS, URI) of a certificate."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = cns[0].value if cns and isinstance(cns[0].value, str) else None
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return cn, ()
    sans = [
        *ext.get_values_for_type(x509.RFC822Name),
        *ext.get_values_for_type(x509.DNSName),
        *ext.get_values_for_type(x509.UniformResourceIdentifier),
    ]
    return cn, tuple(sans)


def wrap_connection(
    transport: trio.abc.Stream, conn: SSL.Connection, *, server_side: bool
) -> TLSStream:
    """A TLS stream over ``transport`` run by ``conn`` (in accept or connect state)."""
    return TLSStream.over(transport, OpenSSLEngine(conn, server_side=server_side))


# -- contexts -----------------------------------------------------------------


def _new_context(version: str) -> SSL.Context:
    """A context with the shared hardening (:mod:`relay.datapath.tls`), in pyOpenSSL terms."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_MIN_VERSIONS[min_version(version)])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(TLS12_CIPHERS.encode())
    # Free a connection's 16 KiB read and write buffers whenever they are
    # empty, as Python's ssl module does: an idle tunnel then holds about
    # 38 KiB of OpenSSL memory instead of 59 KiB (measured per end, 1,000 pairs).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # The key-exchange groups are deliberately left at OpenSSL's defaults,
    # which put X25519MLKEM768 first and fall back to X25519.
    return ctx


def _bad_file(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, reason="bad_tls_files")


def _read_file(what: str, path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _bad_file(f"cannot read the {what} {path}: {exc.strerror or exc}; {hint}") from exc


def _read_certificates(what: str, path: Path, hint: str) -> list[x509.Certificate]:
    data = _read_file(what, path, hint)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise _bad_file(f"the {what} {path} holds no readable PEM certificate; {hint}") from exc


def _load_identity(ctx: SSL.Context, cert: Path, key: Path | None) -> None:
    key = key if key is not None else cert
    chain = _read_certificates(
        "TLS certificate", cert, "it must be a PEM file with the leaf certificate first"
    )
    # The key is loaded with cryptography rather than use_privatekey_file: an
    # encrypted key then fails here instead of OpenSSL prompting on the
    # terminal for a passphrase.
    key_hint = "it must be an unencrypted PEM private key"
    key_data = _read_file("TLS private key", key, key_hint)
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError as exc:
        raise _bad_file(f"the TLS private key {key} is encrypted; {key_hint}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _bad_file(f"the TLS private key {key} holds no readable key; {key_hint}") from exc
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(private_key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError) as exc:
        raise _bad_file(
            f"the TLS private key {key} does not belong to the certificate {cert}; "
            "pass the key that was issued with it"
        ) from exc


def _load_cas(ctx: SSL.Context, ca: Path, what: str) -> None:
    hint = "it must hold one or more PEM CA certificates"
    _read_certificates(what, ca, hint)
    try:
        ctx.load_verify_locations(str(ca))
    except SSL.Error as exc:
        raise _bad_file(f"cannot load the {what} {ca}: {_describe(exc)}; {hint}") from exc


def _alpn_selector(protocols: Sequence[bytes]) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    ours = tuple(protocols)

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        for proto in ours:
            if proto in offered:
                return proto
        # Carry on without ALPN rather than abort, like the stdlib engine.
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def make_server_context(
    *,
    cert: Path,
    key: Path,
    min_version: str = "1.2",
    alpn: Sequence[bytes] = (ALPN.encode(),),
    client_ca: Path | None = None,
    require_client_cert: bool = False,
    is_serial_revoked: Callable[[int], bool] | None = None,
    ocsp_response: Path | Callable[[], bytes | None] | None = None,
    ticket_lifetime: float = 0.0,
) -> SSL.Context:
    """Build a hardened server :class:`OpenSSL.SSL.Context`.

    TLS 1.2 minimum (1.3 with ``min_version="1.3"``), no compression, no
    renegotiation, server cipher preference, ECDHE+AEAD TLS 1.2 suites, and
    OpenSSL's default key-exchange groups (X25519MLKEM768 first).

    Session resumption: off by default.  With ``ticket_lifetime`` seconds,
    the context issues stateless TLS 1.3 tickets (no server-side cache)
    sealed with a ticket key OpenSSL makes with the context, valid for that
    long; pyOpenSSL has no call to set or rotate the key itself, so the
    relay rotates it by building a new context.  A resumed handshake skips
    the client-certificate checks, including ``is_serial_revoked``: the
    relay checks revocation again after every handshake.

    Args:
        cert: PEM certificate chain, leaf first.
        key: PEM private key for ``cert`` (unencrypted).
        min_version: ``"1.2"`` or ``"1.3"``.
        alpn: Protocols to select from the client's offer, in our order.
        client_ca: PEM CA certificates for client certificates (mTLS); without
            it, no client certificate is requested.
        require_client_cert: Refuse clients without a certificate (TLS 1.3
            ``certificate_required`` alert).  Needs ``client_ca``.
        is_serial_revoked: Called with the client certificate's serial during
            the handshake; ``True`` refuses the handshake.
        ocsp_response: A DER OCSP response file to staple (read once: a
            reload, which rebuilds the context, picks up a new one), or a
            function called per handshake whose DER bytes are stapled
            (``None`` staples nothing).

    Raises:
        LocalProtocolError: a file cannot be loaded (``reason="bad_tls_files"``)
            or an option is invalid (``reason="bad_config"``).
    """
    if require_client_cert and client_ca is None:
        raise LocalProtocolError(
            "tls.require_client_cert needs tls.client_ca (the CA that issues client certificates)",
            reason="bad_config",
        )
    ctx = _new_context(min_version)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if ticket_lifetime > 0:
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_timeout(max(1, math.ceil(ticket_lifetime)))
        # Required to resume sessions whose client presented a certificate.
        ctx.set_session_id(b"dbgrelay")
    else:
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
    _load_identity(ctx, cert, key)
    ctx.set_alpn_select_callback(_alpn_selector(alpn))

    if client_ca is not None:
        _load_cas(ctx, client_ca, "client CA file")
        # Tell clients which CAs we accept, so they pick the right certificate.
        ctx.load_client_ca(str(client_ca).encode())
        mode = SSL.VERIFY_PEER
        if require_client_cert:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(mode, _client_cert_verifier(is_serial_revoked))

    if isinstance(ocsp_response, Path):
        der = _read_ocsp_response(ocsp_response)
        ocsp_response = lambda: der  # noqa: E731
    if ocsp_response is not None:
        ctx.set_ocsp_server_callback(_ocsp_stapler(ocsp_response))
    return ctx


def _rejected(conn: SSL.Connection, whose: str, errnum: int, depth: int) -> bool:
    """Note why OpenSSL's chain check failed, and keep the refusal."""
    _note(
        conn, f"{whose} certificate rejected at depth {depth}: {_X509_ERRORS.get(errnum, errnum)}"
    )
    return False


def _client_cert_verifier(is_serial_revoked: Callable[[int], bool] | None) -> _Verifier:
    def verify(conn: SSL.Connection, cert: X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            return _rejected(conn, "client", errnum, depth)
        if depth != 0 or is_serial_revoked is None:
            return True
        serial = cert.get_serial_number()
        try:
            revoked = is_serial_revoked(serial)
        except Exception:
            # Fail closed: if we cannot tell, the certificate does not get in.
            log.exception("tls.revocation_check_failed", extra={"serial": serial})
            _note(conn, f"the revocation check for client certificate serial {serial:#x} failed")
            return False
        if revoked:
            _note(conn, f"client certificate serial {serial:#x} is revoked")
            return False
        return True

    return verify


def _ocsp_stapler(
    ocsp_response: Callable[[], bytes | None],
) -> Callable[[SSL.Connection, object], bytes]:
    def staple(conn: SSL.Connection, data: object) -> bytes:
        try:
            der = ocsp_response()
        except Exception:
            # A missing staple is better than a failed handshake.
            log.exception("tls.ocsp_failed")
            return b""
        return der or b""

    return staple


def make_client_context(
    *,
    ca: Path | None,
    min_version: str = "1.2",
    alpn: Sequence[bytes] = (ALPN.encode(),),
    cert: Path | None = None,
    key: Path | None = None,
) -> SSL.Context:
    """Build a client :class:`OpenSSL.SSL.Context` that verifies the server.

    The hostname check is added per connection by :func:`open_client_stream`.

    Args:
        ca: PEM CA certificates to trust; ``None`` uses the system store.
        min_version: ``"1.2"`` or ``"1.3"``.
        alpn: Protocols to offer.
        cert: PEM client certificate chain for mTLS.
        key: Its private key; defaults to ``cert`` (key and chain in one file).

    Raises:
        LocalProtocolError: a file cannot be loaded (``reason="bad_tls_files"``)
            or an option is invalid (``reason="bad_config"``).
    """
    ctx = _new_context(min_version)
    if ca is not None:
        _load_cas(ctx, ca, "CA file")
    else:
        ctx.set_default_verify_paths()
    if cert is not None:
        _load_identity(ctx, cert, key)
    ctx.set_alpn_protos(list(alpn))
    ctx.set_verify(SSL.VERIFY_PEER)
    return ctx


# -- hostname verification ----------------------------------------------------


def _normalize_hostname(hostname: str) -> _Wanted:
    text = hostname.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        name = text.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        name = ""
    if not name or any(not label for label in name.split(".")):
        raise LocalProtocolError(
            f"server name {hostname!r} is neither a DNS name nor an IP address; "
            "pass the relay's host name as it appears in its certificate",
            reason="bad_config",
        )
    return name


def _dns_name_matches(pattern: str, hostname: str) -> bool:
    pattern = pattern.rstrip(".").lower()
    if pattern == hostname:
        return True
    # A wildcard is only the whole leftmost label, stands for exactly one
    # label, and needs at least two labels after it (RFC 6125 section 6.4.3).
    if not pattern.startswith("*."):
        return False
    suffix = pattern[2:]
    if "*" in suffix or "." not in suffix:
        return False
    head, sep, rest = hostname.partition(".")
    return bool(head) and bool(sep) and rest == suffix


def _certificate_matches(cert: x509.Certificate, wanted: _Wanted) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if isinstance(wanted, str):
        return any(
            _dns_name_matches(name, wanted) for name in san.get_values_for_type(x509.DNSName)
        )
    return wanted in san.get_values_for_type(x509.IPAddress)


def _server_cert_verifier(hostname: str, wanted: _Wanted) -> _Verifier:
    def verify(conn: SSL.Connection, cert: X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            return _rejected(conn, "server", errnum, depth)
        if depth != 0:
            return True
        if not _certificate_matches(cert.to_cryptography(), wanted):
            _note(conn, f"the server certificate is not valid for {hostname!r}")
            return False
        return True

    return verify


class _RecordCounter:
    """Counts the complete TLS records in a byte stream fed in any pieces.

    The pump hands OpenSSL everything the socket had, then calls
    ``SSL_read`` once per complete record: without the count it would call
    until OpenSSL says "want read", and with pyOpenSSL that failing call (an
    exception built from OpenSSL's error state) costs about as much as
    decrypting a small record.  A successful ``SSL_read`` consumes at least
    one record, so calling it at most ``count`` times never leaves a complete
    record unread.

    A header that no TLS peer sends (unknown content type, wrong major
    version, a length over the RFC 8446 limit) makes the count unbounded:
    OpenSSL then reads it at once and reports the error.
    """

    __slots__ = ("_left", "_head", "_lost", "pending")

    #: ``pending`` while the count is unknown: read until OpenSSL says stop.
    UNKNOWN = 1 << 62

    def __init__(self) -> None:
        self._left = 0  # body bytes still to come of the record being received
        self._head = b""  # an incomplete record header
        self._lost = False  # framing lost to a bad header: never count again
        #: Complete records fed and not yet known to be consumed.
        self.pending = 0

    def forget(self) -> None:
        """Someone else read records: count as unknown until :meth:`drained`."""
        self.pending = self.UNKNOWN

    def consumed(self) -> None:
        """One ``SSL_read`` returned data: it took at least one record."""
        if self.pending:
            self.pending -= 1

    def drained(self) -> None:
        """OpenSSL asked for more bytes: no complete record is left."""
        if not self._lost:
            self.pending = 0

    def feed(self, data: bytes | memoryview) -> None:
        """Account for ``data``, the next bytes written to OpenSSL's incoming BIO."""
        if self._lost:
            return
        n = len(data)
        i = self._left
        if i > n:
            self._left = i - n
            return
        count = 1 if i else 0
        self._left = 0
        head = self._head
        while True:
            if head:
                take = 5 - len(head)
                head += bytes(data[i : i + take])
                i += take
                if len(head) < 5:
                    break
                header, head = head, b""
            elif i + 5 <= n:
                header = data[i : i + 5]
                i += 5
            else:
                head = bytes(data[i:n])
                break
            body = (header[3] << 8) | header[4]
            if not 20 <= header[0] <= 23 or header[1] != 3 or body > RECORD_PLAINTEXT + 2048:
                self._lost = True
                self.pending = self.UNKNOWN
                return
            i += body
            if i > n:
                self._left = i - n
                break
            count += 1
        self._head = head
        self.pending += count


# -- streams ------------------------------------------------------------------


def open_server_stream(ctx: SSL.Context, transport: trio.abc.Stream) -> TLSStream:
    """Wrap an accepted transport as the server end of a TLS stream.

    Nothing is sent until the handshake runs (explicitly via
    :meth:`TLSStream.do_handshake`, or on first use).
    """
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    return wrap_connection(transport, conn, server_side=True)


def open_client_stream(
    ctx: SSL.Context,
    transport: trio.abc.Stream,
    server_hostname: str,
    session: SSL.Session | None = None,
) -> TLSStream:
    """Wrap a connected transport as the client end of a TLS stream.

    Sends SNI for DNS names (never for IP literals, RFC 6066 section 3) and
    checks the server certificate against ``server_hostname`` during the
    handshake.  ``session`` (from an earlier stream's ``session()``) asks the
    server to resume it.

    Raises:
        LocalProtocolError: ``server_hostname`` is not a DNS name or IP address.
    """
    wanted = _normalize_hostname(server_hostname)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if session is not None:
        conn.set_session(session)
    if isinstance(wanted, str):
        conn.set_tlsext_host_name(wanted.encode("ascii"))
    conn.set_verify(ctx.get_verify_mode(), _server_cert_verifier(server_hostname, wanted))
    return wrap_connection(transport, conn, server_side=False)


# -- engines used by relay.tls --------------------------------------------------


def _read_ocsp_response(path: Path) -> bytes:
    try:
        der = path.read_bytes()
        ocsp.load_der_ocsp_response(der)
    except (OSError, ValueError) as exc:
        raise LocalProtocolError(
            f"cannot load the OCSP response {path}: {exc}; "
            "it must be a DER-encoded OCSP response (openssl ocsp -respout)",
            reason="bad_tls_files",
        ) from exc
    return der
