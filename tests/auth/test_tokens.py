"""Token issue and verification, including the classic JWT attacks."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auth import (
    MAX_TIME_CLAIM,
    MAX_TOKEN_LENGTH,
    TOKEN_REJECT_REASONS,
    Claims,
    KeySet,
    SigningKey,
    TokenRejected,
    issue_token,
    jwk_thumbprint,
    peek_unverified,
    verify_token,
)

from .conftest import AUDIENCE, ISSUER, NOW, b64url, b64url_json

TTL = 3600
LEEWAY = 30


def make(key: SigningKey, **overrides: Any) -> str:
    args: dict[str, Any] = dict(
        user="alice",
        targets=["build*", "win11-lab"],
        ttl=TTL,
        issuer=ISSUER,
        audience=AUDIENCE,
        now=NOW,
    )
    args.update(overrides)
    return issue_token(key, **args)


def verify(token: str, keys: KeySet, *, now: float = NOW, leeway: float = LEEWAY) -> Claims:
    return verify_token(token, keys, issuer=ISSUER, audience=AUDIENCE, now=now, leeway=leeway)


def rejected(token: str, keys: KeySet, reason: str, *, now: float = NOW) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        verify(token, keys, now=now)
    exc = info.value
    assert exc.reason == reason, str(exc)
    # The token (a bearer credential) must never end up in a log line.
    if len(token) > 8:
        assert token not in str(exc)
        assert token not in repr(exc)
        if exc.__cause__ is not None:
            assert token not in str(exc.__cause__)
    return exc


def good_payload(kid_key: SigningKey | None = None) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "jti": "0123456789abcdef0123456789abcdef",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + TTL,
        "targets": ["build*"],
    }


def sign(payload: dict[str, Any], key: SigningKey, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(
        payload,
        key.private_key,
        algorithm="EdDSA",
        headers={"kid": key.kid} if headers is None else headers,
    )


# -- good tokens ------------------------------------------------------------


def test_good_token_round_trips_every_claim(signing_key: SigningKey, keyset: KeySet) -> None:
    token = make(signing_key, jti="tok-1", scope="debug")
    claims = verify(token, keyset)
    assert claims == Claims(
        sub="alice",
        jti="tok-1",
        iss=ISSUER,
        aud=AUDIENCE,
        iat=NOW,
        nbf=NOW,
        exp=NOW + TTL,
        targets=("build*", "win11-lab"),
        scope="debug",
        kid=signing_key.kid,
    )


def test_header_pins_eddsa_and_names_the_key(signing_key: SigningKey) -> None:
    header = jwt.get_unverified_header(make(signing_key))
    assert header["alg"] == "EdDSA"
    assert header["kid"] == signing_key.kid


def test_verification_uses_the_given_time_not_the_real_clock(
    signing_key: SigningKey, keyset: KeySet
) -> None:
    # Issued and checked in 2001: PyJWT's own clock checks would call this expired.
    then = 1_000_000_000
    claims = verify(make(signing_key, now=then), keyset, now=then + 10)
    assert claims.exp == then + TTL
    # And far in the future (2100), relative to the real clock it is "not yet valid".
    later = 4_102_444_800
    assert verify(make(signing_key, now=later), keyset, now=later).iat == later


def test_default_jti_is_128_random_bits(signing_key: SigningKey, keyset: KeySet) -> None:
    jtis = {verify(make(signing_key), keyset).jti for _ in range(5)}
    assert len(jtis) == 5
    for jti in jtis:
        assert len(jti) == 32
        int(jti, 16)


def test_fractional_now_and_ttl_still_valid_at_issue_time(
    signing_key: SigningKey, keyset: KeySet
) -> None:
    now = NOW + 0.75
    claims = verify(make(signing_key, now=now, ttl=0.5), keyset, now=now, leeway=0)
    assert claims.iat <= now < claims.exp


def test_admin_scope_may_have_no_targets(signing_key: SigningKey, keyset: KeySet) -> None:
    claims = verify(make(signing_key, targets=[], scope="admin"), keyset)
    assert claims.scope == "admin"
    assert claims.targets == ()
    assert not claims.grants("build01")


def test_audience_list_containing_ours_is_accepted(signing_key: SigningKey, keyset: KeySet) -> None:
    payload = good_payload() | {"aud": ["other", AUDIENCE]}
    assert verify(sign(payload, signing_key), keyset).aud == ("other", AUDIENCE)


@pytest.mark.parametrize(
    ("target", "granted"),
    [
        ("build01", True),
        ("build", True),
        ("win11-lab", True),
        ("Build01", False),  # case-sensitive on every platform
        ("win11-lab2", False),
        ("xbuild01", False),
        ("", False),
    ],
)
def test_glob_grants(signing_key: SigningKey, keyset: KeySet, target: str, granted: bool) -> None:
    claims = verify(make(signing_key, targets=["build*", "win11-lab"]), keyset)
    assert claims.grants(target) is granted


def test_glob_character_class(signing_key: SigningKey, keyset: KeySet) -> None:
    claims = verify(make(signing_key, targets=["kd[0-2]"]), keyset)
    assert [t for t in ("kd0", "kd2", "kd3", "kd10") if claims.grants(t)] == ["kd0", "kd2"]


# -- time -------------------------------------------------------------------


def test_expired(signing_key: SigningKey, keyset: KeySet) -> None:
    token = make(signing_key)
    exc = rejected(token, keyset, "expired", now=NOW + TTL + LEEWAY)
    assert "expired" in str(exc)
    rejected(token, keyset, "expired", now=NOW + 10 * TTL)


def test_expiry_within_leeway_is_accepted(signing_key: SigningKey, keyset: KeySet) -> None:
    token = make(signing_key)
    assert verify(token, keyset, now=NOW + TTL + LEEWAY - 1).sub == "alice"


def test_expiry_without_leeway_is_exact(signing_key: SigningKey, keyset: KeySet) -> None:
    token = make(signing_key)
    verify(token, keyset, now=NOW + TTL - 0.001, leeway=0)
    with pytest.raises(TokenRejected) as info:
        verify(token, keyset, now=NOW + TTL, leeway=0)
    assert info.value.reason == "expired"


def test_not_yet_valid(signing_key: SigningKey, keyset: KeySet) -> None:
    token = make(signing_key)
    rejected(token, keyset, "not_yet_valid", now=NOW - LEEWAY - 1)


def test_not_before_within_leeway_is_accepted(signing_key: SigningKey, keyset: KeySet) -> None:
    token = make(signing_key)
    assert verify(token, keyset, now=NOW - LEEWAY).sub == "alice"


def test_nbf_in_future_rejected_even_if_iat_is_now(signing_key: SigningKey, keyset: KeySet) -> None:
    payload = good_payload() | {"nbf": NOW + 600}
    rejected(sign(payload, signing_key), keyset, "not_yet_valid")


def test_iat_in_future_rejected(signing_key: SigningKey, keyset: KeySet) -> None:
    payload = good_payload() | {"iat": NOW + 600}
    rejected(sign(payload, signing_key), keyset, "not_yet_valid")


# -- issuer and audience ----------------------------------------------------


def test_wrong_audience(signing_key: SigningKey, keyset: KeySet) -> None:
    rejected(make(signing_key, audience="another-relay"), keyset, "bad_audience")


def test_wrong_issuer(signing_key: SigningKey, keyset: KeySet) -> None:
    rejected(make(signing_key, issuer="someone-else"), keyset, "bad_issuer")


# -- signatures and algorithms ----------------------------------------------


def test_tampered_payload(signing_key: SigningKey, keyset: KeySet) -> None:
    header, _, signature = make(signing_key, targets=["build01"]).split(".")
    payload = good_payload() | {"targets": ["*"]}
    forged = f"{header}.{b64url_json(payload)}.{signature}"
    rejected(forged, keyset, "bad_signature")


def test_tampered_signature(signing_key: SigningKey, keyset: KeySet) -> None:
    header, payload, signature = make(signing_key).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    rejected(f"{header}.{payload}.{flipped}", keyset, "bad_signature")


def test_signed_by_another_key_claiming_our_kid(signing_key: SigningKey, keyset: KeySet) -> None:
    impostor = SigningKey(kid=signing_key.kid, private_key=Ed25519PrivateKey.generate())
    rejected(make(impostor), keyset, "bad_signature")


def _unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url_json(header)}.{b64url_json(payload)}.{b64url(signature)}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_rejected(signing_key: SigningKey, keyset: KeySet, alg: str) -> None:
    token = _unsigned({"alg": alg, "typ": "JWT", "kid": signing_key.kid}, good_payload())
    rejected(token, keyset, "bad_algorithm")


def test_missing_alg_rejected(signing_key: SigningKey, keyset: KeySet) -> None:
    token = _unsigned({"typ": "JWT", "kid": signing_key.kid}, good_payload(), b"x" * 64)
    rejected(token, keyset, "bad_algorithm")


def _public_key_secrets(key: SigningKey) -> list[bytes]:
    public = key.private_key.public_key()
    return [
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ]


@pytest.mark.parametrize("with_kid", [True, False])
def test_hs256_forged_with_public_key_rejected(
    signing_key: SigningKey, keyset: KeySet, with_kid: bool
) -> None:
    # Algorithm confusion: the attacker knows the public key (it is published
    # in jwks.json) and uses it as an HMAC secret. Built by hand so no library
    # can refuse to make it.
    header = {"alg": "HS256", "typ": "JWT"}
    if with_kid:
        header["kid"] = signing_key.kid
    signing_input = f"{b64url_json(header)}.{b64url_json(good_payload() | {'targets': ['*']})}"
    for secret in _public_key_secrets(signing_key):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        rejected(f"{signing_input}.{b64url(mac)}", keyset, "bad_algorithm")


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS256", "ES256", "PS256", "Ed25519", ""])
def test_other_algorithms_rejected(signing_key: SigningKey, keyset: KeySet, alg: str) -> None:
    token = _unsigned({"alg": alg, "kid": signing_key.kid}, good_payload(), b"s" * 64)
    rejected(token, keyset, "bad_algorithm")


def test_unknown_kid(signing_key: SigningKey, keyset: KeySet) -> None:
    other = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    exc = rejected(make(other), keyset, "unknown_kid")
    assert other.kid in str(exc)


def test_missing_kid_with_single_key_uses_it(signing_key: SigningKey, keyset: KeySet) -> None:
    token = sign(good_payload(), signing_key, headers={})
    assert "kid" not in jwt.get_unverified_header(token)
    assert verify(token, keyset).kid == signing_key.kid


def test_missing_kid_with_several_keys_is_unknown(signing_key: SigningKey, keyset: KeySet) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    two = KeySet({**keyset, jwk_thumbprint(other): other})
    token = sign(good_payload(), signing_key, headers={})
    rejected(token, two, "unknown_kid")


def test_several_keys_pick_by_kid(signing_key: SigningKey, keyset: KeySet) -> None:
    other = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    two = KeySet({**keyset, other.kid: other.private_key.public_key()})
    assert verify(make(other), two).kid == other.kid
    assert verify(make(signing_key), two).kid == signing_key.kid


# -- claims -----------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "iat", "nbf", "exp", "jti", "targets"])
def test_missing_claim(signing_key: SigningKey, keyset: KeySet, claim: str) -> None:
    payload = good_payload()
    del payload[claim]
    exc = rejected(sign(payload, signing_key), keyset, "missing_claim")
    assert claim in str(exc)


@pytest.mark.parametrize(
    "change",
    [
        {"targets": "build*"},
        {"targets": [1, 2]},
        {"targets": [""]},
        {"targets": []},
        {"targets": [], "scope": "debug"},
        {"scope": 7},
        {"sub": ""},
        {"sub": 42},
        {"jti": None},
        {"exp": "tomorrow"},
        {"exp": True},
        {"iat": None},
        {"nbf": [NOW]},
        {"aud": 5},
        {"aud": []},
        {"aud": [AUDIENCE, 3]},
    ],
    ids=repr,
)
def test_malformed_claims(signing_key: SigningKey, keyset: KeySet, change: dict[str, Any]) -> None:
    rejected(sign(good_payload() | change, signing_key), keyset, "malformed")


def test_nan_expiry_is_malformed(signing_key: SigningKey, keyset: KeySet) -> None:
    # json accepts NaN; NaN compares false with everything and would never expire.
    header, _, _ = make(signing_key).split(".")
    body = json.dumps(good_payload()).replace(str(NOW + TTL), "NaN")
    token = jwt.api_jws.encode(
        body.encode(), signing_key.private_key, algorithm="EdDSA", headers={"kid": signing_key.kid}
    )
    rejected(token, keyset, "malformed")


@pytest.mark.parametrize(
    "change",
    [
        {"exp": 10**400},
        {"exp": MAX_TIME_CLAIM + 1},
        {"exp": 1e308},
        {"nbf": 10**400},
        {"iat": 10**400},
        {"iat": -(10**400)},
        {"nbf": -1},
        {"exp": -(10**400)},
    ],
    ids=[
        "exp=10**400",
        "exp=max+1",
        "exp=1e308",
        "nbf=10**400",
        "iat=10**400",
        "iat=-10**400",
        "nbf=-1",
        "exp=-10**400",
    ],
)
def test_time_claims_out_of_range_are_malformed(
    signing_key: SigningKey, keyset: KeySet, change: dict[str, Any]
) -> None:
    # 10**400 once passed verification and raised OverflowError in the session.
    exc = rejected(sign(good_payload() | change, signing_key), keyset, "malformed")
    (name,) = change
    assert str(exc) == (
        f"token claim {name!r} must be a number of seconds since 1970 no later than "
        f"{MAX_TIME_CLAIM} (year 9999)"
    )


@pytest.mark.parametrize("value", ["Infinity", "-Infinity"])
@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
def test_infinite_time_claims_are_malformed(
    signing_key: SigningKey, keyset: KeySet, name: str, value: str
) -> None:
    payload = good_payload() | {name: "PLACEHOLDER"}
    body = json.dumps(payload).replace('"PLACEHOLDER"', value)
    token = jwt.api_jws.encode(
        body.encode(), signing_key.private_key, algorithm="EdDSA", headers={"kid": signing_key.kid}
    )
    rejected(token, keyset, "malformed")


def test_latest_time_claim_is_accepted(signing_key: SigningKey, keyset: KeySet) -> None:
    claims = verify(sign(good_payload() | {"exp": MAX_TIME_CLAIM}, signing_key), keyset)
    assert claims.exp == MAX_TIME_CLAIM


# -- garbage ----------------------------------------------------------------


def test_empty_token_is_missing(keyset: KeySet) -> None:
    rejected("", keyset, "missing")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "....",
        "!!!.!!!.!!!",
        b64url(b"not json") + "." + b64url_json({"sub": "x"}) + ".",
        b64url_json(["list", "header"]) + "." + b64url_json({}) + ".c2ln",
        "GET / HTTP/1.1",
        "x" * (MAX_TOKEN_LENGTH + 1),
    ],
)
def test_garbage_is_malformed(keyset: KeySet, token: str) -> None:
    rejected(token, keyset, "malformed")


def test_non_string_kid_is_malformed(signing_key: SigningKey, keyset: KeySet) -> None:
    token = _unsigned({"alg": "EdDSA", "kid": 12}, good_payload(), b"x" * 64)
    rejected(token, keyset, "malformed")


def test_garbage_payload_with_valid_signature_is_malformed(
    signing_key: SigningKey, keyset: KeySet
) -> None:
    token = jwt.api_jws.encode(
        b"\xff\xfe not json",
        signing_key.private_key,
        algorithm="EdDSA",
        headers={"kid": signing_key.kid},
    )
    rejected(token, keyset, "malformed")


def test_every_reason_has_a_fixed_spelling() -> None:
    assert set(TOKEN_REJECT_REASONS) == {
        "missing",
        "malformed",
        "expired",
        "not_yet_valid",
        "bad_signature",
        "bad_issuer",
        "bad_audience",
        "unknown_kid",
        "bad_algorithm",
        "revoked",
        "not_granted",
        "missing_claim",
        "bad_azp",
        "keys_unavailable",
        "keys_stale",
    }
    with pytest.raises(ValueError, match="reason"):
        TokenRejected("typo", reason="expird")


# -- issuing: bad arguments -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"user": ""}, "user"),
        ({"user": "  "}, "user"),
        ({"targets": []}, "targets"),
        ({"targets": "build*"}, "targets"),
        ({"targets": ["ok", ""]}, "target"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"issuer": ""}, "issuer"),
        ({"audience": ""}, "audience"),
        ({"scope": ""}, "scope"),
        ({"jti": ""}, "jti"),
    ],
    ids=repr,
)
def test_issue_rejects_bad_arguments(
    signing_key: SigningKey, overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make(signing_key, **overrides)


# -- peek_unverified --------------------------------------------------------


def test_peek_reads_sub_and_jti_without_verifying(signing_key: SigningKey) -> None:
    token = make(signing_key, user="bob", jti="abc")
    assert peek_unverified(token) == {"sub": "bob", "jti": "abc"}
    other = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    assert peek_unverified(make(other, user="eve", jti="zzz")) == {"sub": "eve", "jti": "zzz"}


def test_peek_returns_only_string_fields_and_truncates() -> None:
    token = _unsigned({"alg": "none"}, {"sub": 5, "jti": "j" * 5000, "targets": ["*"]})
    assert peek_unverified(token) == {"jti": "j" * 256}


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.!!!.c",
        "a." + b64url(b"[1,2]") + ".c",
        "a." + b64url(b"[" * 100_000) + ".c",
        "a." + b64url(b"\xff\xfe") + ".c",
        None,
        b"bytes.are.wrong",
        12,
    ],
    ids=lambda t: repr(t)[:30],
)
def test_peek_never_raises(token: Any) -> None:
    assert peek_unverified(token) == {}
