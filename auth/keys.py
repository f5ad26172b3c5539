"""Ed25519 keys for signing tokens and audit logs, and the JWKS that publishes them.

Layout of a key folder written by :func:`init_keys`::

    signing.key                   Ed25519 private key, PKCS#8 PEM, 0600 (signs tokens)
    signing.key.<kid>.retired     earlier signing keys kept by rotate_keys, 0600
    jwks.json                     public keys the relay trusts (RFC 7517 JWK Set)
    audit.key                     separate Ed25519 private key that signs audit logs, 0600
    audit.pub                     its public key, PEM

Each key's ``kid`` is its RFC 7638 JWK thumbprint, so a kid can be recomputed
from the key alone and always matches the entry in ``jwks.json``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ._files import ensure_private_dir, read_file, write_private, write_public
from .errors import KeyFileError

__all__ = [
    "KeyPaths",
    "SigningKey",
    "KeySet",
    "init_keys",
    "rotate_keys",
    "load_signing_key",
    "load_jwks",
    "parse_jwks",
    "load_audit_key",
    "load_audit_pubkey",
    "jwk_thumbprint",
    "public_jwk",
]

SIGNING_KEY_NAME = "signing.key"
JWKS_NAME = "jwks.json"
AUDIT_KEY_NAME = "audit.key"
AUDIT_PUB_NAME = "audit.pub"


@dataclass(frozen=True, slots=True)
class KeyPaths:
    """Where :func:`init_keys` and :func:`rotate_keys` put the key files."""

    signing_key: Path
    jwks: Path
    audit_key: Path
    audit_pub: Path

    @classmethod
    def in_dir(cls, out_dir: Path) -> KeyPaths:
        """The standard file names inside ``out_dir``."""
        out_dir = Path(out_dir)
        return cls(
            signing_key=out_dir / SIGNING_KEY_NAME,
            jwks=out_dir / JWKS_NAME,
            audit_key=out_dir / AUDIT_KEY_NAME,
            audit_pub=out_dir / AUDIT_PUB_NAME,
        )


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private token-signing key and its key ID.

    Attributes:
        kid: RFC 7638 thumbprint of the public key; goes into each token header.
        private_key: The Ed25519 private key.
    """

    kid: str
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise TypeError("SigningKey.private_key must be an Ed25519PrivateKey")
        if not isinstance(self.kid, str) or not self.kid:
            raise ValueError("SigningKey.kid must be a non-empty string")

    def __repr__(self) -> str:
        # Keep private key objects out of logs and tracebacks.
        return f"SigningKey(kid={self.kid!r})"

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        """Wrap ``private_key``, computing its kid from the public key."""
        return cls(kid=jwk_thumbprint(private_key.public_key()), private_key=private_key)


class KeySet(Mapping[str, Ed25519PublicKey]):
    """Immutable mapping of kid to the Ed25519 public key that verifies tokens.

    Args:
        keys: kid to public key.

    Raises:
        ValueError: If ``keys`` is empty (a key set that verifies nothing is a
            configuration mistake, not a policy).
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        if not keys:
            raise ValueError("KeySet needs at least one key")
        for kid, key in keys.items():
            if not isinstance(kid, str) or not kid:
                raise ValueError("KeySet kids must be non-empty strings")
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"KeySet key {kid!r} is not an Ed25519PublicKey")
        self._keys = MappingProxyType(dict(keys))

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeySet(kids={sorted(self._keys)!r})"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding) of an Ed25519 key.

    The thumbprint hashes the required members of the OKP JWK (RFC 8037 §2) in
    lexicographic order with no whitespace.

    Args:
        public_key: The key.

    Returns:
        The thumbprint, used as ``kid``.
    """
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw_public(public_key))},
        separators=(",", ":"),
        sort_keys=True,
    ).encode("ascii")
    return _b64url(hashlib.sha256(canonical).digest())


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public JWK for ``public_key`` as written into ``jwks.json``."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(_raw_public(public_key)),
        "alg": "EdDSA",
        "use": "sig",
        "kid": jwk_thumbprint(public_key),
    }


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwks_bytes(keys: list[dict[str, Any]]) -> bytes:
    return (json.dumps({"keys": keys}, indent=2) + "\n").encode("utf-8")


def init_keys(out_dir: Path, *, overwrite: bool = False) -> KeyPaths:
    """Create a fresh token signing key, its JWKS, and a separate audit key.

    ``out_dir`` is created with mode 0700 if missing. Private keys are written
    with mode 0600 from the moment they exist (see :mod:`auth._files`).

    Args:
        out_dir: Folder for the key files.
        overwrite: Replace an existing ``signing.key`` (and the other files).
            Every token signed by the old key stops verifying.

    Returns:
        Paths of the four files.

    Raises:
        KeyFileError: If ``signing.key`` exists and ``overwrite`` is false, or a
            file cannot be written.
    """
    paths = KeyPaths.in_dir(out_dir)
    if paths.signing_key.exists() and not overwrite:
        raise KeyFileError(
            f"{paths.signing_key}: a signing key already exists; use `dbgrelay keys rotate` "
            "to add a new key, or pick another folder"
        )
    ensure_private_dir(Path(out_dir))
    signing = Ed25519PrivateKey.generate()
    audit = Ed25519PrivateKey.generate()
    write_private(paths.audit_key, _private_pem(audit))
    write_public(paths.audit_pub, _public_pem(audit.public_key()))
    write_public(paths.jwks, _jwks_bytes([public_jwk(signing.public_key())]))
    # The signing key goes last: until it exists, a half-finished run can be
    # repeated without overwrite.
    write_private(paths.signing_key, _private_pem(signing))
    return paths


def rotate_keys(out_dir: Path) -> KeyPaths:
    """Replace the signing key with a new one and add its public key to the JWKS.

    The old private key is kept as ``signing.key.<oldkid>.retired`` (0600). Old
    public keys stay in ``jwks.json``, so tokens they signed keep verifying
    until their entry is removed from the file by hand. The audit key is not
    touched.

    Files are written in an order that is safe to interrupt: the retired copy
    first, then the JWKS with the new key, and the new ``signing.key`` last, so
    no token is ever signed by a key the relay does not know.

    Args:
        out_dir: A folder written by :func:`init_keys`.

    Returns:
        Paths of the key files.

    Raises:
        KeyFileError: If the current signing key or the JWKS is missing or invalid.
    """
    paths = KeyPaths.in_dir(out_dir)
    old = load_signing_key(paths.signing_key)
    raw = _read_jwks_json(paths.jwks)
    parse_jwks(raw, source=str(paths.jwks))  # refuse to extend a file we would reject
    old_pem = read_file(paths.signing_key, "Ed25519 signing key")

    new_key = Ed25519PrivateKey.generate()
    new_jwk = public_jwk(new_key.public_key())
    keys = [k for k in raw["keys"] if k.get("kid") != new_jwk["kid"]]
    if not any(k.get("kid") == old.kid for k in keys):
        # The current key should already be published; make sure it is, so
        # tokens it signed keep verifying after the rotation.
        keys.append(public_jwk(old.private_key.public_key()))
    keys.append(new_jwk)

    write_private(paths.signing_key.with_name(f"{SIGNING_KEY_NAME}.{old.kid}.retired"), old_pem)
    write_public(paths.jwks, _jwks_bytes(keys))
    write_private(paths.signing_key, _private_pem(new_key))
    return paths


def _load_private_ed25519(path: Path, what: str) -> Ed25519PrivateKey:
    data = read_file(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise KeyFileError(
            f"{path}: {what} is encrypted; write it without a passphrase (PKCS#8 PEM)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"{path}: not a PEM private key; expected an Ed25519 {what} as written by "
            "`dbgrelay keys init`"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path}: {what} must be an Ed25519 key, got {type(key).__name__}; "
            "create one with `dbgrelay keys init`"
        )
    return key


def load_signing_key(path: Path) -> SigningKey:
    """Load the token signing key (PKCS#8 PEM, unencrypted).

    Returns:
        The key with its kid, which matches the key's entry in ``jwks.json``.

    Raises:
        KeyFileError: If the file is missing, unreadable or not an Ed25519 key.
    """
    return SigningKey.from_private_key(_load_private_ed25519(Path(path), "signing key"))


def load_audit_key(path: Path) -> Ed25519PrivateKey:
    """Load the private key that signs audit logs.

    Raises:
        KeyFileError: If the file is missing, unreadable or not an Ed25519 key.
    """
    return _load_private_ed25519(Path(path), "audit key")


def load_audit_pubkey(path: Path) -> Ed25519PublicKey:
    """Load the public key that verifies audit log signatures.

    The file is the PEM public key (``audit.pub``) or, for convenience on
    the relay's own machine, the PEM private key (``audit.key``), whose
    public half is returned.

    Raises:
        KeyFileError: If the file is missing, unreadable, encrypted or not an
            Ed25519 PEM key.
    """
    path = Path(path)
    data = read_file(path, "audit public key")
    key: object
    if b"PRIVATE KEY-----" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise KeyFileError(
                f"{path}: audit key is an encrypted private key; give its public key "
                "(PEM 'BEGIN PUBLIC KEY') instead"
            ) from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(f"{path}: audit key is not a readable PEM private key") from exc
        if isinstance(key, Ed25519PrivateKey):
            return key.public_key()
    else:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyFileError(
                f"{path}: not a PEM public key; expected the audit.pub written by "
                "`dbgrelay keys init`"
            ) from exc
        if isinstance(key, Ed25519PublicKey):
            return key
    raise KeyFileError(
        f"{path}: audit public key must be Ed25519, got {type(key).__name__.lstrip('_')}"
    )


def _read_jwks_json(path: Path) -> dict[str, Any]:
    data = read_file(Path(path), "JWKS file")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyFileError(
            f'{path}: not valid JSON ({exc}); expected a JWK Set like {{"keys": [...]}}'
        ) from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise KeyFileError(f'{path}: expected a JWK Set object like {{"keys": [...]}}')
    return raw


def load_jwks(path: Path) -> KeySet:
    """Load the public keys the relay trusts from a JWKS file.

    Raises:
        KeyFileError: See :func:`parse_jwks`; the message names the file.
    """
    return parse_jwks(_read_jwks_json(Path(path)), source=str(path))


def parse_jwks(data: dict[str, Any] | str, *, source: str = "JWKS") -> KeySet:
    """Parse a JWK Set holding Ed25519 public keys.

    Every key must be ``kty`` OKP with ``crv`` Ed25519; ``alg``, if present, must
    be EdDSA and ``use``, if present, must be ``sig``. A key of any other type
    makes the whole set invalid rather than being skipped, so a mistake in the
    file cannot go unnoticed. A key without ``kid`` gets its thumbprint.

    Args:
        data: The JWK Set as a dict or JSON text.
        source: Name used in error messages (the file path).

    Returns:
        The keys by kid.

    Raises:
        KeyFileError: If the set is malformed, holds a key that is not an
            Ed25519 public key, holds private key material, repeats a kid, or
            holds no key at all.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise KeyFileError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError(f'{source}: expected a JWK Set object like {{"keys": [...]}}')
    keys: dict[str, Ed25519PublicKey] = {}
    for index, jwk in enumerate(data["keys"]):
        where = f"{source}: keys[{index}]"
        if not isinstance(jwk, dict):
            raise KeyFileError(f"{where} must be a JSON object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise KeyFileError(
                f"{where} has kty={jwk.get('kty')!r} crv={jwk.get('crv')!r}; only Ed25519 keys "
                '(kty "OKP", crv "Ed25519") are accepted, remove this key'
            )
        if "alg" in jwk and jwk["alg"] != "EdDSA":
            raise KeyFileError(f'{where} has alg={jwk["alg"]!r}; it must be "EdDSA" or absent')
        if "use" in jwk and jwk["use"] != "sig":
            raise KeyFileError(f'{where} has use={jwk["use"]!r}; it must be "sig" or absent')
        if "d" in jwk:
            raise KeyFileError(
                f'{where} contains private key material ("d"); publish only public keys '
                "and treat that private key as leaked"
            )
        try:
            raw_x = _b64url_decode(jwk.get("x"))
            public_key = Ed25519PublicKey.from_public_bytes(raw_x)
        except ValueError as exc:
            raise KeyFileError(
                f'{where} has an invalid "x"; it must be the 32-byte public key, base64url'
            ) from exc
        kid = jwk.get("kid", jwk_thumbprint(public_key))
        if not isinstance(kid, str) or not kid:
            raise KeyFileError(f'{where} has an invalid "kid"; it must be a non-empty string')
        if kid in keys:
            raise KeyFileError(f"{where} repeats kid {kid!r}; each kid must be unique")
        keys[kid] = public_key
    if not keys:
        raise KeyFileError(f"{source}: holds no key; create one with `dbgrelay keys init`")
    return KeySet(keys)
