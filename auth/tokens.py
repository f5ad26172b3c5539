"""Issue and verify tunnel tokens: Ed25519-signed JWTs (RFC 7519, RFC 8037).

This module is pure: it never reads the clock or touches files. Callers pass
``now`` (seconds since the epoch) and the keys, which keeps verification a
function of its arguments and lets tests pin time exactly.

A token's payload::

    {"iss": ..., "aud": ..., "sub": "alice", "jti": "<32 hex>",
     "iat": 1700000000, "nbf": 1700000000, "exp": 1700003600,
     "targets": ["build*", "win11-lab"], "scope": "admin"}   # scope optional

``targets`` are shell-style globs (:func:`fnmatch.fnmatchcase`) naming the
debug targets the holder may reach.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import jwt

from .errors import TokenRejected
from .keys import KeySet, SigningKey

__all__ = [
    "Claims",
    "TokenCache",
    "issue_token",
    "verify_token",
    "peek_unverified",
    "ALGORITHM",
    "ADMIN_SCOPE",
    "MAX_TOKEN_LENGTH",
    "MAX_TIME_CLAIM",
]

#: The only signature algorithm issued or accepted (RFC 8037 EdDSA with Ed25519).
ALGORITHM = "EdDSA"
#: The scope that may carry an empty ``targets`` list.
ADMIN_SCOPE = "admin"
#: Longer tokens are rejected as malformed before any parsing.
MAX_TOKEN_LENGTH = 8192
#: Longest ``sub``/``jti`` returned by :func:`peek_unverified`.
_PEEK_MAX = 256
#: Time claims must lie in 1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.  JSON
#: numbers have no bound, and a signed ``exp`` of ``10**400`` once reached the
#: session's deadline arithmetic and raised OverflowError there (issue 11).
#: Inside this range every claim converts to a float, a datetime and an SQLite
#: INTEGER.
MAX_TIME_CLAIM = 253402300799

_REQUIRED = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti", "targets")

# PyJWT reads the real clock for exp/nbf/iat; we check time ourselves against
# ``now``. Its issuer/audience checks are also off so every failure maps to
# exactly one of our reasons.
_PYJWT_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified content of a token.

    Attributes:
        sub: The user the token was issued to.
        jti: Unique token ID, used for revocation and in the audit log.
        iss: Issuer.
        aud: Audience (a string, or a tuple if the token listed several).
        iat: Issued-at time, seconds since the epoch.
        nbf: Not-before time.
        exp: Expiry time.
        targets: Glob patterns of the targets the token grants.
        scope: Optional scope, e.g. ``"admin"``.
        kid: ID of the key that signed the token.
        groups: Groups the IdP says the user is in (empty for local tokens).
        oidc: Whether the token came from an OpenID Connect issuer
            (:mod:`auth.oidc`) rather than ``dbgrelay token issue``.
    """

    sub: str
    jti: str
    iss: str
    aud: str | tuple[str, ...]
    iat: int
    nbf: int
    exp: int
    targets: tuple[str, ...]
    scope: str | None
    kid: str
    groups: tuple[str, ...] = ()
    oidc: bool = False

    def __post_init__(self) -> None:
        for name in ("sub", "jti", "iss", "kid"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Claims.{name} must be a non-empty string, got {value!r}")
        if isinstance(self.aud, list):
            object.__setattr__(self, "aud", tuple(self.aud))
        if not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError("Claims.targets must hold non-empty strings")
        if not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(self.groups))
        # An IdP token's access usually comes from its groups, not a targets claim.
        if not self.targets and self.scope != ADMIN_SCOPE and not self.oidc:
            raise ValueError(f"Claims.targets may be empty only with scope {ADMIN_SCOPE!r}")
        for name in ("iat", "nbf", "exp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Claims.{name} must be an int, got {value!r}")

    def grants(self, target: str) -> bool:
        """Whether any pattern in ``targets`` matches ``target`` (case-sensitive glob).

        The admin scope does not imply any target: an admin token reaches only
        the targets it lists.
        """
        return any(fnmatchcase(target, pattern) for pattern in self.targets)


def issue_token(
    key: SigningKey,
    *,
    user: str,
    targets: Sequence[str],
    ttl: float,
    issuer: str,
    audience: str,
    now: float,
    scope: str | None = None,
    jti: str | None = None,
) -> str:
    """Create a signed token.

    Args:
        key: Signing key; its kid goes into the header.
        user: Subject (``sub``).
        targets: Target globs; may be empty only for ``scope="admin"``.
        ttl: Lifetime in seconds, positive.
        issuer: ``iss`` claim.
        audience: ``aud`` claim.
        now: Current time, seconds since the epoch; becomes ``iat`` and ``nbf``.
        scope: Optional ``scope`` claim.
        jti: Token ID; by default 128 random bits in hex.

    Returns:
        The compact JWS.

    Raises:
        ValueError: If an argument is empty or out of range.
    """
    if not isinstance(user, str) or not user.strip():
        raise ValueError("user must be a non-empty name")
    if isinstance(targets, str):
        raise ValueError(f"targets must be a list of glob patterns, not the string {targets!r}")
    targets = list(targets)
    for target in targets:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"each target must be a non-empty glob pattern, got {target!r}")
    if not targets and scope != ADMIN_SCOPE:
        raise ValueError(
            f'targets must name at least one target glob (e.g. "build*") unless scope is '
            f"{ADMIN_SCOPE!r}"
        )
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    if ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("issuer must be a non-empty string")
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be a non-empty string")
    if scope is not None and (not isinstance(scope, str) or not scope):
        raise ValueError("scope must be a non-empty string or None")
    if jti is None:
        jti = secrets.token_hex(16)
    elif not isinstance(jti, str) or not jti:
        raise ValueError("jti must be a non-empty string")

    issued = math.floor(now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": user,
        "jti": jti,
        "iat": issued,
        "nbf": issued,
        # Round up so a sub-second ttl still gives a token that is valid at ``now``.
        "exp": math.ceil(now + ttl),
        "targets": targets,
    }
    if scope is not None:
        payload["scope"] = scope
    return jwt.encode(
        payload,
        key.private_key,
        algorithm=ALGORITHM,
        headers={"kid": key.kid, "typ": "JWT"},
    )


def _reject(message: str, reason: str) -> TokenRejected:
    return TokenRejected(message, reason=reason)


def _is_time(value: object) -> bool:
    """A number of seconds between 1970 and the end of year 9999 (NaN and Infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # json accepts NaN/Infinity and integers of any size; NaN fails both comparisons.
    return 0 <= value <= MAX_TIME_CLAIM


def verify_token(
    token: str,
    keys: KeySet,
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float,
) -> Claims:
    """Verify a token's signature and claims at time ``now``.

    Checks, in order: the token is well-formed; the header ``alg`` is EdDSA
    (``none`` and HMAC are refused before any key is touched, which defeats
    the attack of signing HS256 with the public key as the secret); the
    ``kid`` names a key in ``keys``; the signature; the presence and types of
    the claims; issuer; audience; and time. The token is never revoked or
    target-checked here; see :meth:`Claims.grants` and
    :meth:`auth.revocation.RevocationSet.is_revoked`.

    Args:
        token: Compact JWS.
        keys: Trusted public keys. A header without ``kid`` is accepted only
            if the set holds exactly one key.
        issuer: Required ``iss``.
        audience: Required ``aud`` (the token's ``aud`` may be a list containing it).
        now: Current time, seconds since the epoch.
        leeway: Allowed clock difference in seconds, applied to exp, nbf and iat.

    Returns:
        The verified claims.

    Raises:
        TokenRejected: With the reason why. The message never contains the token.
    """
    if not token:
        raise _reject("no token presented", "missing")
    if not isinstance(token, str):
        raise _reject("token is not text", "malformed")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _reject(f"token longer than {MAX_TOKEN_LENGTH} characters", "malformed")
    if token.count(".") != 2:
        raise _reject("token is not a JWS in compact form (three dot-separated parts)", "malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise _reject("token header cannot be decoded", "malformed") from exc

    alg = header.get("alg")
    if alg != ALGORITHM:
        raise _reject(
            f"token algorithm {str(alg)[:20]!r} is not accepted; only EdDSA is", "bad_algorithm"
        )

    kid = header.get("kid")
    if kid is None:
        if len(keys) != 1:
            raise _reject("token header has no kid and several keys are trusted", "unknown_kid")
        kid = next(iter(keys))
    elif kid not in keys:
        raise _reject(f"token kid {kid[:64]!r} is not in the trusted key set", "unknown_kid")

    try:
        payload = jwt.decode(
            token,
            keys[kid],
            algorithms=[ALGORITHM],
            options=_PYJWT_OPTIONS,  # type: ignore[arg-type]
        )
    except jwt.InvalidSignatureError as exc:
        raise _reject(
            f"token signature does not verify with key {kid[:64]!r}", "bad_signature"
        ) from exc
    except jwt.InvalidAlgorithmError as exc:
        raise _reject("token algorithm is not accepted; only EdDSA is", "bad_algorithm") from exc
    except jwt.PyJWTError as exc:
        raise _reject("token cannot be decoded", "malformed") from exc

    missing = [name for name in _REQUIRED if name not in payload]
    if missing:
        raise _reject(f"token lacks required claims: {', '.join(missing)}", "missing_claim")

    for name in ("iss", "sub", "jti"):
        if not isinstance(payload[name], str) or not payload[name]:
            raise _reject(f"token claim {name!r} must be a non-empty string", "malformed")
    for name in ("iat", "nbf", "exp"):
        if not _is_time(payload[name]):
            raise _reject(
                f"token claim {name!r} must be a number of seconds since 1970 "
                f"no later than {MAX_TIME_CLAIM} (year 9999)",
                "malformed",
            )
    aud = payload["aud"]
    if isinstance(aud, list):
        if not aud or not all(isinstance(a, str) for a in aud):
            raise _reject("token claim 'aud' must be a string or a list of strings", "malformed")
        aud = tuple(aud)
    elif not isinstance(aud, str):
        raise _reject("token claim 'aud' must be a string or a list of strings", "malformed")
    targets = payload["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise _reject("token claim 'targets' must be a list of non-empty strings", "malformed")
    scope = payload.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise _reject("token claim 'scope' must be a string", "malformed")
    if not targets and scope != ADMIN_SCOPE:
        raise _reject(
            f"token claim 'targets' is empty and scope is not {ADMIN_SCOPE!r}", "malformed"
        )

    if payload["iss"] != issuer:
        raise _reject("token issuer is not the configured issuer", "bad_issuer")
    if audience not in (aud if isinstance(aud, tuple) else (aud,)):
        raise _reject("token audience does not include this relay", "bad_audience")

    _check_times(payload["exp"], payload["nbf"], payload["iat"], now=now, leeway=leeway)
    return _claims(payload, aud, targets, scope, kid)


def _check_times(exp: float, nbf: float, iat: float, *, now: float, leeway: float) -> None:
    """Same comparisons as PyJWT, but against ``now``.

    A token is expired from exp + leeway on, and not yet valid while nbf (or
    iat) is after now + leeway.

    Raises:
        TokenRejected: ``expired`` or ``not_yet_valid``.
    """
    if exp <= now - leeway:
        raise _reject(f"token expired at {exp} (now {now:.0f}, leeway {leeway:g}s)", "expired")
    if nbf > now + leeway:
        raise _reject(
            f"token not valid before {nbf} (now {now:.0f}, leeway {leeway:g}s)", "not_yet_valid"
        )
    if iat > now + leeway:
        raise _reject(
            f"token issued in the future at {iat} (now {now:.0f}, leeway {leeway:g}s)",
            "not_yet_valid",
        )


def _claims(payload: dict, aud: Any, targets: list, scope: str | None, kid: str) -> Claims:
    return Claims(
        sub=payload["sub"],
        jti=payload["jti"],
        iss=payload["iss"],
        aud=aud,
        iat=math.floor(payload["iat"]),
        nbf=math.ceil(payload["nbf"]),
        exp=math.floor(payload["exp"]),
        targets=tuple(targets),
        scope=scope,
        kid=kid,
    )


class TokenCache:
    """Verified tokens, so a token presented again skips the signature check.

    An Ed25519 verify and the JSON decoding cost about half a millisecond; a
    connector that opens several tunnels with one token pays it once.  What
    is cached is only what :func:`verify_token` proves from the token's bytes
    and the key (signature, claims, issuer, audience).  On every hit the time
    claims are checked again against ``now``, and the entry counts only if
    the key set still holds the very key that verified it, so a rotated or
    removed key takes effect at once.  Revocation is not cached here: the
    caller checks it on every use (:func:`relay.access.authorize`), so a
    revoked token is refused on its next use, cached or not.

    Bounded: at most ``max_entries`` tokens, least recently used evicted
    first, and an entry is dropped once its token has expired.

    Args:
        max_entries: How many tokens to keep.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # token -> (issuer, audience, key, claims, raw exp, nbf, iat)
        self._entries: OrderedDict[str, tuple[str, str, Any, Claims, float, float, float]] = (
            OrderedDict()
        )
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def verify(
        self,
        token: str,
        keys: KeySet,
        *,
        issuer: str,
        audience: str,
        now: float,
        leeway: float,
    ) -> Claims:
        """:func:`verify_token`, answered from the cache when it can be.

        Raises:
            TokenRejected: As :func:`verify_token` does.
        """
        entry = self._entries.get(token) if isinstance(token, str) else None
        if entry is not None:
            e_issuer, e_audience, key, claims, exp, nbf, iat = entry
            if e_issuer == issuer and e_audience == audience and keys.get(claims.kid) is key:
                if exp <= now - leeway:
                    del self._entries[token]
                _check_times(exp, nbf, iat, now=now, leeway=leeway)
                self._entries.move_to_end(token)
                self.hits += 1
                return claims
            del self._entries[token]
        claims = verify_token(token, keys, issuer=issuer, audience=audience, now=now, leeway=leeway)
        payload = jwt.decode(token, options={"verify_signature": False})
        self._entries[token] = (
            issuer,
            audience,
            keys[claims.kid],
            claims,
            payload["exp"],
            payload["nbf"],
            payload["iat"],
        )
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return claims


def peek_unverified(token: str) -> dict[str, str]:
    """Read ``sub`` and ``jti`` from a token without verifying it, for auditing rejections.

    The values are attacker-controlled: they are returned only if they are
    strings, cut to 256 characters, and must never be used to decide anything.

    Args:
        token: Anything.

    Returns:
        A dict with ``"sub"`` and/or ``"jti"`` when present as strings; empty otherwise.
        Never raises.
    """
    try:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return {}
        parts = token.split(".")
        if len(parts) != 3:
            return {}
        segment = parts[1]
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload = json.loads(raw)
        if not isinstance(payload, dict):
            return {}
        return {
            name: payload[name][:_PEEK_MAX]
            for name in ("sub", "jti")
            if isinstance(payload.get(name), str)
        }
    except Exception:
        # Audit must not fail because of what an attacker sent; anything odd is
        # simply "nothing to report".
        return {}
