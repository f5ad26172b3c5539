"""The ``pyopenssl`` TLS engine: pyOpenSSL in memory-BIO mode, driven by trio.

Why a second engine: the standard library's ``ssl`` module is bound to the
system OpenSSL, which has no post-quantum key exchange.  pyOpenSSL runs on the
OpenSSL that ships inside the ``cryptography`` wheel, which offers the hybrid
group X25519MLKEM768 first (draft-ietf-tls-ecdhe-mlkem).  Debugging traffic can
carry process memory, so a recorded session has to stay secret long after the
fact ("harvest now, decrypt later").  The second reason is error reporting:
:class:`trio.SSLStream` drops a failed handshake without sending the alert
OpenSSL produced, so a client sees a bare EOF where it should see
``protocol_version`` or ``certificate_required``.  :class:`OpenSSLStream` always
flushes that alert before giving up.

The stream follows :class:`trio.SSLStream` closely (same locking scheme, same
cancellation rules) so the two engines are interchangeable behind
:mod:`relay.tls`.

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
import operator
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TypeVar

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from OpenSSL import SSL
from OpenSSL.crypto import X509

from . import fastpath
from .errors import LocalProtocolError
from .tls import ALPN, TLSInfo

__all__ = [
    "OpenSSLStream",
    "ServerEngine",
    "ClientEngine",
    "make_server_context",
    "make_client_context",
    "open_server_stream",
    "open_client_stream",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# A server name to check: a lower-case A-label DNS name or an IP address.
_Wanted = str | ipaddress.IPv4Address | ipaddress.IPv6Address
_Verifier = Callable[[SSL.Connection, X509, int, int, int], bool]

# TLS 1.2 suites: forward secrecy and AEAD only (RFC 7525 section 4.2).  TLS 1.3
# suites are all AEAD and keep OpenSSL's defaults.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# Bytes asked of the transport per receive, and the default plaintext size of
# receive_some().  64 KiB matches trio's socket default and keeps the number of
# awaits per megabyte low.
_RECEIVE_SIZE = 65536

# Bytes taken from the outgoing memory BIO per read.  64 KiB of plaintext is
# four records, i.e. 64 KiB plus up to 4 * 29 bytes of record overhead, so this
# size drains a typical send_all() in one read instead of two plus a join.
_BIO_READ_SIZE = 65536 + 4096

# Plaintext asked of OpenSSL per SSL_read on the fast path: one full record.
_RECORD_SIZE = 16384

# Verification error codes by number, for readable messages
# ("ERR_CERT_HAS_EXPIRED" rather than 10).
_X509_ERRORS = {
    value: name
    for name, value in vars(SSL.X509VerificationCodes).items()
    if name.startswith("ERR_") and isinstance(value, int)
}


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
        return "the peer closed the connection without a TLS close_notify"
    reasons: list[str] = []
    if exc.args and isinstance(exc.args[0], list):
        for entry in exc.args[0]:
            if isinstance(entry, tuple) and entry and entry[-1] and entry[-1] not in reasons:
                reasons.append(str(entry[-1]))
    return "; ".join(reasons) or repr(exc)


class OpenSSLStream(trio.abc.Stream):
    """A TLS stream over any :class:`trio.abc.Stream`, run by pyOpenSSL.

    OpenSSL reads from and writes to in-memory buffers (``Connection(ctx, None)``);
    this class moves those bytes to and from ``transport_stream``.  It behaves
    like :class:`trio.SSLStream`: one task may send while another receives,
    two concurrent senders (or receivers) get :class:`trio.BusyResourceError`,
    TLS errors become :class:`trio.BrokenResourceError` raised ``from`` the
    OpenSSL error, an EOF without ``close_notify`` is
    :class:`trio.BrokenResourceError` and a clean ``close_notify`` reads as
    ``b""``.

    Use :func:`open_server_stream` or :func:`open_client_stream` to build one.

    Args:
        transport_stream: The stream carrying TLS records.
        connection: A memory-BIO :class:`OpenSSL.SSL.Connection`, already put in
            accept (server) or connect (client) state.
        server_side: Whether ``connection`` is the server end.

    Attributes:
        transport_stream: The wrapped stream.

    Resource handling:
        The stream owns ``transport_stream``: :meth:`aclose` closes it.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        connection: SSL.Connection,
        *,
        server_side: bool,
    ) -> None:
        self.transport_stream = transport_stream
        self._conn = connection
        self._server_side = server_side
        self._notes = _Notes()
        connection.set_app_data(self._notes)
        self._state = _State.OK
        self._handshake_started = False
        self._handshake_ok = False
        self._handshake_done = trio.Event()
        # TLS 1.3 session tickets the server wrote at the end of its handshake;
        # held back until the first send (see _retry).
        self._delayed_outgoing = b""
        # An error met after some plaintext was already decrypted; raised on
        # the next read so that plaintext is delivered first.
        self._deferred_error: SSL.Error | None = None
        # The inner send lock must be strictly FIFO: bytes leave the outgoing
        # BIO in order, and must reach the transport in the same order.
        self._inner_send_lock = trio.StrictFIFOLock()
        self._inner_recv_lock = trio.Lock()
        self._inner_recv_count = 0
        self._send_conflict = _ConflictDetector(
            "another task is currently sending data on this OpenSSLStream"
        )
        self._recv_conflict = _ConflictDetector(
            "another task is currently receiving data on this OpenSSLStream"
        )
        # Fast path state (see fast_endpoint()).
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
        self._records = _RecordCounter()

    # -- state ----------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLS stream is broken by an earlier error")
        raise trio.ClosedResourceError("this TLS stream was closed")

    def _mark_broken(self) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN

    # -- moving bytes between OpenSSL and the transport -----------------------

    def _drain_outgoing(self) -> bytes:
        """Everything OpenSSL has written to its outgoing memory BIO."""
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

    async def _flush_alert(self) -> None:
        """Send what OpenSSL queued while failing: normally a fatal alert.

        Best effort: if the transport is gone, the peer sees EOF instead.
        """
        to_send = self._drain_outgoing()
        if not to_send:
            return
        try:
            async with self._inner_send_lock:
                await self.transport_stream.send_all(to_send)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass

    async def _retry(
        self,
        fn: Callable[..., _T],
        *args: object,
        ignore_want_read: bool = False,
        is_handshake: bool = False,
    ) -> _T | None:
        """Call ``fn(*args)`` on the connection until OpenSSL stops asking for I/O.

        This mirrors ``trio.SSLStream._retry``: between two calls into OpenSSL
        we await exactly one thing (send what OpenSSL wrote, else receive what
        it asked for), because other tasks may use the connection while we
        wait.  Sending wins over receiving, and the data taken from the
        outgoing BIO is queued on a FIFO lock without yielding first, so
        records reach the transport in the order OpenSSL produced them.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        finished = False
        ret = None
        while not finished:
            want_read = False
            try:
                ret = fn(*args)
            except SSL.WantReadError:
                want_read = True
            except SSL.Error as exc:
                self._mark_broken()
                # OpenSSL put its alert in the outgoing BIO; the peer should
                # read "protocol version" or "certificate required", not EOF.
                await self._flush_alert()
                reason = self._notes.failure or _describe(exc)
                raise trio.BrokenResourceError(f"TLS error: {reason}") from exc
            else:
                finished = True
            if ignore_want_read:
                want_read = False
                finished = True
            to_send = self._drain_outgoing()

            # A TLS 1.3 server finishes its handshake by writing session
            # tickets.  The client may not read them until it has something
            # to read, so sending them now can deadlock a transport without
            # buffering; send them with the first application data instead,
            # as BoringSSL does.  https://github.com/openssl/openssl/issues/7948
            # and https://github.com/python-trio/trio/issues/819
            if (
                is_handshake
                and not want_read
                and self._server_side
                and self._conn.get_protocol_version_name() == "TLSv1.3"
            ):
                self._delayed_outgoing = to_send
                to_send = b""

            if to_send:
                try:
                    async with self._inner_send_lock:
                        yielded = True
                        if self._delayed_outgoing:
                            to_send = self._delayed_outgoing + to_send
                            self._delayed_outgoing = b""
                        await self.transport_stream.send_all(to_send)
                except BaseException:
                    # Some unknown part of a record may have been sent: the
                    # stream cannot be used any more.
                    self._mark_broken()
                    raise
            elif want_read:
                # Someone else may already be receiving; wait for them instead
                # of receiving again (their data may be exactly what we need,
                # and no more may be coming).
                recv_count = self._inner_recv_count
                async with self._inner_recv_lock:
                    yielded = True
                    if recv_count == self._inner_recv_count:
                        data = await self.transport_stream.receive_some(_RECEIVE_SIZE)
                        if data:
                            self._conn.bio_write(data)
                            self._records.feed(data)
                        else:
                            self._conn.bio_shutdown()
                        self._inner_recv_count += 1
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return ret

    # -- handshake ------------------------------------------------------------

    async def _ensure_handshake(self, *, checkpoint: bool) -> None:
        if not self._handshake_started:
            self._handshake_started = True
            try:
                await self._retry(self._conn.do_handshake, is_handshake=True)
            except BaseException:
                self._mark_broken()
                raise
            else:
                self._handshake_ok = True
            finally:
                self._handshake_done.set()
        elif not self._handshake_done.is_set():
            await self._handshake_done.wait()
            self._check_status()
        elif checkpoint:
            await trio.lowlevel.checkpoint()

    async def do_handshake(self) -> None:
        """Run the TLS handshake now, or wait for the one already running.

        Sending or receiving runs the handshake implicitly; call this to
        authenticate the peer before doing anything else (and under a
        deadline).  Returns at once, after a checkpoint, when the handshake
        already finished.

        Raises:
            trio.BrokenResourceError: the handshake failed.  The alert OpenSSL
                generated (``protocol_version``, ``certificate_required``, ...)
                has been sent to the peer first, as far as the transport
                allowed.
            trio.ClosedResourceError: the stream was closed.

        Cancellation:
            Cancelling a handshake midway leaves the stream broken: every
            later call raises :class:`trio.BrokenResourceError`.  Close it with
            :meth:`aclose`, which then just closes the transport.
        """
        self._check_status()
        await self._ensure_handshake(checkpoint=True)

    # -- data -----------------------------------------------------------------

    def _read(self, max_bytes: int) -> bytes:
        """Decrypt up to ``max_bytes``, gathering every complete record buffered.

        OpenSSL returns one record (at most 16 KiB) per ``SSL_read``; taking all
        the records already in the BIO saves an await per record.
        """
        if self._deferred_error is not None:
            exc, self._deferred_error = self._deferred_error, None
            raise exc
        conn = self._conn
        try:
            first = conn.recv(max_bytes)
        except SSL.ZeroReturnError:
            return b""
        got = len(first)
        if got >= max_bytes:
            return first
        chunks = [first]
        try:
            while got < max_bytes:
                chunk = conn.recv(max_bytes - got)
                chunks.append(chunk)
                got += len(chunk)
        except (SSL.WantReadError, SSL.ZeroReturnError):
            pass
        except SSL.Error as exc:
            self._deferred_error = exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive and decrypt some data.

        See :meth:`trio.abc.ReceiveStream.receive_some`.  Returns ``b""`` once
        the peer sent ``close_notify``.

        Raises:
            trio.BrokenResourceError: a TLS error, or the transport ended
                without ``close_notify``.
            trio.BusyResourceError: another task is receiving.
            trio.ClosedResourceError: this stream was closed.

        Cancellation:
            Cancelling during the implicit handshake breaks the stream, as for
            :meth:`do_handshake`; afterwards it is safe.
        """
        with self._recv_conflict:
            if max_bytes is None:
                max_bytes = _RECEIVE_SIZE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_status()
            await self._ensure_handshake(checkpoint=False)
            return await self._retry(self._read, max_bytes)

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
            await self._ensure_handshake(checkpoint=False)
            if not data:
                await trio.lowlevel.checkpoint()
                return
            # sendall loops over SSL_write in C-sized steps; into a memory BIO
            # every write succeeds, so this is one pass over the data.
            await self._retry(self._conn.sendall, data)

    async def wait_send_all_might_not_block(self) -> None:
        """See :meth:`trio.abc.SendStream.wait_send_all_might_not_block`."""
        with self._send_conflict:
            self._check_status()
            async with self._inner_send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    def _shutdown(self) -> None:
        self._conn.shutdown()

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort), then close the transport.

        When the handshake never completed, or the stream is broken, there is
        no session to close and only the transport is closed.

        Cancellation:
            Safe: a cancelled ``aclose`` still closes the transport (forcefully)
            and leaves the stream closed.  Sending ``close_notify`` waits for
            the transport, so bound it with a timeout when the peer may not be
            reading.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        if self._state is _State.BROKEN or not self._handshake_ok:
            self._state = _State.CLOSED
            await self.transport_stream.aclose()
            return
        try:
            if self.fd >= 0 and not self._inner_send_lock.locked():
                # Over a socket nobody is sending on, close_notify goes out
                # without waiting, so even aclose_forcefully() (cancelled at
                # once) ends the session cleanly when the socket has room.
                rest = self._shutdown_nowait()
                if rest:
                    async with self._inner_send_lock:
                        await self.transport_stream.send_all(rest)
            else:
                await self._retry(self._shutdown, ignore_want_read=True)
        except (trio.BrokenResourceError, trio.BusyResourceError):
            # The peer went away or another task holds the transport:
            # close without close_notify.
            await trio.aclose_forcefully(self.transport_stream)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        else:
            await self.transport_stream.aclose()
        finally:
            self._state = _State.CLOSED

    def _shutdown_nowait(self) -> bytes:
        """Queue close_notify; send it, behind everything held back, as far as
        the socket takes it now.  Returns the rest, still to be sent."""
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()
        out = self._delayed_outgoing + self._drain_outgoing()
        self._delayed_outgoing = b""
        try:
            return out[fastpath.write_nowait(self.sock, out) :]
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc

    # -- fast path (relay.fastpath.Endpoint) ------------------------------------

    def fast_endpoint(self) -> OpenSSLStream | None:
        """This stream as a :class:`relay.fastpath.Endpoint`, or ``None``.

        Only a stream over a :class:`trio.SocketStream`, with its handshake
        done and not broken or closed, qualifies.  The caller must not call
        the stream's async methods while it uses the endpoint; afterwards it
        may, and :meth:`aclose` sends whatever the endpoint left queued
        before ``close_notify``.
        """
        if self.fd < 0 or self._state is not _State.OK or not self._handshake_ok:
            return None
        self.maybe_readable = True
        # Records may wait in the incoming BIO, read behind the tunnel request:
        # decrypt until OpenSSL wants more before reading the socket.
        self._records.forget()
        return self

    def _fast_broken(self, exc: BaseException) -> trio.BrokenResourceError:
        self._mark_broken()
        if isinstance(exc, SSL.Error):
            return trio.BrokenResourceError(f"TLS error: {_describe(exc)}")
        return trio.BrokenResourceError(f"socket error: {exc}")

    def receive_nowait(self) -> memoryview | None:
        """See :meth:`relay.fastpath.Endpoint.receive_nowait`.

        Reads the socket once into the shared receive buffer, hands that to
        OpenSSL, then decrypts every complete record, so several records cost
        one system call.
        """
        if self._deferred_error is not None:
            exc, self._deferred_error = self._deferred_error, None
            raise self._fast_broken(exc) from exc
        if self._eof:
            return fastpath.EMPTY
        conn = self._conn
        records = self._records
        if not records.pending:
            try:
                data = fastpath.read_nowait(self)
            except OSError as exc:
                raise self._fast_broken(exc) from exc
            if data is None:
                return None
            if data:
                conn.bio_write(data)
                records.feed(data)
            else:
                conn.bio_shutdown()
                records.forget()  # OpenSSL tells a clean close from a cut
        chunks: list[bytes] = []
        got = 0
        while records.pending:
            try:
                chunk = conn.recv(_RECORD_SIZE)
            except SSL.WantReadError:
                records.drained()
                break
            except SSL.ZeroReturnError:
                self._eof = True
                break
            except SSL.Error as exc:
                if not got:
                    raise self._fast_broken(exc) from exc
                # Deliver what decrypted cleanly first.
                self._deferred_error = exc
                break
            records.consumed()
            chunks.append(chunk)
            got += len(chunk)
            if got >= fastpath.RECEIVE_SIZE:
                # Enough for one chunk; the rest stays in OpenSSL for next time.
                self.maybe_readable = True
                break
        # A post-handshake message may have made OpenSSL queue an answer (a
        # KeyUpdate of our own).  It goes out with the next send, which is when
        # RFC 8446 section 4.6.3 wants it; draining here would cost a failing
        # BIO read per chunk.
        if got:
            if self._eof or self._deferred_error is not None:
                # Reported by the next call, which must not wait for the
                # socket: the peer may send nothing more.
                self.maybe_readable = True
            return memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        return fastpath.EMPTY if self._eof else None

    def send_nowait(self, data: memoryview) -> bool:
        """See :meth:`relay.fastpath.Endpoint.send_nowait`."""
        conn = self._conn
        try:
            # pyOpenSSL enables partial writes: one SSL_write takes one record
            # (16 KiB).  This loop is sendall() without its per-call cost,
            # which is more than the encryption of a small chunk.
            sent = conn.send(data)
            while sent < len(data):
                sent += conn.send(data[sent:])
        except SSL.Error as exc:
            raise self._fast_broken(exc) from exc
        return self._write_out(self._drain_outgoing())

    def flush_nowait(self) -> bool:
        """See :meth:`relay.fastpath.Endpoint.flush_nowait`."""
        return not self._delayed_outgoing or self._write_out(b"")

    def _write_out(self, out: bytes) -> bool:
        """Send held-back ciphertext, then ``out``; keep what the socket refuses.

        The rest waits in ``_delayed_outgoing``, which every later sender
        (this endpoint, or the stream's own :meth:`_retry`) sends first.
        """
        if self._delayed_outgoing:
            out = self._delayed_outgoing + out
        if not out:
            return True
        try:
            sent = fastpath.write_nowait(self.sock, out)
        except OSError as exc:
            raise self._fast_broken(exc) from exc
        self._delayed_outgoing = out[sent:]
        return not self._delayed_outgoing

    # -- introspection --------------------------------------------------------

    def tls_info(self) -> TLSInfo:
        """What the handshake negotiated.

        ``peer_subject``/``peer_serial`` describe the client certificate and
        are set on the server side only, when the client presented one.

        Raises:
            trio.NeedHandshakeError: the handshake has not completed.
        """
        if not self._handshake_ok:
            raise trio.NeedHandshakeError("call do_handshake() before tls_info()")
        conn = self._conn
        alpn = conn.get_alpn_proto_negotiated()
        subject = serial = None
        if self._server_side:
            peer = conn.get_peer_certificate(as_cryptography=True)
            if peer is not None:
                subject = peer.subject.rfc4514_string()
                serial = peer.serial_number
        return TLSInfo(
            version=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name() or "unknown",
            group=conn.get_group_name() or "unknown",
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            peer_subject=subject,
            peer_serial=serial,
        )


# -- contexts -----------------------------------------------------------------


def _new_context(min_version: str) -> SSL.Context:
    try:
        minimum = _MIN_VERSIONS[min_version]
    except KeyError:
        raise LocalProtocolError(
            f'tls.min_version must be "1.2" or "1.3", got {min_version!r}', reason="bad_config"
        ) from None
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(minimum)
    # No compression (CRIME) and no renegotiation (RFC 7457): nothing we carry
    # needs either.
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(_TLS12_CIPHERS)
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
    ocsp_response: Callable[[], bytes | None] | None = None,
) -> SSL.Context:
    """Build a hardened server :class:`OpenSSL.SSL.Context`.

    TLS 1.2 minimum (1.3 with ``min_version="1.3"``), no compression, no
    renegotiation, server cipher preference, ECDHE+AEAD TLS 1.2 suites, and
    OpenSSL's default key-exchange groups (X25519MLKEM768 first).  Session
    resumption is off: a resumed session would skip the client-certificate
    checks, including revocation, and the relay does one handshake per tunnel.

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
        ocsp_response: Called per handshake; DER bytes are stapled, ``None``
            staples nothing.

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
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
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

    if ocsp_response is not None:
        ctx.set_ocsp_server_callback(_ocsp_stapler(ocsp_response))
    return ctx


def _client_cert_verifier(is_serial_revoked: Callable[[int], bool] | None) -> _Verifier:
    def verify(conn: SSL.Connection, cert: X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            _note(
                conn,
                f"client certificate rejected at depth {depth}: {_X509_ERRORS.get(errnum, errnum)}",
            )
            return False
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
            _note(
                conn,
                f"server certificate rejected at depth {depth}: {_X509_ERRORS.get(errnum, errnum)}",
            )
            return False
        if depth != 0:
            return True
        if not _certificate_matches(cert.to_cryptography(), wanted):
            _note(conn, f"the server certificate is not valid for {hostname!r}")
            return False
        return True

    return verify


class _RecordCounter:
    """Counts the complete TLS records in a byte stream fed in any pieces.

    The fast path hands OpenSSL everything the socket had, then calls
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
            if not 20 <= header[0] <= 23 or header[1] != 3 or body > 16384 + 2048:
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


def open_server_stream(ctx: SSL.Context, transport: trio.abc.Stream) -> OpenSSLStream:
    """Wrap an accepted transport as the server end of a TLS stream.

    Nothing is sent until the handshake runs (explicitly via
    :meth:`OpenSSLStream.do_handshake`, or on first use).
    """
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    return OpenSSLStream(transport, conn, server_side=True)


def open_client_stream(
    ctx: SSL.Context, transport: trio.abc.Stream, server_hostname: str
) -> OpenSSLStream:
    """Wrap a connected transport as the client end of a TLS stream.

    Sends SNI for DNS names (never for IP literals, RFC 6066 section 3) and
    checks the server certificate against ``server_hostname`` during the
    handshake.

    Raises:
        LocalProtocolError: ``server_hostname`` is not a DNS name or IP address.
    """
    wanted = _normalize_hostname(server_hostname)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if isinstance(wanted, str):
        conn.set_tlsext_host_name(wanted.encode("ascii"))
    conn.set_verify(ctx.get_verify_mode(), _server_cert_verifier(server_hostname, wanted))
    return OpenSSLStream(transport, conn, server_side=False)


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


class ServerEngine:
    """Server side of the ``pyopenssl`` engine, built from files.

    Raises:
        LocalProtocolError: a file cannot be loaded (``reason="bad_tls_files"``).
    """

    name = "pyopenssl"

    def __init__(
        self,
        *,
        cert: Path,
        key: Path,
        min_version: str,
        client_ca: Path | None,
        require_client_cert: bool,
        is_serial_revoked: Callable[[int], bool] | None,
        ocsp_response: Path | None,
    ) -> None:
        staple = None
        if ocsp_response is not None:
            der = _read_ocsp_response(Path(ocsp_response))
            # Read once: a reload (which rebuilds the engine) picks up a new file.
            staple = lambda: der  # noqa: E731
        self.context = make_server_context(
            cert=Path(cert),
            key=Path(key),
            min_version=min_version,
            client_ca=Path(client_ca) if client_ca is not None else None,
            require_client_cert=require_client_cert,
            is_serial_revoked=is_serial_revoked,
            ocsp_response=staple,
        )

    def wrap(self, transport: trio.abc.Stream) -> OpenSSLStream:
        return open_server_stream(self.context, transport)


class ClientEngine:
    """Client side of the ``pyopenssl`` engine (``dbgrelay connect``).

    Raises:
        LocalProtocolError: a file cannot be loaded (``reason="bad_tls_files"``).
    """

    name = "pyopenssl"

    def __init__(
        self,
        *,
        ca: Path | None,
        min_version: str,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        self.context = make_client_context(
            ca=Path(ca) if ca is not None else None,
            min_version=min_version,
            cert=Path(cert) if cert is not None else None,
            key=Path(key) if key is not None else None,
        )

    def wrap(self, transport: trio.abc.Stream, server_hostname: str) -> OpenSSLStream:
        return open_client_stream(self.context, transport, server_hostname)
