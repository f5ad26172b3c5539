"""Who may open a tunnel to which target: a pure decision, no I/O.

Order matters, so that target names never leak to strangers:

1. no token, or a token that does not verify (bad signature, expired, wrong
   issuer or audience, revoked)            -> 401 with the token's reason;
2. a valid token whose ``targets`` do not match the requested name, or a user
   missing from the target's ``allow`` list -> 403 ``not_granted`` /
   ``not_allowed``;
3. a granted name that is not configured    -> 404 ``unknown_target``;
4. a token already past ``exp`` (accepted only thanks to the leeway) for a
   target that ends tunnels at token expiry -> 401 ``expired``.

A token that grants ``build*`` may learn that ``build99`` does not exist; a
token for ``build42`` cannot tell ``build99`` from ``secret-box``.
"""

from __future__ import annotations

from dataclasses import dataclass

from auth import Claims, KeySet, RevocationSet, TokenRejected, verify_token
from config import Config, TargetConfig

from .errors import RemoteProtocolError

__all__ = ["Grant", "authorize"]


@dataclass(frozen=True, slots=True)
class Grant:
    """An authorised request: the verified claims and the configured target."""

    claims: Claims
    target: TargetConfig


def authorize(
    *,
    token: str | None,
    target_name: str,
    config: Config,
    keys: KeySet,
    revoked: RevocationSet,
    now: float,
) -> Grant:
    """Decide whether ``token`` may open a tunnel to ``target_name``.

    Args:
        token: The bearer token from the request, or None if none was sent.
        target_name: The requested target.
        config: The current configuration.
        keys: The current token-verification keys.
        revoked: The current revocation snapshot.
        now: Current Unix time (the caller's clock; tests pass their own).

    Returns:
        The grant.

    Raises:
        RemoteProtocolError: with status 401, 403 or 404 and the reason code.
    """
    if not token:
        raise RemoteProtocolError(
            "no bearer token in Proxy-Authorization or Authorization", reason="missing", status=401
        )
    try:
        claims = verify_token(
            token,
            keys,
            issuer=config.auth.issuer,
            audience=config.auth.audience,
            now=now,
            leeway=config.auth.leeway,
        )
    except TokenRejected as exc:
        raise RemoteProtocolError(str(exc), reason=exc.reason, status=401) from exc
    if claims.scope == "admin":
        raise RemoteProtocolError(
            "an admin token cannot open tunnels", reason="not_granted", status=403
        )
    if revoked.is_revoked(claims):
        raise RemoteProtocolError("the token has been revoked", reason="revoked", status=401)
    if not claims.grants(target_name):
        raise RemoteProtocolError(
            f"the token does not grant target {target_name!r}", reason="not_granted", status=403
        )
    target = config.target(target_name)
    if target is None:
        raise RemoteProtocolError(
            f"no target named {target_name!r} is configured", reason="unknown_target", status=404
        )
    if target.allow is not None and claims.sub not in target.allow:
        raise RemoteProtocolError(
            f"user {claims.sub!r} is not in the allow list of target {target_name!r}",
            reason="not_allowed",
            status=403,
        )
    if target.end_on_token_expiry and claims.exp <= now:
        # Inside the leeway the token still verifies, but this target ends
        # tunnels when the token expires: the tunnel would end before it
        # opened, so say so now instead of closing without an answer.
        raise RemoteProtocolError(
            f"the token expired at {claims.exp} and target {target_name!r} ends tunnels "
            "when their token expires",
            reason="expired",
            status=401,
        )
    return Grant(claims=claims, target=target)
