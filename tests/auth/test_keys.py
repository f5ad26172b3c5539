"""Key files: creation, permissions, rotation, and JWKS parsing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from auth import (
    KeyFileError,
    KeyPaths,
    KeySet,
    init_keys,
    issue_token,
    jwk_thumbprint,
    load_audit_key,
    load_audit_pubkey,
    load_jwks,
    load_signing_key,
    parse_jwks,
    rotate_keys,
    verify_token,
)

from .conftest import AUDIENCE, ISSUER, NOW, b64url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_rfc8037_thumbprint_vector() -> None:
    # RFC 8037 appendix A.1 key and A.3 thumbprint.
    private = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    public = private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert b64url(raw) == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert jwk_thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_init_writes_files_with_private_modes(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    paths = init_keys(out)
    assert paths == KeyPaths.in_dir(out)
    assert mode(out) == 0o700
    assert mode(paths.signing_key) == 0o600
    assert mode(paths.audit_key) == 0o600
    assert mode(paths.jwks) & 0o022 == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "audit.key",
        "audit.pub",
        "jwks.json",
        "signing.key",
    ]


def test_private_keys_are_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = init_keys(tmp_path / "k")
    finally:
        os.umask(old)
    assert mode(paths.signing_key) == 0o600
    assert mode(paths.audit_key) == 0o600


def test_public_files_are_readable_under_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        paths = init_keys(tmp_path / "k")
    finally:
        os.umask(old)
    assert mode(paths.jwks) == 0o644
    assert mode(paths.audit_pub) == 0o644


def test_signing_key_is_pkcs8_pem(key_dir: Path) -> None:
    data = (key_dir / "signing.key").read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert isinstance(serialization.load_pem_private_key(data, None), Ed25519PrivateKey)


def test_jwks_publishes_the_signing_key(key_dir: Path) -> None:
    signing = load_signing_key(key_dir / "signing.key")
    doc = json.loads((key_dir / "jwks.json").read_text())
    assert len(doc["keys"]) == 1
    jwk = doc["keys"][0]
    assert jwk["kty"] == "OKP"
    assert jwk["crv"] == "Ed25519"
    assert jwk["alg"] == "EdDSA"
    assert jwk["use"] == "sig"
    assert "d" not in jwk
    assert jwk["kid"] == signing.kid == jwk_thumbprint(signing.private_key.public_key())
    # The JWKS is standard: PyJWT reads it too.
    assert jwt.PyJWKSet.from_dict(doc).keys[0].key_id == signing.kid


def test_audit_key_is_separate_and_matches_its_public_key(key_dir: Path) -> None:
    audit = load_audit_key(key_dir / "audit.key")
    signing = load_signing_key(key_dir / "signing.key")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert audit.public_key().public_bytes(*raw) != signing.private_key.public_key().public_bytes(
        *raw
    )
    pub = load_audit_pubkey(key_dir / "audit.pub")
    signature = audit.sign(b"audit line")
    pub.verify(signature, b"audit line")  # raises if the pair does not match


def test_audit_pubkey_from_public_or_private_pem(key_dir: Path) -> None:
    # `dbgrelay audit verify --pubkey` takes either file keys init wrote.
    want = jwk_thumbprint(load_audit_key(key_dir / "audit.key").public_key())
    assert jwk_thumbprint(load_audit_pubkey(key_dir / "audit.pub")) == want
    assert jwk_thumbprint(load_audit_pubkey(key_dir / "audit.key")) == want


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text", "not a PEM public key"),
        ("encrypted", "encrypted private key"),
        ("ec_public", "must be Ed25519, got ECPublicKey"),
        ("ec_private", "must be Ed25519, got ECPrivateKey"),
    ],
)
def test_audit_pubkey_rejects_other_files(tmp_path: Path, content: str, message: str) -> None:
    pem = serialization.Encoding.PEM
    ec_key = ec.generate_private_key(ec.SECP256R1())
    data = {
        "text": b"hello\n",
        "encrypted": Ed25519PrivateKey.generate().private_bytes(
            pem,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
        "ec_public": ec_key.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "ec_private": ec_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }[content]
    path = tmp_path / "bad.pem"
    path.write_bytes(data)
    with pytest.raises(KeyFileError, match=message) as info:
        load_audit_pubkey(path)
    assert str(path) in str(info.value)


def test_init_refuses_to_overwrite(key_dir: Path) -> None:
    before = (key_dir / "signing.key").read_bytes()
    with pytest.raises(KeyFileError) as info:
        init_keys(key_dir)
    assert "dbgrelay keys rotate" in str(info.value)
    assert str(key_dir / "signing.key") in str(info.value)
    assert info.value.reason == "bad_key_file"
    assert (key_dir / "signing.key").read_bytes() == before


def test_init_overwrite_replaces_keys(key_dir: Path) -> None:
    old = load_signing_key(key_dir / "signing.key").kid
    init_keys(key_dir, overwrite=True)
    new = load_signing_key(key_dir / "signing.key").kid
    assert new != old
    assert list(load_jwks(key_dir / "jwks.json")) == [new]
    assert not [p for p in key_dir.iterdir() if p.name.endswith(".tmp")]


def test_rotate_keeps_old_tokens_valid(key_dir: Path) -> None:
    old = load_signing_key(key_dir / "signing.key")
    old_token = issue_token(
        old, user="alice", targets=["*"], ttl=60, issuer=ISSUER, audience=AUDIENCE, now=NOW
    )

    rotate_keys(key_dir)

    new = load_signing_key(key_dir / "signing.key")
    assert new.kid != old.kid
    keys = load_jwks(key_dir / "jwks.json")
    assert set(keys) == {old.kid, new.kid}
    new_token = issue_token(
        new, user="bob", targets=["*"], ttl=60, issuer=ISSUER, audience=AUDIENCE, now=NOW
    )
    for token, kid in ((old_token, old.kid), (new_token, new.kid)):
        claims = verify_token(token, keys, issuer=ISSUER, audience=AUDIENCE, now=NOW, leeway=0)
        assert claims.kid == kid

    retired = key_dir / f"signing.key.{old.kid}.retired"
    assert mode(retired) == 0o600
    assert load_signing_key(retired).kid == old.kid


def test_rotate_twice_accumulates_keys(key_dir: Path) -> None:
    rotate_keys(key_dir)
    rotate_keys(key_dir)
    assert len(load_jwks(key_dir / "jwks.json")) == 3
    assert len(list(key_dir.glob("signing.key.*.retired"))) == 2


def test_rotate_keeps_hand_edited_jwks_entries(key_dir: Path) -> None:
    extra = Ed25519PrivateKey.generate().public_key()
    raw = extra.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = json.loads((key_dir / "jwks.json").read_text())
    doc["keys"].append({"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": "lab-2"})
    (key_dir / "jwks.json").write_text(json.dumps(doc))
    rotate_keys(key_dir)
    assert "lab-2" in load_jwks(key_dir / "jwks.json")


def test_rotate_without_keys_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="signing.key"):
        rotate_keys(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a PEM private key"),
        (b"hello", "not a PEM private key"),
        (
            rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "must be an Ed25519 key",
        ),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "encrypted",
        ),
    ],
    ids=["empty", "text", "rsa", "encrypted"],
)
def test_bad_signing_key_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match) as info:
        load_signing_key(path)
    assert str(path) in str(info.value)


def test_missing_key_file_names_the_path(tmp_path: Path) -> None:
    for loader in (load_signing_key, load_audit_key, load_audit_pubkey, load_jwks):
        with pytest.raises(KeyFileError, match="not found") as info:
            loader(tmp_path / "nope")
        assert str(tmp_path / "nope") in str(info.value)


def test_audit_pubkey_must_be_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "audit.pub"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_audit_pubkey(path)


# -- JWKS parsing -----------------------------------------------------------


def _okp(**extra: object) -> dict[str, object]:
    public = Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), **extra}


def test_parse_jwks_accepts_dict_and_text_and_computes_missing_kid() -> None:
    jwk = _okp()
    keys = parse_jwks({"keys": [jwk]})
    (kid,) = keys
    assert kid == jwk_thumbprint(keys[kid])
    assert isinstance(keys[kid], Ed25519PublicKey)
    assert list(parse_jwks(json.dumps({"keys": [jwk]}))) == [kid]


def test_keyset_is_immutable() -> None:
    keys = parse_jwks({"keys": [_okp(kid="a")]})
    with pytest.raises(TypeError):
        keys["b"] = keys["a"]  # type: ignore[index]
    with pytest.raises(ValueError):
        KeySet({})


def _rsa_jwk() -> dict[str, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key)) | {"alg": "RS256", "kid": "r"}


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ([_rsa_jwk()], "only Ed25519"),
        ([_okp(), _rsa_jwk()], r"keys\[1\].*only Ed25519"),
        ([_okp(alg="HS256")], "alg='HS256'"),
        ([{"kty": "oct", "k": b64url(b"secret"), "alg": "HS256"}], "only Ed25519"),
        ([_okp() | {"crv": "X25519"}], "only Ed25519"),
        ([_okp(use="enc")], "use='enc'"),
        ([_okp(d=b64url(b"\x00" * 32))], "private key material"),
        ([_okp() | {"x": "short"}], 'invalid "x"'),
        ([_okp() | {"x": None}], 'invalid "x"'),
        ([_okp(kid="same"), _okp(kid="same")], "repeats kid"),
        ([_okp(kid=5)], "kid"),
        (["not an object"], "JSON object"),
        ([], "no key"),
    ],
    ids=[
        "rsa",
        "rsa-second",
        "hs256",
        "oct",
        "x25519",
        "use-enc",
        "private",
        "bad-x",
        "no-x",
        "dup-kid",
        "int-kid",
        "string",
        "empty",
    ],
)
def test_load_jwks_rejects(tmp_path: Path, keys: list[object], match: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    with pytest.raises(KeyFileError, match=match) as info:
        load_jwks(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"keys": {}}', '{"other": []}'])
def test_load_jwks_rejects_non_jwks(tmp_path: Path, text: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(text)
    with pytest.raises(KeyFileError) as info:
        load_jwks(path)
    assert str(path) in str(info.value)
