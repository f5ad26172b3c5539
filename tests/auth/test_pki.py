"""The lab PKI: certificates checked by real TLS handshakes (stdlib ssl, memory BIOs)."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from auth import ClientCertPaths, KeyFileError, PkiPaths, init_pki, issue_client_cert

HOSTS = ["relay.lab.example", "127.0.0.1"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    return init_pki(tmp_path_factory.mktemp("pki") / "pki", HOSTS)


@pytest.fixture(scope="module")
def alice(pki: PkiPaths, tmp_path_factory: pytest.TempPathFactory) -> ClientCertPaths:
    return issue_client_cert(
        pki.ca_cert.parent,
        "alice",
        tmp_path_factory.mktemp("clients"),
        p12_password=b"correct horse",
    )


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    # Python 3.13 turns this on by default; our certificates must pass it.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(pki: PkiPaths, *, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a full TLS handshake in memory and exchange one message each way."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if client_done and server_done:
            break
    assert client_done and server_done
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    server.write(b"pong")
    c_in.write(s_out.read())
    assert client.read(4) == b"pong"
    return client, server


# -- server certificate -------------------------------------------------------


@pytest.mark.parametrize("hostname", HOSTS)
def test_server_cert_verifies_in_tls_handshake(pki: PkiPaths, hostname: str) -> None:
    client, _ = handshake(client_context(pki.ca_cert), server_context(pki), hostname)
    assert client.getpeercert()["subject"] == ((("commonName", "relay.lab.example"),),)


@pytest.mark.parametrize("hostname", ["other.example", "127.0.0.2", "lab.example"])
def test_server_cert_rejected_for_other_names(pki: PkiPaths, hostname: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(client_context(pki.ca_cert), server_context(pki), hostname)


def test_server_cert_rejected_by_another_ca(pki: PkiPaths, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other", HOSTS)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_context(other.ca_cert), server_context(pki), HOSTS[0])


def test_server_cert_extensions(pki: PkiPaths) -> None:
    cert, ca = load(pki.server_cert), load(pki.ca_cert)
    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.lab.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 825 <= days <= 826


def test_ca_cert_extensions(pki: PkiPaths) -> None:
    ca = load(pki.ca_cert)
    assert ca.issuer == ca.subject
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650


def test_private_keys_are_0600(pki: PkiPaths) -> None:
    assert mode(pki.ca_key) == 0o600
    assert mode(pki.server_key) == 0o600
    assert mode(pki.ca_cert.parent) == 0o700
    for path in (pki.ca_cert, pki.server_cert, pki.ca_key, pki.server_key):
        assert path.read_bytes().startswith(b"-----BEGIN ")


def test_rerun_reuses_ca_and_adds_hosts(tmp_path: Path) -> None:
    first = init_pki(tmp_path, ["relay.lab.example"])
    ca_before = first.ca_cert.read_bytes()
    alice = issue_client_cert(tmp_path, "alice", tmp_path / "clients")

    second = init_pki(tmp_path, ["relay.lab.example", "relay2.lab.example", "::1"])

    assert second.ca_cert.read_bytes() == ca_before
    handshake(client_context(second.ca_cert), server_context(second), "relay2.lab.example")
    handshake(client_context(second.ca_cert), server_context(second), "::1")
    # Client certificates from before still work with the reissued server.
    ctx = client_context(second.ca_cert)
    ctx.load_cert_chain(str(alice.cert), str(alice.key))
    handshake(ctx, server_context(second, client_ca=second.ca_cert), "relay.lab.example")


def test_overwrite_makes_a_new_ca(tmp_path: Path) -> None:
    first = init_pki(tmp_path, HOSTS)
    before = first.ca_cert.read_bytes()
    init_pki(tmp_path, HOSTS, overwrite=True)
    assert first.ca_cert.read_bytes() != before


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, HOSTS)
    paths.ca_key.unlink()
    with pytest.raises(KeyFileError, match="ca.key: missing while") as info:
        init_pki(tmp_path, HOSTS)
    assert str(paths.ca_key) in str(info.value)


def test_mismatched_ca_key_is_refused(tmp_path: Path) -> None:
    a = init_pki(tmp_path / "a", HOSTS)
    b = init_pki(tmp_path / "b", HOSTS)
    b.ca_key.write_bytes(a.ca_key.read_bytes())
    with pytest.raises(KeyFileError, match="does not belong"):
        init_pki(tmp_path / "b", HOSTS)


@pytest.mark.parametrize(
    ("hosts", "match"),
    [
        ([], "at least one host"),
        ("relay.lab.example", "not the string"),
        ([""], "non-empty"),
        (["bad host"], "neither an IP address nor a DNS name"),
        (["-bad.example"], "neither"),
        (["relais.exämple"], "punycode"),
    ],
)
def test_init_pki_rejects_bad_hosts(tmp_path: Path, hosts: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        init_pki(tmp_path, hosts)
    assert not (tmp_path / "ca.key").exists()


def test_init_pki_rejects_bad_days(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="days_server"):
        init_pki(tmp_path, HOSTS, days_server=0)


# -- client certificates ------------------------------------------------------


def test_client_cert_fields(pki: PkiPaths, alice: ClientCertPaths) -> None:
    cert = load(alice.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.serial_number == alice.serial
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.issuer == load(pki.ca_cert).subject
    assert mode(alice.key) == 0o600
    assert mode(alice.p12) == 0o600
    assert alice.cert.name == "alice.pem"
    assert alice.p12.name == "alice.p12"


def test_client_cert_accepted_in_mutual_tls(pki: PkiPaths, alice: ClientCertPaths) -> None:
    ctx = client_context(pki.ca_cert)
    ctx.load_cert_chain(str(alice.cert), str(alice.key))
    _, server = handshake(ctx, server_context(pki, client_ca=pki.ca_cert), "127.0.0.1")
    peer = server.getpeercert()
    assert peer["subject"] == ((("commonName", "alice"),),)
    assert int(peer["serialNumber"], 16) == alice.serial


def test_client_cert_from_another_ca_refused(pki: PkiPaths, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other", HOSTS)
    mallory = issue_client_cert(other.ca_cert.parent, "mallory", tmp_path / "m")
    ctx = client_context(pki.ca_cert)
    ctx.load_cert_chain(str(mallory.cert), str(mallory.key))
    with pytest.raises(ssl.SSLError):
        handshake(ctx, server_context(pki, client_ca=pki.ca_cert), HOSTS[0])


def test_server_cert_cannot_be_used_as_client_cert(pki: PkiPaths) -> None:
    # EKU serverAuth only: a stolen server key does not log in as a user.
    ctx = client_context(pki.ca_cert)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    with pytest.raises(ssl.SSLError):
        handshake(ctx, server_context(pki, client_ca=pki.ca_cert), HOSTS[0])


def test_p12_holds_cert_key_and_ca(pki: PkiPaths, alice: ClientCertPaths) -> None:
    bundle = pkcs12.load_pkcs12(alice.p12.read_bytes(), b"correct horse")
    assert bundle.cert is not None and bundle.key is not None
    assert bundle.cert.certificate == load(alice.cert)
    assert bundle.cert.friendly_name == b"alice"
    assert bundle.key.public_key() == bundle.cert.certificate.public_key()
    assert [c.certificate for c in bundle.additional_certs] == [load(pki.ca_cert)]


def test_p12_needs_its_password(alice: ClientCertPaths) -> None:
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(alice.p12.read_bytes(), b"wrong")


def test_p12_without_password(pki: PkiPaths, tmp_path: Path) -> None:
    bob = issue_client_cert(pki.ca_cert.parent, "bob", tmp_path, days=30)
    bundle = pkcs12.load_pkcs12(bob.p12.read_bytes(), None)
    assert bundle.cert is not None
    assert bundle.cert.certificate.serial_number == bob.serial
    cert = load(bob.cert)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (30, 31)


def test_serials_are_random(pki: PkiPaths, tmp_path: Path) -> None:
    a = issue_client_cert(pki.ca_cert.parent, "carol", tmp_path)
    b = issue_client_cert(pki.ca_cert.parent, "dave", tmp_path)
    assert a.serial != b.serial
    assert a.serial.bit_length() > 64


def test_existing_client_files_not_overwritten(pki: PkiPaths, tmp_path: Path) -> None:
    first = issue_client_cert(pki.ca_cert.parent, "erin", tmp_path)
    with pytest.raises(KeyFileError, match="already exists"):
        issue_client_cert(pki.ca_cert.parent, "erin", tmp_path)
    again = issue_client_cert(pki.ca_cert.parent, "erin", tmp_path, overwrite=True)
    assert again.serial != first.serial


@pytest.mark.parametrize("user", ["", "../etc/passwd", ".hidden", "a b", "x" * 65, "ünï"])
def test_bad_user_names(pki: PkiPaths, tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        issue_client_cert(pki.ca_cert.parent, user, tmp_path)


def test_missing_ca_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="ca.pem") as info:
        issue_client_cert(tmp_path, "alice", tmp_path / "out")
    assert "not found" in str(info.value)
