"""Tokens from an OpenID Connect provider: discovery, key sets and pure verification.

This module never does I/O and never reads the clock.  The relay's fetch loop
(:mod:`relay.identity`) downloads the discovery document and the JWK Set and
hands the bytes to :func:`parse_discovery` and :func:`parse_key_set`; tunnels
verify with :func:`verify_oidc_token` against the last good :class:`IssuerKeys`.

Why not PyJWT's ``PyJWKClient``: it fetches with blocking ``urllib`` on the
caller's path (a tunnel would wait for the IdP) and forgets its keys when its
lifespan ends, even while the IdP is down.  We use PyJWT's :class:`PyJWKSet`
to parse keys and :func:`jwt.decode` to check signatures, and keep the keys
ourselves for as long as ``max_staleness`` allows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from .errors import TokenRejected
from .tokens import _PYJWT_OPTIONS, MAX_TIME_CLAIM, MAX_TOKEN_LENGTH, Claims, _is_time

__all__ = [
    "OIDC_ALGORITHMS",
    "USER_CLAIMS",
    "MAX_DOCUMENT_BYTES",
    "IssuerPolicy",
    "IssuerKeys",
    "OidcTrust",
    "DiscoveryError",
    "parse_discovery",
    "parse_key_set",
    "unverified_issuer",
    "verify_oidc_token",
]

#: Signature algorithms an IdP token may use.  Never ``none`` or HMAC: an HMAC
#: "key" would be the IdP's public key, which anyone can download.
OIDC_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
#: Claims that may name the user.
USER_CLAIMS: tuple[str, ...] = ("sub", "email", "preferred_username", "upn")
#: Largest discovery document or JWK Set accepted, in bytes.
MAX_DOCUMENT_BYTES = 256 * 1024
#: At most this many keys are kept from one JWK Set.
MAX_KEYS = 64
#: At most this many groups are taken from a token.
MAX_GROUPS = 1024


class DiscoveryError(ValueError):
    """A discovery document or JWK Set from the IdP cannot be used.

    The message says what was wrong, for the ``identity.fetch_failed`` log
    line; it never holds more than a short excerpt of the document.
    """


@dataclass(frozen=True, slots=True)
class IssuerPolicy:
    """What a token of one issuer must look like (from ``[[identity.oidc]]``).

    Attributes:
        issuer: The exact ``iss`` value, an ``https://`` URL.
        audiences: Accepted ``aud`` values; the token must name at least one.
        algorithms: Accepted signature algorithms, a subset of :data:`OIDC_ALGORITHMS`.
        user_claim: The claim that names the user, one of :data:`USER_CLAIMS`.
        groups_claim: The claim that lists the user's groups.
        max_staleness: Seconds a key set may be used after its last successful fetch.
        where: The config key for messages, like ``identity.oidc[0]``.
    """

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    user_claim: str = "sub"
    groups_claim: str = "groups"
    max_staleness: float = 86400.0
    where: str = "identity.oidc"

    def __post_init__(self) -> None:
        if not self.issuer.startswith("https://"):
            raise ValueError(f"issuer must be an https:// URL, got {self.issuer!r}")
        if not self.audiences:
            raise ValueError("audiences must name at least one audience")
        bad = [a for a in self.algorithms if a not in OIDC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"algorithms must be some of {OIDC_ALGORITHMS}, got {self.algorithms}")
        if self.user_claim not in USER_CLAIMS:
            raise ValueError(f"user_claim must be one of {USER_CLAIMS}, got {self.user_claim!r}")

    @property
    def discovery_url(self) -> str:
        """Where the discovery document lives (OpenID Connect Discovery 1.0, section 4)."""
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """The last good key set of one issuer.

    Attributes:
        keys: Usable keys by kid.
        fetched_at: Unix time of the fetch that produced them (or last confirmed them).
    """

    keys: Mapping[str, PyJWK]
    fetched_at: float


@dataclass(frozen=True, slots=True)
class OidcTrust:
    """What tunnels verify IdP tokens with: a snapshot, cheap to pass around.

    Attributes:
        policies: By issuer URL.
        keys: The last good key set by issuer URL; an issuer whose keys were
            never fetched is missing.
        on_unknown_kid: Called with the issuer when a token names a kid that
            is not in its key set, so the fetch loop can look sooner.  It must
            not block (the relay's sets a flag).
    """

    policies: Mapping[str, IssuerPolicy] = field(default_factory=dict)
    keys: Mapping[str, IssuerKeys] = field(default_factory=dict)
    on_unknown_kid: Callable[[str], None] = lambda issuer: None


def _load_json(data: bytes, what: str) -> Any:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DiscoveryError(f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiscoveryError(f"{what} is not valid JSON ({exc})") from None


def parse_discovery(data: bytes, *, issuer: str) -> str:
    """Check a discovery document and return its ``jwks_uri``.

    Args:
        data: The body of ``<issuer>/.well-known/openid-configuration``.
        issuer: The configured issuer; the document must name exactly it
            (OpenID Connect Discovery 1.0, section 4.3).

    Returns:
        The ``jwks_uri``, an ``https://`` URL.

    Raises:
        DiscoveryError: Not JSON, too big, another issuer, or no HTTPS ``jwks_uri``.
    """
    doc = _load_json(data, "the discovery document")
    if not isinstance(doc, dict):
        raise DiscoveryError("the discovery document is not a JSON object")
    if doc.get("issuer") != issuer:
        shown = str(doc.get("issuer"))[:120]
        raise DiscoveryError(
            f"the discovery document names issuer {shown!r}, not the configured {issuer!r}; "
            "copy the issuer exactly as the IdP writes it"
        )
    uri = doc.get("jwks_uri")
    if not isinstance(uri, str) or not uri.startswith("https://") or len(uri) > 2048:
        raise DiscoveryError("the discovery document has no https:// jwks_uri")
    return uri


def parse_key_set(data: bytes, *, algorithms: Sequence[str]) -> dict[str, PyJWK]:
    """Parse a JWK Set, keeping the signing keys usable with ``algorithms``.

    Keys for encryption (``use`` other than ``sig``), of another algorithm,
    or that PyJWT cannot load are skipped: an IdP publishes keys for other
    clients too.  Symmetric (``oct``) keys are always skipped.

    Args:
        data: The body of the ``jwks_uri``.
        algorithms: The issuer's accepted algorithms.

    Returns:
        Keys by kid.  A key without ``kid`` is kept under ``""`` and used only
        for tokens without ``kid``.

    Raises:
        DiscoveryError: Not JSON, too big, not a JWK Set, or no usable key
            (an empty set would lock everyone out; the old one is kept instead).
    """
    doc = _load_json(data, "the JWK Set")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise DiscoveryError('the JWK Set is not an object like {"keys": [...]}')
    candidates = [
        jwk
        for jwk in doc["keys"][: MAX_KEYS * 4]
        if isinstance(jwk, dict)
        and jwk.get("kty") != "oct"
        and jwk.get("use", "sig") == "sig"
        and "d" not in jwk
    ]
    try:
        parsed = PyJWKSet(candidates).keys if candidates else []
    except jwt.PyJWTError:
        parsed = []
    keys: dict[str, PyJWK] = {}
    for key in parsed:
        if key.algorithm_name not in algorithms:
            continue
        kid = key.key_id if isinstance(key.key_id, str) else ""
        keys.setdefault(kid, key)
        if len(keys) >= MAX_KEYS:
            break
    if not keys:
        raise DiscoveryError(
            f"the JWK Set holds no signing key for {', '.join(algorithms)}; "
            "check identity.oidc algorithms"
        )
    return keys


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token claims, unverified, to pick which issuer checks it.

    Returns:
        The claimed issuer, or ``None`` if the token cannot be read.  Never raises.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    return iss if isinstance(iss, str) else None


def _reject(message: str, reason: str) -> TokenRejected:
    return TokenRejected(message, reason=reason)


def verify_oidc_token(
    token: str,
    policy: IssuerPolicy,
    keys: IssuerKeys | None,
    *,
    now: float,
    leeway: float,
    on_unknown_kid: Callable[[str], None] | None = None,
) -> Claims:
    """Verify an IdP token at time ``now``.

    Checks, in order: form; key freshness (no key set, or one older than
    ``max_staleness``, refuses every token of the issuer); the header ``alg``
    is one the issuer allows; the ``kid`` is known (else ``on_unknown_kid``
    is called and the token refused); signature; claims and their types;
    ``iss``; ``aud``; ``azp`` when present with several audiences (OpenID
    Connect Core 1.0, section 3.1.3.7); time; the user claim.

    Args:
        token: Compact JWS.
        policy: The issuer's rules.
        keys: Its last good key set, or ``None`` if never fetched.
        now: Current Unix time.
        leeway: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
        on_unknown_kid: Told the issuer when the token's kid is not known.

    Returns:
        Claims with ``sub`` set to the user (from ``user_claim``), ``groups``
        from ``groups_claim``, ``targets`` from a ``targets`` claim if any,
        ``scope`` ``None`` (admin rights come from groups), and ``jti`` the
        token's own or, if it has none, a digest of the token.

    Raises:
        TokenRejected: With the reason; the message names the issuer's config key.
    """
    where = policy.where
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise _reject("token is not a JWS in compact form", "malformed")
    if keys is None:
        raise _reject(
            f"no signing keys of {policy.issuer} have been fetched yet; the relay keeps trying "
            "(see identity.fetch_failed in its log)",
            "keys_unavailable",
        )
    age = now - keys.fetched_at
    if age > policy.max_staleness:
        raise _reject(
            f"the signing keys of {policy.issuer} were last fetched {age:.0f}s ago, more than "
            f"{where}.max_staleness ({policy.max_staleness:g}s); the IdP has been unreachable, "
            "so its tokens are refused until a fetch succeeds",
            "keys_stale",
        )
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise _reject("token header cannot be decoded", "malformed") from exc
    alg = header.get("alg")
    if alg not in policy.algorithms:
        raise _reject(
            f"token algorithm {str(alg)[:20]!r} is not accepted for {policy.issuer}; "
            f"{where}.algorithms allows {', '.join(policy.algorithms)}",
            "bad_algorithm",
        )
    kid = header.get("kid", "")
    if not isinstance(kid, str):
        raise _reject("token header kid is not a string", "malformed")
    key = keys.keys.get(kid)
    if key is None and not kid and len(keys.keys) == 1:
        key = next(iter(keys.keys.values()))
    if key is None:
        if on_unknown_kid is not None:
            on_unknown_kid(policy.issuer)
        raise _reject(
            f"token kid {kid[:64]!r} is not in the key set of {policy.issuer}; "
            "the relay fetches it again (at most once per unknown_kid_cooldown)",
            "unknown_kid",
        )
    if key.algorithm_name != alg:
        raise _reject(
            f"token algorithm {alg} does not match its key {kid[:64]!r} ({key.algorithm_name})",
            "bad_algorithm",
        )
    try:
        payload = jwt.decode(token, key, algorithms=[alg], options=_PYJWT_OPTIONS)  # type: ignore[arg-type]
    except jwt.InvalidSignatureError as exc:
        raise _reject(
            f"token signature does not verify with key {kid[:64]!r}", "bad_signature"
        ) from exc
    except jwt.InvalidAlgorithmError as exc:
        raise _reject("token algorithm is not accepted", "bad_algorithm") from exc
    except jwt.PyJWTError as exc:
        raise _reject("token cannot be decoded", "malformed") from exc

    missing = [n for n in ("iss", "aud", "exp", "iat", policy.user_claim) if n not in payload]
    if missing:
        raise _reject(f"token lacks required claims: {', '.join(missing)}", "missing_claim")
    if payload["iss"] != policy.issuer:
        raise _reject("token issuer is not the configured issuer", "bad_issuer")
    aud = payload["aud"]
    if isinstance(aud, str):
        auds: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        auds = tuple(aud)
    else:
        raise _reject("token claim 'aud' must be a string or a list of strings", "malformed")
    if not set(auds) & set(policy.audiences):
        raise _reject(f"token audience does not include {where}.audience", "bad_audience")
    azp = payload.get("azp")
    if azp is not None and len(auds) > 1 and azp not in policy.audiences:
        raise _reject(
            f"token has several audiences and its azp (authorized party) is not one of "
            f"{where}.audience",
            "bad_azp",
        )
    for name in ("exp", "iat", "nbf"):
        if name in payload and not _is_time(payload[name]):
            raise _reject(
                f"token claim {name!r} must be a number of seconds since 1970 "
                f"no later than {MAX_TIME_CLAIM} (year 9999)",
                "malformed",
            )
    if payload["exp"] <= now - leeway:
        raise _reject(
            f"token expired at {payload['exp']} (now {now:.0f}, leeway {leeway:g}s)", "expired"
        )
    nbf = payload.get("nbf", payload["iat"])
    if nbf > now + leeway or payload["iat"] > now + leeway:
        raise _reject(
            f"token not valid before {max(nbf, payload['iat'])} (now {now:.0f}, "
            f"leeway {leeway:g}s)",
            "not_yet_valid",
        )
    user = payload[policy.user_claim]
    if not isinstance(user, str) or not user.strip() or len(user) > 256:
        raise _reject(
            f"token claim {policy.user_claim!r} ({where}.user_claim) must be a non-empty name",
            "malformed",
        )
    groups_value = payload.get(policy.groups_claim, [])
    if isinstance(groups_value, str):
        groups_value = [groups_value]
    if not isinstance(groups_value, list) or not all(
        isinstance(g, str) and g for g in groups_value
    ):
        raise _reject(
            f"token claim {policy.groups_claim!r} ({where}.groups_claim) must be a list of "
            "group names",
            "malformed",
        )
    targets = payload.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise _reject("token claim 'targets' must be a list of non-empty strings", "malformed")
    jti = payload.get("jti")
    if not isinstance(jti, str) or not jti:
        # Entra ID access tokens carry "uti" instead; any stable id will do for
        # the audit trail and for revocation by jti.
        jti = hashlib.sha256(token.encode()).hexdigest()[:32]
    return Claims(
        sub=user,
        jti=jti[:256],
        iss=policy.issuer,
        aud=auds if len(auds) > 1 else auds[0],
        iat=math.floor(payload["iat"]),
        nbf=math.ceil(nbf),
        exp=math.floor(payload["exp"]),
        targets=tuple(targets),
        scope=None,
        kid=kid or "-",
        groups=tuple(dict.fromkeys(groups_value[:MAX_GROUPS])),
        oidc=True,
    )
