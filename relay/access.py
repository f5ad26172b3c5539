"""Who may open a tunnel to which target: a pure decision, no I/O.

A token is either one ``dbgrelay token issue`` signed (checked against
``[auth]``) or one from a configured OpenID Connect issuer (checked against
``[[identity.oidc]]`` and the keys the relay fetched in the background); the
token's unverified ``iss`` picks which.

Order matters, so that target names never leak to strangers:

1. no token, or a token that does not verify (bad signature, expired, wrong
   issuer or audience, stale IdP keys, revoked) -> 401 with the token's reason;
2. a valid token that grants no matching name, neither by its ``targets``
   claim nor by ``identity.group_targets`` for its groups -> 403 ``not_granted``;
3. a granted name that is not configured    -> 404 ``unknown_target``;
4. a user missing from the target's ``allow_users``/``allow_groups`` -> 403
   ``not_allowed``; a client certificate that does not name the user where
   the target's ``cert_user`` says -> 403 ``cert_user_mismatch``;
5. a token already past ``exp`` (accepted only thanks to the leeway) for a
   target that ends tunnels at token expiry -> 401 ``expired``.

A token that grants ``build*`` may learn that ``build99`` does not exist; a
token for ``build42`` cannot tell ``build99`` from ``secret-box``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from auth import (
    ADMIN_SCOPE,
    Claims,
    IssuerPolicy,
    KeySet,
    OidcTrust,
    RevocationSet,
    TokenCache,
    TokenRejected,
    unverified_issuer,
    verify_oidc_token,
    verify_token,
)
from config import Config, OidcIssuerConfig, TargetConfig

from .errors import RemoteProtocolError

__all__ = [
    "ClientCertNames",
    "Grant",
    "authorize",
    "cert_names_user",
    "is_admin",
    "issuer_policy",
    "verify_identity",
]


@dataclass(frozen=True, slots=True)
class Grant:
    """An authorised request: the verified claims and the configured target.

    Attributes:
        claims: The verified token.
        target: The configured target.
        granted_by: What granted the name: ``"token"`` (its ``targets``
            claim) or ``"group:NAME"`` (``identity.group_targets``).
        admitted_by: Which allow rule let the user in: ``"open"`` (no allow
            lists), ``"user"`` or ``"group:NAME"``.
        cert_rule: The target's ``cert_user`` rule that the client
            certificate passed, or ``None``.
    """

    claims: Claims
    target: TargetConfig
    granted_by: str = "token"
    admitted_by: str = "open"
    cert_rule: str | None = None


@dataclass(frozen=True, slots=True)
class ClientCertNames:
    """The names a verified client certificate carries.

    Attributes:
        cn: The subject's common name, if any.
        sans: subjectAltName values (email, DNS and URI entries).
    """

    cn: str | None = None
    sans: tuple[str, ...] = ()


def cert_names_user(names: ClientCertNames | None, user: str, rule: str) -> bool:
    """Whether the certificate names ``user`` where ``rule`` (``cn``/``san``/``cn_or_san``) looks."""
    if names is None:
        return False
    if rule in ("cn", "cn_or_san") and names.cn == user:
        return True
    return rule in ("san", "cn_or_san") and user in names.sans


def issuer_policy(item: OidcIssuerConfig, index: int = 0) -> IssuerPolicy:
    """The verification rules of one ``[[identity.oidc]]`` entry."""
    return IssuerPolicy(
        issuer=item.issuer,
        audiences=item.audience,
        algorithms=item.algorithms,
        user_claim=item.user_claim,
        groups_claim=item.groups_claim,
        max_staleness=item.max_staleness,
        where=f"identity.oidc[{index}]",
    )


def verify_identity(
    token: str,
    *,
    config: Config,
    keys: KeySet,
    revoked: RevocationSet,
    oidc: OidcTrust | None,
    now: float,
    cache: TokenCache | None = None,
) -> Claims:
    """Verify a locally issued or IdP token and refuse it if it is revoked.

    The one way a token becomes claims, for tunnels (:func:`authorize`) and
    the admin API alike, so neither can skip the revocation check.  A token
    whose unverified ``iss`` is a configured OIDC issuer is checked only
    against that issuer; any other token only against ``[auth]``, through
    ``cache`` when one is given (IdP tokens are verified every time).

    Args:
        token: The bearer token.
        config: The current configuration.
        keys: The current token-verification keys.
        revoked: The current revocation snapshot.
        oidc: Policies and last good keys of the OIDC issuers.
        now: Current Unix time.
        cache: Verified local tokens, kept until they expire.

    Raises:
        TokenRejected: With the reason; ``"revoked"`` for a revoked token.
    """
    claims = _verify_signed(token, config=config, keys=keys, oidc=oidc, now=now, cache=cache)
    if revoked.is_revoked(claims):
        raise TokenRejected("the token has been revoked", reason="revoked")
    return claims


def _verify_signed(
    token: str,
    *,
    config: Config,
    keys: KeySet,
    oidc: OidcTrust | None,
    now: float,
    cache: TokenCache | None,
) -> Claims:
    """Signature, issuer, audience and times: :func:`verify_identity` without revocation."""
    iss = unverified_issuer(token) if config.identity.oidc else None
    item = config.identity.issuer(iss) if iss is not None and iss != config.auth.issuer else None
    if item is not None:
        trust = oidc or OidcTrust()
        policy = trust.policies.get(item.issuer) or issuer_policy(
            item, config.identity.oidc.index(item)
        )
        return verify_oidc_token(
            token,
            policy,
            trust.keys.get(item.issuer),
            now=now,
            leeway=config.auth.leeway,
            on_unknown_kid=trust.on_unknown_kid,
        )
    verify = cache.verify if cache is not None else verify_token
    return verify(
        token,
        keys,
        issuer=config.auth.issuer,
        audience=config.auth.audience,
        now=now,
        leeway=config.auth.leeway,
    )


def is_admin(claims: Claims, config: Config) -> str | None:
    """Why ``claims`` hold admin rights: ``"scope"``, ``"group:NAME"``, or ``None``."""
    if not claims.oidc and claims.scope == ADMIN_SCOPE:
        return "scope"
    if claims.oidc:
        for group in config.identity.admin_groups:
            if group in claims.groups:
                return f"group:{group}"
    return None


def _granted_by(claims: Claims, target_name: str, config: Config) -> str | None:
    if claims.grants(target_name):
        return "token"
    if claims.oidc:
        for group, globs in config.identity.group_targets:
            if group in claims.groups and any(fnmatchcase(target_name, g) for g in globs):
                return f"group:{group}"
    return None


def authorize(
    *,
    token: str | None,
    target_name: str,
    config: Config,
    keys: KeySet,
    revoked: RevocationSet,
    now: float,
    oidc: OidcTrust | None = None,
    client_cert: ClientCertNames | None = None,
    cache: TokenCache | None = None,
) -> Grant:
    """Decide whether ``token`` may open a tunnel to ``target_name``.

    Args:
        token: The bearer token from the request, or None if none was sent.
        target_name: The requested target.
        config: The current configuration.
        keys: The current token-verification keys.
        revoked: The current revocation snapshot.
        now: Current Unix time (the caller's clock; tests pass their own).
        oidc: Policies and last good keys of the OIDC issuers.
        client_cert: Names in the verified client certificate, if one was presented.
        cache: Verified tokens to reuse (:class:`auth.TokenCache`); revocation
            is checked here on every call, cached or not.

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
        claims = verify_identity(
            token, config=config, keys=keys, revoked=revoked, oidc=oidc, now=now, cache=cache
        )
    except TokenRejected as exc:
        raise RemoteProtocolError(str(exc), reason=exc.reason, status=401) from exc
    if not claims.oidc and claims.scope == ADMIN_SCOPE:
        raise RemoteProtocolError(
            "an admin token cannot open tunnels", reason="not_granted", status=403
        )
    granted_by = _granted_by(claims, target_name, config)
    if granted_by is None:
        raise RemoteProtocolError(
            f"the token does not grant target {target_name!r}", reason="not_granted", status=403
        )
    target = config.target(target_name)
    if target is None:
        raise RemoteProtocolError(
            f"no target named {target_name!r} is configured", reason="unknown_target", status=404
        )
    admitted_by = target.admitted_by(claims.sub, claims.groups)
    if admitted_by is None:
        raise RemoteProtocolError(
            f"user {claims.sub!r} is in neither allow_users nor allow_groups of target "
            f"{target_name!r}",
            reason="not_allowed",
            status=403,
        )
    if target.cert_user is not None and not cert_names_user(
        client_cert, claims.sub, target.cert_user
    ):
        raise RemoteProtocolError(
            f"target {target_name!r} needs a client certificate naming user {claims.sub!r} "
            f"(cert_user = {target.cert_user!r})",
            reason="cert_user_mismatch",
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
    return Grant(
        claims=claims,
        target=target,
        granted_by=granted_by,
        admitted_by=admitted_by,
        cert_rule=target.cert_user,
    )
