"""One TLS connection over memory buffers, whichever engine runs it (sans-IO).

:class:`TLSConnection` is the part of TLS the relay writes itself: the order in
which ciphertext leaves, the session tickets a TLS 1.3 server holds back, an
error met behind good records, and what an EOF means.  It does no I/O: bytes
from the wire go in with :meth:`~TLSConnection.receive`, bytes for the wire
come out of :meth:`~TLSConnection.outgoing`.  The trio stream
(:mod:`relay.datapath.stream`) and the pump (:mod:`relay.datapath.pump`) both
drive the same object, so a tunnel can move from one to the other and back.

An :class:`Engine` is the thin part that differs: the standard library's
``ssl`` (:mod:`relay.tls`) or pyOpenSSL (:mod:`relay.tls_openssl`), each
reduced to handshake, read, write and shutdown over its memory BIOs.  The
hardening both engines apply is written once here (:data:`TLS12_CIPHERS`,
:func:`min_version`).

An EOF without ``close_notify`` is an error on both engines (:data:`TRUNCATED`):
RFC 8446 section 6.1 requires ``close_notify`` before closing, and without it
nobody can tell a peer that finished from a connection cut mid-stream, so
calling it a clean close would claim more than we know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import LocalProtocolError

__all__ = [
    "ALPN",
    "PQ_GROUPS",
    "TLS12_CIPHERS",
    "TRUNCATED",
    "Engine",
    "TLSConnection",
    "TLSError",
    "TLSInfo",
    "attempt",
    "is_pq_group",
    "min_version",
]

#: The one application protocol we speak inside TLS: an HTTP/1.1 CONNECT.
ALPN = "http/1.1"

#: TLS 1.2 suites: forward secrecy and AEAD only (RFC 7525 section 4.2).  TLS 1.3
#: suites are all AEAD and keep OpenSSL's defaults.  Both engines also turn off
#: compression (CRIME) and renegotiation (RFC 7457): nothing we carry needs either.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: Hybrid post-quantum key-exchange groups (draft-ietf-tls-ecdhe-mlkem).
PQ_GROUPS = frozenset({"X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024"})

#: What a connection cut without ``close_notify`` is reported as, on both engines.
TRUNCATED = "the peer closed the connection without a TLS close_notify"

_MIN_VERSIONS = ("1.2", "1.3")

#: The plaintext of one full TLS record (RFC 8446 section 5.1).
RECORD_PLAINTEXT = 16384

#: Plaintext :meth:`TLSConnection.decode` takes out per call at most: three
#: full records, which one loopback TCP segment holds (65,483 bytes with
#: Linux's defaults).  The rest stays in TLS and is taken out once this much
#: is written (the codec's ``more``).  With the data path's read size
#: (:data:`relay.datapath.trio_driver.RECEIVE_SIZE`), no write the data path
#: makes, either way, is larger than one such segment.  A write just over it
#: went out as a full segment and one of a few dozen bytes (53 for four
#: decoded records, 141 for four encrypted ones), and a small segment costs
#: its receiver much more buffer than it carries.  A receiver that had stopped
#: reading then ran over its buffer before its window was used up, Linux
#: dropped a segment, and in a tunnel flooded both ways the retransmission
#: waited out a backoff of tens of seconds (README, "A stall in bulk echo").
PLAINTEXT_LIMIT = 3 * RECORD_PLAINTEXT


def is_pq_group(group: str) -> bool:
    """Whether ``group`` is a hybrid post-quantum key-exchange group."""
    return group in PQ_GROUPS


def min_version(text: str) -> str:
    """Check a ``tls.min_version`` value: ``"1.2"`` or ``"1.3"``.

    Raises:
        LocalProtocolError: anything else (``reason="bad_config"``).
    """
    if text not in _MIN_VERSIONS:
        raise LocalProtocolError(
            f'tls.min_version must be "1.2" or "1.3", got {text!r}', reason="bad_config"
        )
    return text


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
        peer_cn: Its subject's common name, if any.
        peer_sans: Its subjectAltName email, DNS and URI values.
        resumed: Whether the handshake resumed an earlier session (a TLS 1.3
            ticket) instead of running in full.
    """

    version: str
    cipher: str
    group: str
    alpn: str | None
    peer_subject: str | None = None
    peer_serial: int | None = None
    peer_cn: str | None = None
    peer_sans: tuple[str, ...] = ()
    resumed: bool = False


class TLSError(Exception):
    """The TLS session failed: a handshake refused, a bad record, or a cut.

    The message is one line meant for logs and the audit record; the engine's
    own exception is the ``__cause__``.
    """


def attempt(
    call: Callable[[], object],
    want_read: type[Exception],
    errors: type[Exception],
    failure: Callable[[Exception], TLSError],
) -> bool:
    """Run one engine step: True when done, False when it needs bytes.

    For engines that signal "need bytes" with an exception (both do).

    Raises:
        TLSError: ``failure(exc)``, from the engine's ``exc``.
    """
    try:
        call()
    except want_read:
        return False
    except errors as exc:
        raise failure(exc) from exc
    return True


class Engine(Protocol):
    """One engine's TLS connection in memory-BIO mode, reduced to what we use.

    Every method is synchronous and raises :class:`TLSError` (from the
    engine's exception) when TLS fails; an EOF without ``close_notify``
    raises ``TLSError(TRUNCATED)``.
    """

    server_side: bool
    #: Set by a :meth:`read` that returned plaintext: whether nothing more
    #: can be decrypted until new bytes come (``False`` when unsure).
    drained: bool

    def feed(self, data: bytes | memoryview) -> None:
        """Hand bytes received from the wire to the engine."""
        ...

    def feed_eof(self) -> None:
        """Tell the engine the wire reached EOF."""
        ...

    def buffered(self) -> bool:
        """Whether bytes fed earlier may still hold a complete record."""
        ...

    def handshake(self) -> bool:
        """Advance the handshake: True once done, False while it needs bytes."""
        ...

    def read(self, max_bytes: int) -> bytes | None:
        """Decrypt: plaintext, ``b""`` after ``close_notify``, ``None`` when it needs bytes."""
        ...

    def write(self, data: bytes | memoryview) -> None:
        """Encrypt all of ``data`` (a memory BIO takes everything)."""
        ...

    def take_outgoing(self) -> bytes:
        """All ciphertext the engine produced since the last call."""
        ...

    def shutdown(self) -> None:
        """Queue ``close_notify``."""
        ...

    def version(self) -> str | None:
        """The negotiated protocol version, once known."""
        ...

    def session(self) -> object | None:
        """The session to resume the next connection to the same peer with (client side)."""
        ...

    def resumed(self) -> bool:
        """Whether the finished handshake resumed the session it was given."""
        ...

    def info(self) -> TLSInfo:
        """What the finished handshake negotiated."""
        ...


class TLSConnection:
    """A TLS connection without I/O: wire bytes in, plaintext out, and back.

    Outgoing ciphertext stays here until the driver reports it sent
    (:meth:`sent`), so whoever moves bytes next, the trio stream or the pump,
    sends it first, in the order the engine produced it.

    Once the handshake is done it is also the pump's codec for its side
    (:class:`~relay.datapath.pump.Codec`: :meth:`decode`, :meth:`encode`,
    :meth:`outgoing`, :meth:`sent`, :meth:`buffered`, :attr:`more`).

    Args:
        engine: The engine's connection, already in accept or connect state.
    """

    __slots__ = (
        "engine",
        "_out",
        "_held",
        "_error",
        "_eof",
        "handshake_done",
        "broken",
        "more",
    )

    #: TLS does not half-close here: for the peers we serve, ``close_notify``
    #: ends the whole stream.
    can_half_close = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._out = b""
        # TLS 1.3 session tickets a server writes at the end of its handshake.
        # A client only reads them when it next reads; over a transport without
        # buffering, sending them then deadlocks.  They leave with the first
        # application data instead, as trio.SSLStream and BoringSSL do
        # (openssl/openssl#7948).
        self._held = b""
        self._error: TLSError | None = None
        self._eof = False
        #: Whether the handshake finished.
        self.handshake_done = False
        #: Whether TLS failed; nothing more can be read or written.
        self.broken = False
        #: Whether the last :meth:`read` stopped at its limit: whole records
        #: may be waiting that no new wire bytes need to bring.
        self.more = False

    # -- wire side ------------------------------------------------------------

    def receive(self, data: bytes | memoryview) -> None:
        """Bytes read from the wire; ``b""`` for EOF."""
        if data:
            self.engine.feed(data)
        else:
            self.engine.feed_eof()

    def outgoing(self) -> bytes:
        """Ciphertext waiting for the wire (held tickets excluded), not yet sent.

        A reply the engine owes after a read (a KeyUpdate of its own) leaves
        with the next write, which is when RFC 8446 section 4.6.3 wants it:
        looking for one after every read would cost pyOpenSSL a failing BIO
        read per chunk.
        """
        return self._out

    def sent(self, count: int) -> bytes:
        """``count`` bytes of :meth:`outgoing` reached the wire; returns the rest."""
        self._out = out = self._out[count:] if count < len(self._out) else b""
        return out

    def _pull(self) -> None:
        more = self.engine.take_outgoing()
        if more:
            self._out = self._out + more if self._out else more

    def buffered(self) -> bool:
        """Whether a read may return something without new bytes from the wire."""
        return self._eof or self._error is not None or self.engine.buffered()

    # -- handshake --------------------------------------------------------------

    def handshake(self) -> bool:
        """Advance the handshake: True once done, False while it needs bytes.

        Raises:
            TLSError: the handshake failed; :meth:`outgoing` holds the alert
                the engine wrote, to send before giving up.
        """
        engine = self.engine
        try:
            done = engine.handshake()
        except TLSError:
            self.broken = True
            self._pull()
            raise
        self._pull()
        if done:
            self.handshake_done = True
            if engine.server_side and engine.version() == "TLSv1.3":
                self._held, self._out = self._out, b""
        return done

    # -- plaintext side ---------------------------------------------------------

    def read(self, max_bytes: int) -> bytes | None:
        """Plaintext now: every complete record up to ``max_bytes``.

        Returns:
            The plaintext, ``b""`` once the peer sent ``close_notify`` (and
            every call after), or ``None`` when more bytes are needed.

        Raises:
            TLSError: a bad record, or an EOF without ``close_notify``.  When
                good records came first, they are returned first and the
                error is raised by the next call.
        """
        if self._error is not None:
            exc, self._error = self._error, None
            self.broken = True
            raise exc
        if self._eof:
            return b""
        engine = self.engine
        chunks: list[bytes] = []
        got = 0
        self.more = False
        while got < max_bytes:
            try:
                chunk = engine.read(max_bytes - got)
            except TLSError as exc:
                if not got:
                    self.broken = True
                    raise
                self._error = exc
                break
            if chunk is None:
                break
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
            if engine.drained:
                break  # the next read could only say it needs bytes
        else:
            self.more = True
        if not chunks:
            return b"" if self._eof else None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def decode(self, data: bytes | None) -> tuple[bytes, str | None]:
        """Wire bytes in, plaintext out, and how the stream ended right behind it.

        The pump's view of :meth:`receive` then :meth:`read`: a
        ``close_notify`` or an error decrypted in the same pass as good
        records is reported with them, so the pump need not wait on a peer
        that may send nothing more.

        Args:
            data: Bytes read from the wire; ``b""`` for EOF; ``None`` to
                decode only what is buffered.

        Returns:
            ``(plaintext, end)``: ``end`` is ``None`` while the stream goes
            on, ``""`` after ``close_notify``, else the error text.
        """
        if data is not None:
            self.receive(data)
        try:
            plain = self.read(PLAINTEXT_LIMIT)
        except TLSError as exc:
            return b"", str(exc)
        if plain is None:
            return b"", None
        if not plain or self._eof:
            return plain, ""
        if self._error is not None:
            exc, self._error = self._error, None
            self.broken = True
            return plain, str(exc)
        return plain, None

    def write(self, data: bytes | memoryview) -> bytes:
        """Encrypt ``data``; the ciphertext joins :meth:`outgoing`.

        Returns:
            All ciphertext waiting for the wire, as :meth:`outgoing`.

        Raises:
            TLSError: the engine refused (the connection is broken).
        """
        self._release_held()
        try:
            self.engine.write(data)
        except TLSError:
            self.broken = True
            raise
        self._pull()
        return self._out

    #: The pump's codec call for :meth:`write`.
    encode = write

    def _release_held(self) -> None:
        if self._held:
            self._out = self._out + self._held if self._out else self._held
            self._held = b""

    def close(self) -> None:
        """Queue ``close_notify`` behind everything else (best effort)."""
        self._release_held()
        try:
            self.engine.shutdown()
        except TLSError:
            pass
        self._pull()

    def info(self) -> TLSInfo:
        """What the handshake negotiated (call once it is done)."""
        return self.engine.info()
