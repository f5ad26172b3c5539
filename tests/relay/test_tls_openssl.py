"""Tests for relay.tls_openssl: real TLS handshakes with trustme certificates.

Transports are trio memory streams or real loopback sockets; the other end is
either this engine again or the standard library's ``ssl`` (system OpenSSL)
through :class:`trio.SSLStream`, so interop is checked against an independent
TLS implementation.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import ssl
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from relay.errors import LocalProtocolError
from relay.tls import TLSInfo, is_pq_group, make_client_engine, make_server_engine
from relay.tls_openssl import (
    make_client_context,
    make_server_context,
    open_client_stream,
    open_server_stream,
    wrap_connection,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PKI:
    ca: trustme.CA
    ca_pem: Path
    server_cert: Path
    server_key: Path
    leaf: trustme.LeafCert
    client_ca: trustme.CA
    client_ca_pem: Path
    tmp: Path

    def client_identity(self, name: str) -> tuple[Path, Path, int]:
        """A fresh client certificate from the client CA: (cert, key, serial)."""
        leaf = self.client_ca.issue_cert(name)
        cert = self.tmp / f"{name}.crt"
        key = self.tmp / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        return cert, key, serial

    def server_identity(self, *names: str) -> tuple[Path, Path]:
        leaf = self.ca.issue_cert(*names)
        stem = "_".join(n.replace("*", "star").replace(":", "_") for n in names)
        cert = self.tmp / f"srv-{stem}.crt"
        key = self.tmp / f"srv-{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    tmp = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    (tmp / "server.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(tmp / "server.key"))
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp / "client-ca.pem"))
    return PKI(
        ca=ca,
        ca_pem=tmp / "ca.pem",
        server_cert=tmp / "server.crt",
        server_key=tmp / "server.key",
        leaf=leaf,
        client_ca=client_ca,
        client_ca_pem=tmp / "client-ca.pem",
        tmp=tmp,
    )


def stdlib_client_context(pki: PKI, **kwargs: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    ctx.set_alpn_protocols(["http/1.1"])
    for name, value in kwargs.items():
        setattr(ctx, name, value)
    return ctx


def stdlib_server_context(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def outcome(afn, *args) -> BaseException | None:
    """Run ``afn``; return the exception it raised (None on success)."""
    try:
        await afn(*args)
    except Exception as exc:
        return exc
    return None


async def handshake_or_close(stream) -> BaseException | None:
    """Handshake; on failure close the stream, as a real peer would."""
    exc = await outcome(stream.do_handshake)
    if exc is not None:
        await stream.aclose()
    return exc


async def handshake_both(server, client) -> tuple[BaseException | None, BaseException | None]:
    results: dict[str, BaseException | None] = {}

    async def run(label, stream):
        results[label] = await handshake_or_close(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "server", server)
        nursery.start_soon(run, "client", client)
    return results["server"], results["client"]


def memory_pair(server_ctx, client_ctx, hostname="localhost"):
    """(server, client) pyOpenSSL TLS streams over an in-memory pair."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    return (
        open_server_stream(server_ctx, server_transport),
        open_client_stream(client_ctx, client_transport, hostname),
    )


@pytest.fixture
def server_ctx(pki: PKI) -> SSL.Context:
    return make_server_context(cert=pki.server_cert, key=pki.server_key)


@pytest.fixture
def client_ctx(pki: PKI) -> SSL.Context:
    return make_client_context(ca=pki.ca_pem)


# -- the generic stream contract ------------------------------------------------


async def test_passes_trio_two_way_stream_checks(server_ctx, client_ctx):
    async def stream_maker():
        server, client = memory_pair(server_ctx, client_ctx)
        return client, server

    async def clogged_stream_maker():
        client_transport, server_transport = trio.testing.lockstep_stream_pair()
        server = open_server_stream(server_ctx, server_transport)
        client = open_client_stream(client_ctx, client_transport, "localhost")
        # Handshake first, as trio's own SSLStream test does: otherwise a
        # receive_some meant to unclog the peer would itself start a handshake.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        return client, server

    await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


async def test_unclean_eof_is_broken_and_close_notify_is_clean(server_ctx, client_ctx):
    server, client = memory_pair(server_ctx, client_ctx)
    assert await handshake_both(server, client) == (None, None)
    await client.send_all(b"last words")
    await trio.aclose_forcefully(client.transport_stream)
    assert await server.receive_some() == b"last words"
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.receive_some()
    assert isinstance(info.value.__cause__, SSL.Error)
    assert "close_notify" in str(info.value)

    server, client = memory_pair(server_ctx, client_ctx)
    assert await handshake_both(server, client) == (None, None)
    await client.aclose()
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""
    await server.aclose()


async def test_large_transfer_keeps_order(server_ctx, client_ctx):
    server, client = memory_pair(server_ctx, client_ctx)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    received = bytearray()

    async def send():
        view = memoryview(payload)
        for start in range(0, len(payload), 100_000):
            await client.send_all(view[start : start + 100_000])
        await client.aclose()

    async def receive():
        while chunk := await server.receive_some():
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    assert received == payload


async def test_tls_info_requires_a_finished_handshake(server_ctx, client_ctx):
    server, client = memory_pair(server_ctx, client_ctx)
    with pytest.raises(trio.NeedHandshakeError):
        server.tls_info()
    await handshake_both(server, client)
    assert server.tls_info().version == "TLSv1.3"


# -- post-quantum key exchange ----------------------------------------------------


async def test_pyopenssl_pair_negotiates_hybrid_pq_tls13_and_alpn(server_ctx, client_ctx):
    server, client = memory_pair(server_ctx, client_ctx)
    assert await handshake_both(server, client) == (None, None)
    for info in (server.tls_info(), client.tls_info()):
        assert info.group == "X25519MLKEM768"
        assert is_pq_group(info.group)
        assert info.version == "TLSv1.3"
        assert info.alpn == "http/1.1"
        assert info.cipher.startswith("TLS_")
    # No client certificate was asked for.
    assert server.tls_info().peer_subject is None
    assert server.tls_info().peer_serial is None


PQ_ONLY_CLIENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import trio
    from relay.tls import make_client_engine

    async def main(port, ca):
        engine = make_client_engine(engine="pyopenssl", ca=Path(ca), min_version="1.3")
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        stream = engine.wrap(sock, "localhost")
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            print("handshake failed:", exc)
            sys.exit(3)
        await stream.send_all(b"ping")
        print(stream.tls_info().group, (await stream.receive_some()).decode())
        await stream.aclose()

    trio.run(main, int(sys.argv[1]), sys.argv[2])
    """
)


async def run_pq_only_client(pki: PKI, port: int) -> subprocess.CompletedProcess:
    """Our client in a subprocess whose OpenSSL offers only X25519MLKEM768.

    pyOpenSSL has no public call to set the group list, but the OpenSSL inside
    the ``cryptography`` wheel reads ``OPENSSL_CONF``; its ``system_default``
    section applies ``Groups`` to every context that process creates.
    """
    conf = pki.tmp / "pq-only.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nssl_conf = ssl_sect\n"
        "[ssl_sect]\nsystem_default = system_default_sect\n"
        "[system_default_sect]\nGroups = X25519MLKEM768\n"
    )
    env = dict(os.environ, OPENSSL_CONF=str(conf), PYTHONPATH=str(REPO))
    return await trio.run_process(
        [sys.executable, "-c", PQ_ONLY_CLIENT, str(port), str(pki.ca_pem)],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def serve_echo_once(nursery, server_wrap, infos: list[TLSInfo]) -> int:
    """Serve TLS echo connections on 127.0.0.1; return the port."""

    async def handler(sock):
        stream = server_wrap(sock)
        try:
            await stream.do_handshake()
            if hasattr(stream, "tls_info"):
                infos.append(stream.tls_info())
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_client_offering_only_x25519mlkem768_is_served_pq(pki):
    engine = make_server_engine(engine="pyopenssl", cert=pki.server_cert, key=pki.server_key)
    infos: list[TLSInfo] = []
    async with trio.open_nursery() as nursery:
        port = await serve_echo_once(nursery, engine.wrap, infos)
        result = await run_pq_only_client(pki, port)
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["X25519MLKEM768", "ping"]
    assert [info.group for info in infos] == ["X25519MLKEM768"]


async def test_pq_only_client_really_offers_nothing_classical(pki):
    # Control for the test above: the system OpenSSL behind the stdlib engine
    # has no ML-KEM, so the same client must fail against it.
    engine = make_server_engine(engine="stdlib", cert=pki.server_cert, key=pki.server_key)
    async with trio.open_nursery() as nursery:
        port = await serve_echo_once(nursery, engine.wrap, [])
        result = await run_pq_only_client(pki, port)
        nursery.cancel_scope.cancel()
    assert result.returncode == 3, result.stderr.decode()
    assert "handshake failed" in result.stdout.decode()


# -- interop with the standard library ------------------------------------------


async def test_pyopenssl_server_with_stdlib_client_in_memory(pki, server_ctx):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(server_ctx, server_transport)
    client = trio.SSLStream(
        client_transport, stdlib_client_context(pki), server_hostname="localhost"
    )
    assert await handshake_both(server, client) == (None, None)
    info = server.tls_info()
    # The system OpenSSL offers no hybrid group, so OpenSSL falls back to X25519.
    assert info.group == "x25519"
    assert not is_pq_group(info.group)
    assert info.alpn == "http/1.1"
    assert client.selected_alpn_protocol() == "http/1.1"
    await client.send_all(b"hello")
    assert await server.receive_some() == b"hello"
    await server.send_all(b"world")
    assert await client.receive_some() == b"world"
    await server.aclose()
    assert await client.receive_some() == b""
    await client.aclose()


async def test_stdlib_server_with_pyopenssl_client_in_memory(pki, client_ctx):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_transport, stdlib_server_context(pki), server_side=True)
    client = open_client_stream(client_ctx, client_transport, "localhost")
    assert await handshake_both(server, client) == (None, None)
    info = client.tls_info()
    assert (info.version, info.group, info.alpn) == ("TLSv1.3", "x25519", "http/1.1")
    await server.send_all(b"hello")
    assert await client.receive_some() == b"hello"
    await client.send_all(b"world")
    assert await server.receive_some() == b"world"
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_tls12_stdlib_client_gets_strong_suite(pki, server_ctx):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(server_ctx, server_transport)
    ctx = stdlib_client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    client = trio.SSLStream(client_transport, ctx, server_hostname="localhost")
    assert await handshake_both(server, client) == (None, None)
    info = server.tls_info()
    assert info.version == "TLSv1.2"
    assert info.cipher.startswith("ECDHE-") and ("GCM" in info.cipher or "CHACHA" in info.cipher)
    assert info.group == "x25519"


@pytest.mark.parametrize(
    ("server_engine", "client_engine"), [("pyopenssl", "stdlib"), ("stdlib", "pyopenssl")]
)
async def test_engines_interoperate_over_loopback_sockets(pki, server_engine, client_engine):
    server = make_server_engine(engine=server_engine, cert=pki.server_cert, key=pki.server_key)
    client = make_client_engine(engine=client_engine, ca=pki.ca_pem)
    infos: list[TLSInfo] = []
    payload = os.urandom(1024 * 1024)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo_handler(server.wrap, infos), 0, host="127.0.0.1")
        )
        sock = await trio.testing.open_stream_to_socket_listener(listeners[0])
        stream = client.wrap(sock, "localhost")
        await stream.do_handshake()
        echoed = bytearray()

        async def sender():
            await stream.send_all(payload)

        async with trio.open_nursery() as inner:
            inner.start_soon(sender)
            while len(echoed) < len(payload):
                echoed.extend(await stream.receive_some())
        info = stream.tls_info()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert echoed == payload
    assert (info.version, info.alpn) == ("TLSv1.3", "http/1.1")
    assert len(infos) == 1 and infos[0].version == "TLSv1.3"
    # Whichever side runs the system OpenSSL, the group falls back to X25519.
    pyopenssl_info = infos[0] if server_engine == "pyopenssl" else info
    assert pyopenssl_info.group == "x25519"


def echo_handler(wrap, infos):
    async def handler(sock):
        stream = wrap(sock)
        try:
            await stream.do_handshake()
            infos.append(stream.tls_info())
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return handler


# -- failed handshakes send their alert --------------------------------------------


def stdlib_alert(exc: BaseException | None) -> str:
    """The ssl.SSLError reason behind a trio.SSLStream failure."""
    assert isinstance(exc, trio.BrokenResourceError), exc
    cause = exc.__cause__
    assert isinstance(cause, ssl.SSLError), repr(cause)
    return cause.reason


async def test_tls11_client_gets_protocol_version_alert(pki, server_ctx):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(server_ctx, server_transport)
    ctx = stdlib_client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # The system OpenSSL 3.0 refuses to offer TLS 1.1 at the default level.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    client = trio.SSLStream(client_transport, ctx, server_hostname="localhost")
    server_exc, client_exc = await handshake_both(server, client)
    assert isinstance(server_exc, trio.BrokenResourceError)
    assert isinstance(server_exc.__cause__, SSL.Error)
    assert "unsupported protocol" in str(server_exc)
    # The alert itself reached the client, not just an EOF.
    assert stdlib_alert(client_exc) == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert "protocol version" in str(client_exc.__cause__)


async def test_tls12_client_gets_protocol_version_alert_when_13_is_required(pki):
    ctx13 = make_server_context(cert=pki.server_cert, key=pki.server_key, min_version="1.3")
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(ctx13, server_transport)
    ctx = stdlib_client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    client = trio.SSLStream(client_transport, ctx, server_hostname="localhost")
    server_exc, client_exc = await handshake_both(server, client)
    assert isinstance(server_exc, trio.BrokenResourceError)
    assert stdlib_alert(client_exc) == "TLSV1_ALERT_PROTOCOL_VERSION"


def mtls_server_context(pki: PKI, **kwargs) -> SSL.Context:
    return make_server_context(
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.client_ca_pem,
        require_client_cert=True,
        **kwargs,
    )


async def client_reads_after_handshake(client) -> BaseException | None:
    """In TLS 1.3 the server judges the client certificate after the client's
    handshake is done, so the client learns of a refusal on its first read."""
    exc = await outcome(client.do_handshake)
    if exc is None:
        exc = await outcome(client.receive_some)
    await client.aclose()
    return exc


@pytest.mark.parametrize("client_kind", ["stdlib", "pyopenssl"])
async def test_client_without_certificate_gets_certificate_required(pki, client_kind, client_ctx):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(mtls_server_context(pki), server_transport)
    if client_kind == "stdlib":
        client = trio.SSLStream(
            client_transport, stdlib_client_context(pki), server_hostname="localhost"
        )
    else:
        client = open_client_stream(client_ctx, client_transport, "localhost")
    results = {}

    async def run_server():
        results["server"] = await handshake_or_close(server)

    async def run_client():
        results["client"] = await client_reads_after_handshake(client)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        nursery.start_soon(run_client)
    assert isinstance(results["server"], trio.BrokenResourceError)
    assert "peer did not return a certificate" in str(results["server"])
    if client_kind == "stdlib":
        # TLS 1.3 alert 116 (RFC 8446 section 6.2).
        assert stdlib_alert(results["client"]) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    else:
        assert isinstance(results["client"], trio.BrokenResourceError)
        assert "certificate required" in str(results["client"])


async def mtls_exchange(pki, server_ctx, cert, key):
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(server_ctx, server_transport)
    ctx = stdlib_client_context(pki)
    ctx.load_cert_chain(str(cert), str(key))
    client = trio.SSLStream(client_transport, ctx, server_hostname="localhost")
    results = {}

    async def run_server():
        results["server"] = await handshake_or_close(server)
        if results["server"] is None:
            await server.send_all(b"welcome")

    async def run_client():
        exc = await outcome(client.do_handshake)
        if exc is None:
            try:
                results["data"] = await client.receive_some()
            except trio.BrokenResourceError as err:
                exc = err
        results["client"] = exc
        await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        nursery.start_soon(run_client)
    return server, results


async def test_client_certificate_identity_is_reported(pki):
    cert, key, serial = pki.client_identity("alice@example.com")
    server, results = await mtls_exchange(pki, mtls_server_context(pki), cert, key)
    assert results["server"] is None and results["client"] is None
    assert results["data"] == b"welcome"
    info = server.tls_info()
    assert info.peer_serial == serial
    assert info.peer_subject is not None and "O=trustme" in info.peer_subject


async def test_revoked_client_certificate_is_refused_during_handshake(pki):
    good_cert, good_key, good_serial = pki.client_identity("good@example.com")
    bad_cert, bad_key, bad_serial = pki.client_identity("mallory@example.com")
    asked: list[int] = []

    def is_serial_revoked(serial: int) -> bool:
        asked.append(serial)
        return serial == bad_serial

    ctx = mtls_server_context(pki, is_serial_revoked=is_serial_revoked)
    server, results = await mtls_exchange(pki, ctx, bad_cert, bad_key)
    assert isinstance(results["server"], trio.BrokenResourceError)
    assert f"serial {bad_serial:#x} is revoked" in str(results["server"])
    # The client got a fatal alert, not data and not a bare EOF.  pyOpenSSL's
    # verify callback cannot set OpenSSL's error code, so OpenSSL sends
    # internal_error rather than certificate_revoked (see the module docstring).
    assert "data" not in results
    assert stdlib_alert(results["client"]) == "TLSV1_ALERT_INTERNAL_ERROR"

    server, results = await mtls_exchange(pki, ctx, good_cert, good_key)
    assert results["server"] is None and results["data"] == b"welcome"
    assert server.tls_info().peer_serial == good_serial
    assert asked == [bad_serial, good_serial]


async def test_failing_revocation_check_refuses_the_client(pki, caplog):
    cert, key, serial = pki.client_identity("carol@example.com")

    def is_serial_revoked(serial: int) -> bool:
        raise OSError("revocation list unreadable")

    ctx = mtls_server_context(pki, is_serial_revoked=is_serial_revoked)
    server, results = await mtls_exchange(pki, ctx, cert, key)
    assert isinstance(results["server"], trio.BrokenResourceError)
    assert "revocation check" in str(results["server"])
    assert "data" not in results
    assert [r.getMessage() for r in caplog.records] == ["tls.revocation_check_failed"]


async def test_client_certificate_from_another_ca_is_refused(pki):
    stranger = trustme.CA().issue_cert("eve@example.com")
    cert = pki.tmp / "eve.crt"
    key = pki.tmp / "eve.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in stranger.cert_chain_pems))
    stranger.private_key_pem.write_to_path(str(key))
    server, results = await mtls_exchange(pki, mtls_server_context(pki), cert, key)
    assert isinstance(results["server"], trio.BrokenResourceError)
    assert "ERR_UNABLE_TO_GET_ISSUER_CERT" in str(results["server"])
    assert stdlib_alert(results["client"]) == "TLSV1_ALERT_UNKNOWN_CA"


# -- OCSP stapling --------------------------------------------------------------


def make_ocsp_response(pki: PKI) -> bytes:
    """A signed "good" OCSP response for the server certificate."""
    responder_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test OCSP responder")])
    now = dt.datetime.now(dt.UTC)
    responder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(responder_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(responder_key, hashes.SHA256())
    )
    leaf = x509.load_pem_x509_certificate(pki.leaf.cert_chain_pems[0].bytes())
    issuer = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf,
            issuer=issuer,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now,
            next_update=now + dt.timedelta(days=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
        .sign(responder_key, hashes.SHA256())
    )
    return response.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("request_ocsp", [True, False])
async def test_ocsp_response_is_stapled_when_requested(pki, request_ocsp):
    der = make_ocsp_response(pki)
    path = pki.tmp / "server.ocsp"
    path.write_bytes(der)
    engine = make_server_engine(
        engine="pyopenssl", cert=pki.server_cert, key=pki.server_key, ocsp_response=path
    )
    stapled: list[bytes] = []

    def check_staple(conn, data, _arg):
        stapled.append(data)
        return True

    ctx = make_client_context(ca=pki.ca_pem)
    ctx.set_ocsp_client_callback(check_staple)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if request_ocsp:
        conn.request_ocsp()
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = wrap_connection(client_transport, conn, server_side=False)
    server = engine.wrap(server_transport)
    assert await handshake_both(server, client) == (None, None)
    assert stapled == ([der] if request_ocsp else [])


async def test_ocsp_callback_failure_does_not_fail_the_handshake(pki, client_ctx, caplog):
    def broken_source() -> bytes | None:
        raise OSError("response file vanished")

    ctx = make_server_context(cert=pki.server_cert, key=pki.server_key, ocsp_response=broken_source)
    empty = make_server_context(
        cert=pki.server_cert, key=pki.server_key, ocsp_response=lambda: None
    )
    for server_ctx in (ctx, empty):
        conn = SSL.Connection(client_ctx, None)
        conn.set_connect_state()
        conn.request_ocsp()
        client_transport, server_transport = trio.testing.memory_stream_pair()
        client = wrap_connection(client_transport, conn, server_side=False)
        server = open_server_stream(server_ctx, server_transport)
        assert await handshake_both(server, client) == (None, None)
    assert [r.getMessage() for r in caplog.records] == ["tls.ocsp_failed"]


# -- server name checks by the client ----------------------------------------------


@pytest.mark.parametrize(
    ("names", "hostname", "ok"),
    [
        (("localhost", "127.0.0.1"), "localhost", True),
        (("localhost", "127.0.0.1"), "LOCALHOST.", True),
        (("localhost", "127.0.0.1"), "127.0.0.1", True),
        (("localhost",), "127.0.0.1", False),
        (("127.0.0.1",), "localhost", False),
        (("relay.example.com",), "other.example.com", False),
        (("*.example.com",), "relay.example.com", True),
        (("*.example.com",), "a.relay.example.com", False),
        (("*.example.com",), "example.com", False),
        (("::1",), "::1", True),
        (("::1",), "[::1]", True),
    ],
)
async def test_client_checks_server_name(pki, client_ctx, names, hostname, ok):
    cert, key = pki.server_identity(*names)
    server_ctx = make_server_context(cert=cert, key=key)
    server, client = memory_pair(server_ctx, client_ctx, hostname)
    server_exc, client_exc = await handshake_both(server, client)
    if ok:
        assert (server_exc, client_exc) == (None, None)
        return
    assert isinstance(client_exc, trio.BrokenResourceError)
    assert f"not valid for {hostname!r}" in str(client_exc)
    # The refusal reached the server as an alert during its handshake.
    assert isinstance(server_exc, trio.BrokenResourceError)
    assert "alert" in str(server_exc)


async def test_client_rejects_untrusted_server(pki, server_ctx):
    other = pki.tmp / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    server, client = memory_pair(server_ctx, make_client_context(ca=other))
    server_exc, client_exc = await handshake_both(server, client)
    assert isinstance(client_exc, trio.BrokenResourceError)
    assert "server certificate rejected" in str(client_exc)
    assert isinstance(server_exc, trio.BrokenResourceError)


def test_invalid_server_name_is_a_clear_error(client_ctx):
    a, _ = trio.testing.memory_stream_pair()
    with pytest.raises(LocalProtocolError, match="neither a DNS name nor an IP address") as info:
        open_client_stream(client_ctx, a, "bad..name")
    assert info.value.reason == "bad_config"


# -- cancellation ------------------------------------------------------------------


async def test_cancelled_handshake_breaks_stream_and_leaves_nothing_behind(pki):
    hello_seen = trio.Event()
    eof_seen = trio.Event()

    async def silent_peer(sock):
        # Read the ClientHello, never answer, report when the client hangs up.
        async with sock:
            assert await sock.receive_some()
            hello_seen.set()
            while await sock.receive_some():
                pass
            eof_seen.set()

    engine = make_client_engine(engine="pyopenssl", ca=pki.ca_pem, min_version="1.2")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, silent_peer, 0, host="127.0.0.1")
        )
        sock = await trio.testing.open_stream_to_socket_listener(listeners[0])
        stream = engine.wrap(sock, "localhost")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(stream.do_handshake)
                await hello_seen.wait()
                scope.cancel()
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        with pytest.raises(trio.NeedHandshakeError):
            stream.tls_info()
        await stream.aclose()
        assert sock.socket.fileno() == -1
        with trio.fail_after(5):
            await eof_seen.wait()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_waiters_on_a_failed_handshake_do_not_hang(pki, server_ctx):
    # Two tasks need the handshake; it fails in the first.  The second must
    # see BrokenResourceError, not wait forever.
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = open_server_stream(server_ctx, server_transport)
    ctx = stdlib_client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE+AES128:!AESGCM")  # only CBC suites: nothing in common
    client = trio.SSLStream(client_transport, ctx, server_hostname="localhost")
    results = []

    async def record(afn, *args):
        results.append(await outcome(afn, *args))
        if len(results) == 2:
            await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, server.receive_some)
        nursery.start_soon(record, server.send_all, b"x")
        nursery.start_soon(handshake_or_close, client)
    assert len(results) == 2
    assert all(isinstance(exc, trio.BrokenResourceError) for exc in results)


# -- engines built from files ----------------------------------------------------


def test_server_engine_reports_the_file_it_cannot_load(pki, tmp_path):
    missing = tmp_path / "nope.crt"
    with pytest.raises(LocalProtocolError) as info:
        make_server_engine(engine="pyopenssl", cert=missing, key=pki.server_key)
    assert info.value.reason == "bad_tls_files"
    assert str(missing) in str(info.value)

    other_cert, other_key = pki.server_identity("mismatch.example")
    with pytest.raises(LocalProtocolError, match="does not belong to the certificate") as info:
        make_server_engine(engine="pyopenssl", cert=pki.server_cert, key=other_key)
    assert info.value.reason == "bad_tls_files"

    garbage = tmp_path / "garbage.ocsp"
    garbage.write_bytes(b"not an OCSP response")
    with pytest.raises(LocalProtocolError, match="OCSP response") as info:
        make_server_engine(
            engine="pyopenssl", cert=pki.server_cert, key=pki.server_key, ocsp_response=garbage
        )
    assert str(garbage) in str(info.value)
    assert info.value.reason == "bad_tls_files"

    with pytest.raises(LocalProtocolError, match="client CA file") as info:
        make_server_engine(
            engine="pyopenssl", cert=pki.server_cert, key=pki.server_key, client_ca=pki.server_key
        )
    assert str(pki.server_key) in str(info.value)
    assert info.value.reason == "bad_tls_files"


def test_encrypted_key_is_refused_without_prompting(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.leaf.private_key_pem.bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(LocalProtocolError, match="is encrypted") as info:
        make_server_engine(engine="pyopenssl", cert=pki.server_cert, key=encrypted)
    assert str(encrypted) in str(info.value)


def test_bad_options_are_config_errors(pki):
    with pytest.raises(LocalProtocolError, match='tls.min_version must be "1.2" or "1.3"') as info:
        make_server_context(cert=pki.server_cert, key=pki.server_key, min_version="1.1")
    assert info.value.reason == "bad_config"
    with pytest.raises(LocalProtocolError, match="require_client_cert needs tls.client_ca"):
        make_server_context(cert=pki.server_cert, key=pki.server_key, require_client_cert=True)
    with pytest.raises(LocalProtocolError) as info:
        make_client_engine(engine="pyopenssl", ca=pki.tmp / "missing-ca.pem")
    assert info.value.reason == "bad_tls_files"
    assert "missing-ca.pem" in str(info.value)


# -- the engine's record counter -------------------------------------------------------


def _records(*lengths: int) -> tuple[bytes, list[int]]:
    """TLS application-data records with these body lengths, and where each ends."""
    stream, ends = b"", []
    for length in lengths:
        stream += bytes([23, 3, 3]) + length.to_bytes(2, "big") + os.urandom(length)
        ends.append(len(stream))
    return stream, ends


@pytest.mark.parametrize("seed", range(300))
def test_record_counter_counts_complete_records_however_the_bytes_are_cut(seed):
    import random

    from relay.tls_openssl import _RecordCounter

    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 4, 5, 86, 16401, rng.randrange(18000)]) for _ in range(6)]
    stream, ends = _records(*lengths)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(min(8, len(stream) - 1))))
    counter = _RecordCounter()
    start = 0
    for cut in [*cuts, len(stream)]:
        counter.feed(memoryview(stream)[start:cut])
        start = cut
        assert counter.pending == sum(1 for end in ends if end <= cut)


def test_record_counter_gives_up_on_a_header_no_tls_peer_sends():
    from relay.tls_openssl import _RecordCounter

    counter = _RecordCounter()
    counter.feed(b"GET / HTTP/1.1\r\n")
    assert counter.pending == _RecordCounter.UNKNOWN
    counter.drained()  # framing stays lost: read until OpenSSL reports the error
    counter.feed(_records(5)[0])
    assert counter.pending == _RecordCounter.UNKNOWN


def test_record_counter_consumed_forget_and_drained():
    from relay.tls_openssl import _RecordCounter

    counter = _RecordCounter()
    counter.feed(_records(10, 20, 30)[0])
    assert counter.pending == 3
    counter.consumed()
    assert counter.pending == 2
    counter.forget()  # the generic path read some: unknown until drained
    assert counter.pending == _RecordCounter.UNKNOWN
    counter.drained()
    assert counter.pending == 0
    counter.consumed()
    assert counter.pending == 0
