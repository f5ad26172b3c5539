"""A small private PKI for labs that have none.

:func:`init_pki` makes a CA and a server certificate for the relay;
:func:`issue_client_cert` makes client certificates signed by the same CA, with
a PKCS#12 bundle for the Windows certificate store. Keys are ECDSA P-256, the
curve with the widest client support (Windows SChannel, OpenSSL, Go, Java).
Everything is PEM; private keys are written with mode 0600 (see
:mod:`auth._files`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import ensure_private_dir, read_file, write_private, write_public
from .errors import KeyFileError

__all__ = ["PkiPaths", "ClientCertPaths", "init_pki", "issue_client_cert"]

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"

# Certificates start a little in the past so a client whose clock is slightly
# behind still accepts a certificate issued a moment ago.
_BACKDATE = dt.timedelta(minutes=5)

# RFC 1123 labels; a leading "*." wildcard is allowed for server names.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_@][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True, slots=True)
class PkiPaths:
    """Files written by :func:`init_pki`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True, slots=True)
class ClientCertPaths:
    """Files written by :func:`issue_client_cert`, and the certificate's serial number."""

    cert: Path
    key: Path
    p12: Path
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_days(name: str, days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ValueError(f"{name} must be a positive whole number of days, got {days!r}")


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        raise ValueError(f"hosts must be a list of names or addresses, not the string {hosts!r}")
    if not hosts:
        raise ValueError(
            "at least one host is required: the DNS name or IP address clients connect to"
        )
    entries: list[x509.GeneralName] = []
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"host names must be non-empty strings, got {host!r}")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not host.isascii() or not _DNS_NAME.match(host) or len(host) > 253:
            raise ValueError(
                f"host {host!r} is neither an IP address nor a DNS name; use letters, digits, "
                "hyphens and dots (punycode for international names)"
            )
        entries.append(x509.DNSName(host.rstrip(".").lower()))
    return entries


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(days: int, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dbgrelay"),
            # A unique name per CA, so two labs' CAs are never confused.
            x509.NameAttribute(NameOID.COMMON_NAME, f"dbgrelay CA {serial:x}"[:64]),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    *,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    sans: list[x509.GeneralName] | None,
    usage: x509.ObjectIdentifier,
    days: int,
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    cert_data = read_file(cert_path, "CA certificate")
    key_data = read_file(key_path, "CA private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as exc:
        raise KeyFileError(f"{cert_path}: not a PEM certificate; restore the CA's ca.pem") from exc
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError as exc:
        raise KeyFileError(
            f"{key_path}: CA key is encrypted; write it without a passphrase (PKCS#8 PEM)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{key_path}: not a PEM private key; restore the CA's ca.key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(
            f"{key_path}: CA key must be an ECDSA key as written by init_pki, "
            f"got {type(key).__name__}"
        )
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise KeyFileError(
            f"{key_path}: does not belong to the certificate in {cert_path}; restore the "
            "matching pair"
        )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyFileError(f"{cert_path}: is not a CA certificate (BasicConstraints CA is false)")
    return cert, key


def init_pki(
    out_dir: Path,
    hosts: Sequence[str],
    *,
    days_ca: int = 3650,
    days_server: int = 825,
    overwrite: bool = False,
) -> PkiPaths:
    """Create (or reuse) a CA and issue the relay's server certificate.

    If ``out_dir`` already holds ``ca.pem`` and ``ca.key``, that CA is reused
    and only the server certificate and key are (re)issued, so hosts can be
    added later without invalidating client certificates or the CA that
    clients already trust. With ``overwrite=True`` a new CA is made instead,
    which invalidates every certificate the old one signed.

    Hosts that parse as IP addresses become iPAddress SANs, all others DNS
    SANs; the first host is also the subject CN. The server certificate never
    outlives the CA.

    Args:
        out_dir: Folder for the files; created with mode 0700 if missing.
        hosts: Names and addresses clients use to reach the relay; at least one.
        days_ca: Validity of a new CA, in days.
        days_server: Validity of the server certificate, in days (825 is the
            longest Apple platforms accept).
        overwrite: Make a new CA even if one exists.

    Returns:
        Paths of ``ca.pem``, ``ca.key`` (0600), ``server.pem`` and ``server.key`` (0600).

    Raises:
        ValueError: If no host is given, a host is invalid, or a validity is not positive.
        KeyFileError: If an existing CA is incomplete or unreadable, or a file
            cannot be written.
    """
    _check_days("days_ca", days_ca)
    _check_days("days_server", days_server)
    sans = _san_entries(hosts)
    out_dir = Path(out_dir)
    paths = PkiPaths(
        ca_cert=out_dir / CA_CERT_NAME,
        ca_key=out_dir / CA_KEY_NAME,
        server_cert=out_dir / SERVER_CERT_NAME,
        server_key=out_dir / SERVER_KEY_NAME,
    )
    now = _now()
    have_cert, have_key = paths.ca_cert.exists(), paths.ca_key.exists()
    if not overwrite and have_cert != have_key:
        present, absent = (
            (paths.ca_cert, paths.ca_key) if have_cert else (paths.ca_key, paths.ca_cert)
        )
        raise KeyFileError(
            f"{absent}: missing while {present} exists; restore it, or pass overwrite "
            "to create a new CA (which invalidates every certificate the old one signed)"
        )
    ensure_private_dir(out_dir)
    if have_cert and have_key and not overwrite:
        ca_cert, ca_key = _load_ca(out_dir)
    else:
        ca_cert, ca_key = _make_ca(days_ca, now)
        write_private(paths.ca_key, _key_pem(ca_key))
        write_public(paths.ca_cert, _cert_pem(ca_cert))

    first = hosts[0]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first[:64])])
    cert, key = _leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        subject=subject,
        sans=sans,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days_server,
        now=now,
    )
    # Key first: a reader that sees the new certificate also finds its key.
    write_private(paths.server_key, _key_pem(key))
    write_public(paths.server_cert, _cert_pem(cert))
    return paths


def issue_client_cert(
    ca_dir: Path,
    user: str,
    out_dir: Path,
    *,
    days: int = 365,
    p12_password: bytes | None = None,
    overwrite: bool = False,
) -> ClientCertPaths:
    """Issue a client certificate for ``user``, signed by the CA in ``ca_dir``.

    Writes ``<user>.pem`` (certificate), ``<user>.key`` (0600) and ``<user>.p12``
    (0600; certificate, key and CA certificate, for importing into the Windows
    certificate store). The PKCS#12 file is encrypted with AES-256 and an
    HMAC-SHA256 MAC when ``p12_password`` is given (Windows 10 1709 and later
    import it); without a password it is not encrypted, so keep it as secret as
    the key.

    Args:
        ca_dir: Folder with ``ca.pem`` and ``ca.key`` from :func:`init_pki`.
        user: The user name, becomes the subject CN; letters, digits, ``._@-``.
        out_dir: Folder for the files; created with mode 0700 if missing.
        days: Validity in days; capped at the CA's expiry.
        p12_password: Password for the PKCS#12 file, or None for none.
        overwrite: Replace existing files for ``user``.

    Returns:
        The paths and the certificate's serial number (for revocation).

    Raises:
        ValueError: If ``user`` or ``days`` is invalid.
        KeyFileError: If the CA cannot be loaded, files for ``user`` exist and
            ``overwrite`` is false, or a file cannot be written.
    """
    if not isinstance(user, str) or not _USER_NAME.match(user):
        raise ValueError(
            f"user {user!r} is not a valid name: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "not starting with '.' or '-'"
        )
    _check_days("days", days)
    if p12_password is not None and (not isinstance(p12_password, bytes) or not p12_password):
        raise ValueError("p12_password must be non-empty bytes, or None for no password")
    out_dir = Path(out_dir)
    cert_path = out_dir / f"{user}.pem"
    key_path = out_dir / f"{user}.key"
    p12_path = out_dir / f"{user}.p12"
    if not overwrite:
        for path in (cert_path, key_path, p12_path):
            if path.exists():
                raise KeyFileError(
                    f"{path}: already exists; revoke the old certificate and remove its files, "
                    "pass overwrite, or choose another folder"
                )
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    ensure_private_dir(out_dir)
    cert, key = _leaf(
        ca_cert=ca_cert,
        ca_key=ca_key,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]),
        sans=None,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        now=_now(),
    )
    if p12_password is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    else:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(50000)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(p12_password)
        )
    p12 = pkcs12.serialize_key_and_certificates(
        name=user.encode("utf-8"),
        key=key,
        cert=cert,
        cas=[ca_cert],
        encryption_algorithm=encryption,
    )
    write_private(key_path, _key_pem(key))
    write_public(cert_path, _cert_pem(cert))
    write_private(p12_path, p12)
    return ClientCertPaths(cert=cert_path, key=key_path, p12=p12_path, serial=cert.serial_number)
