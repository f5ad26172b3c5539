"""Pure verification of IdP tokens: every refusal with its reason, no network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from auth import (
    DiscoveryError,
    IssuerKeys,
    IssuerPolicy,
    TokenRejected,
    parse_discovery,
    parse_key_set,
    unverified_issuer,
    verify_oidc_token,
)
from auth.oidc import MAX_DOCUMENT_BYTES

ISS = "https://idp.example.com/realms/dev"
NOW = 1_800_000_000.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk_of(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    return json.loads(algo.to_jwk(private.public_key())) | {"kid": kid, "use": "sig"}


JWKS = {
    "keys": [
        jwk_of(RSA_KEY, "rsa1", "RS256"),
        jwk_of(EC_KEY, "ec1", "ES256"),
        jwk_of(ED_KEY, "ed1", "EdDSA"),
    ]
}


def policy(**kw: Any) -> IssuerPolicy:
    return IssuerPolicy(
        **(
            {
                "issuer": ISS,
                "audiences": ("dbgrelay",),
                "algorithms": ("RS256", "ES256", "EdDSA"),
                "user_claim": "sub",
                "groups_claim": "groups",
                "max_staleness": 3600.0,
                "where": "identity.oidc[0]",
            }
            | kw
        )
    )


def keys(fetched_at: float = NOW, algorithms=("RS256", "ES256", "EdDSA")) -> IssuerKeys:
    return IssuerKeys(
        keys=parse_key_set(json.dumps(JWKS).encode(), algorithms=algorithms),
        fetched_at=fetched_at,
    )


def mint(private: Any = RSA_KEY, kid: str = "rsa1", alg: str = "RS256", **claims: Any) -> str:
    payload = {
        "iss": ISS,
        "aud": "dbgrelay",
        "sub": "alice",
        "iat": int(NOW),
        "exp": int(NOW + 600),
    } | claims
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, private, algorithm=alg, headers={"kid": kid})


def verify(token: str, pol: IssuerPolicy | None = None, ks: IssuerKeys | None = None, **kw):
    return verify_oidc_token(
        token, pol or policy(), ks if ks is not None else keys(), now=NOW, leeway=0, **kw
    )


def rejected(token: str, reason: str, **kw: Any) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        verify(token, **kw)
    assert info.value.reason == reason, str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("private", "kid", "alg"),
    [(RSA_KEY, "rsa1", "RS256"), (EC_KEY, "ec1", "ES256"), (ED_KEY, "ed1", "EdDSA")],
)
def test_each_accepted_algorithm_verifies(private: Any, kid: str, alg: str) -> None:
    claims = verify(mint(private, kid, alg, groups=["fw", "ops"], jti="j1"))
    assert (claims.sub, claims.groups, claims.iss, claims.kid, claims.jti) == (
        "alice",
        ("fw", "ops"),
        ISS,
        kid,
        "j1",
    )
    assert claims.oidc and claims.targets == () and claims.scope is None


def test_wrong_issuer_is_refused() -> None:
    rejected(mint(iss="https://idp.example.com/realms/other"), "bad_issuer")


def test_wrong_audience_is_refused() -> None:
    rejected(mint(aud="someone-else"), "bad_audience")
    rejected(mint(aud=["a", "b"]), "bad_audience")


def test_azp_checked_when_several_audiences() -> None:
    # Several audiences, azp another client: refused.
    rejected(mint(aud=["dbgrelay", "other"], azp="other"), "bad_azp")
    # azp one of ours: accepted.
    assert verify(mint(aud=["dbgrelay", "other"], azp="dbgrelay")).sub == "alice"
    # A single audience: azp is informational (OIDC Core 3.1.3.7).
    assert verify(mint(aud="dbgrelay", azp="some-spa")).sub == "alice"


def test_algorithm_none_is_refused() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","kid":"rsa1"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(
        json.dumps(
            {"iss": ISS, "aud": "dbgrelay", "sub": "x", "iat": NOW, "exp": NOW + 60}
        ).encode()
    ).rstrip(b"=")
    rejected(f"{header}.{body.decode()}.", "bad_algorithm")


def test_hmac_signed_with_the_public_key_is_refused() -> None:
    # The classic confusion attack: HS256 keyed with the RSA public key PEM.
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": "rsa1", "typ": "JWT"}
    signing_input = (
        base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
        + b"."
        + base64.urlsafe_b64encode(
            json.dumps(
                {"iss": ISS, "aud": "dbgrelay", "sub": "x", "iat": NOW, "exp": NOW + 60}
            ).encode()
        ).rstrip(b"=")
    )
    sig = base64.urlsafe_b64encode(hmac.new(pem, signing_input, hashlib.sha256).digest()).rstrip(
        b"="
    )
    rejected((signing_input + b"." + sig).decode(), "bad_algorithm")


def test_algorithm_not_configured_for_the_issuer_is_refused() -> None:
    rejected(mint(), "bad_algorithm", pol=policy(algorithms=("ES256",)))
    rejected(mint(alg="RS384"), "bad_algorithm")


def test_header_alg_must_match_the_key() -> None:
    # ES256 header naming the RSA key's kid.
    token = mint(EC_KEY, "rsa1", "ES256")
    rejected(token, "bad_algorithm")


def test_bad_signature_is_refused() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rejected(mint(other, "rsa1", "RS256"), "bad_signature")


def test_unknown_kid_is_reported_to_the_fetcher() -> None:
    asked: list[str] = []
    rejected(mint(kid="nope"), "unknown_kid", on_unknown_kid=asked.append)
    assert asked == [ISS]


def test_expired_and_not_yet_valid() -> None:
    rejected(mint(exp=int(NOW)), "expired")
    rejected(mint(nbf=int(NOW + 60)), "not_yet_valid")
    rejected(mint(iat=int(NOW + 60)), "not_yet_valid")


def test_keys_never_fetched_and_stale_keys() -> None:
    with pytest.raises(TokenRejected) as info:
        verify_oidc_token(mint(), policy(), None, now=NOW, leeway=0)
    assert info.value.reason == "keys_unavailable"
    # Exactly at the limit still verifies; a second later it does not.
    assert verify(mint(), ks=keys(fetched_at=NOW - 3600)).sub == "alice"
    exc = rejected(mint(), "keys_stale", ks=keys(fetched_at=NOW - 3601))
    assert "identity.oidc[0].max_staleness" in str(exc) and ISS in str(exc)


def test_user_claim_and_groups_claim() -> None:
    pol = policy(user_claim="email", groups_claim="roles")
    claims = verify(mint(email="alice@corp.example", roles=["debuggers"]), pol=pol)
    assert (claims.sub, claims.groups) == ("alice@corp.example", ("debuggers",))
    rejected(mint(), "missing_claim", pol=pol)
    rejected(mint(email=""), "malformed", pol=pol)
    rejected(mint(email="a@b", roles=[1]), "malformed", pol=pol)


def test_a_token_without_jti_gets_a_stable_id() -> None:
    token = mint(jti=None)
    assert verify(token).jti == verify(token).jti
    assert len(verify(token).jti) == 32


def test_missing_required_claims() -> None:
    rejected(mint(exp=None), "missing_claim")
    rejected(mint(aud=None), "missing_claim")


def test_unverified_issuer() -> None:
    assert unverified_issuer(mint()) == ISS
    assert unverified_issuer("garbage") is None
    assert unverified_issuer("x" * 10000) is None


def test_parse_discovery() -> None:
    doc = {"issuer": ISS, "jwks_uri": f"{ISS}/keys"}
    assert parse_discovery(json.dumps(doc).encode(), issuer=ISS) == f"{ISS}/keys"
    with pytest.raises(DiscoveryError, match="names issuer"):
        parse_discovery(json.dumps(doc | {"issuer": "https://x"}).encode(), issuer=ISS)
    with pytest.raises(DiscoveryError, match="https://"):
        parse_discovery(json.dumps(doc | {"jwks_uri": "http://idp/keys"}).encode(), issuer=ISS)
    with pytest.raises(DiscoveryError, match="not valid JSON"):
        parse_discovery(b"{nope", issuer=ISS)
    with pytest.raises(DiscoveryError, match="larger than"):
        parse_discovery(b" " * (MAX_DOCUMENT_BYTES + 1), issuer=ISS)


def test_parse_key_set_skips_what_must_not_verify() -> None:
    odd = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            jwk_of(RSA_KEY, "enc1", "RS256") | {"use": "enc"},
            jwk_of(EC_KEY, "ec1", "ES256"),
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
        ]
    }
    parsed = parse_key_set(json.dumps(odd).encode(), algorithms=("RS256", "ES256"))
    assert set(parsed) == {"ec1"}
    # Keys for algorithms the issuer does not allow are skipped too.
    with pytest.raises(DiscoveryError, match="no signing key"):
        parse_key_set(json.dumps(odd).encode(), algorithms=("RS256",))
    with pytest.raises(DiscoveryError, match="JWK Set"):
        parse_key_set(b'{"nokeys": 1}', algorithms=("RS256",))


def test_policy_refuses_unsafe_settings() -> None:
    with pytest.raises(ValueError):
        policy(issuer="http://idp.example.com")
    with pytest.raises(ValueError):
        policy(algorithms=("HS256",))
    with pytest.raises(ValueError):
        policy(algorithms=("none",))
