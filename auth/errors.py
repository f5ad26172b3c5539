"""Errors raised by the auth package.

Every error carries a machine-readable ``reason``: the same string goes into the
audit log and the metric label, so the set of reasons is fixed and spelled out
in :data:`TOKEN_REJECT_REASONS`.  Messages are for operators and never contain a
token.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "TokenRejected",
    "KeyFileError",
    "TOKEN_REJECT_REASONS",
]

#: Every ``reason`` a :class:`TokenRejected` can carry, in a stable order
#: (handy for pre-creating metric label values).
TOKEN_REJECT_REASONS: tuple[str, ...] = (
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
)


class AuthError(Exception):
    """Root of every error the auth package raises.

    Args:
        message: A sentence for an operator: what went wrong and what to do.
        reason: A short machine-readable code, used as audit field and metric label.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TokenRejected(AuthError):
    """A token failed verification or does not allow what was asked.

    Args:
        message: Explanation for the log. Never includes the token itself.
        reason: One of :data:`TOKEN_REJECT_REASONS`.

    Raises:
        ValueError: If ``reason`` is not one of :data:`TOKEN_REJECT_REASONS`; a
            typo here would otherwise create a new metric label silently.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        if reason not in TOKEN_REJECT_REASONS:
            raise ValueError(
                f"TokenRejected reason must be one of {', '.join(TOKEN_REJECT_REASONS)}, "
                f"got {reason!r}"
            )
        super().__init__(message, reason=reason)


class KeyFileError(AuthError):
    """A key, certificate or JWKS file is missing, unreadable or invalid.

    The message names the file and what to do about it.

    Args:
        message: Explanation naming the file.
        reason: Defaults to ``"bad_key_file"``.
    """

    def __init__(self, message: str, *, reason: str = "bad_key_file") -> None:
        super().__init__(message, reason=reason)
