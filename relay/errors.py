"""Errors raised by the relay package.

Following h11, "the peer misbehaved" (:class:`RemoteProtocolError`) is kept
apart from "we misbehaved" (:class:`LocalProtocolError`, a bug or a
misconfiguration).  Every error carries a machine-readable ``reason``: the same
string goes into the audit log, the metric label and, for remote errors, the
one-line answer to the peer.
"""

from __future__ import annotations

__all__ = ["RelayError", "RemoteProtocolError", "LocalProtocolError"]


class RelayError(Exception):
    """Root of every error the relay package raises.

    Args:
        message: A sentence for an operator: what went wrong and what to do.
        reason: A short machine-readable code (``"idle"``, ``"bad_request"``).
    """

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class RemoteProtocolError(RelayError):
    """The peer sent something we refuse.

    Args:
        message: Explanation for the log.
        reason: Short code sent to the peer and used as the metric label.
        status: HTTP status for the refusal (400, 401, 403, 404, 408, 502, 503).
    """

    def __init__(self, message: str, *, reason: str, status: int = 400) -> None:
        super().__init__(message, reason=reason)
        self.status = status


class LocalProtocolError(RelayError):
    """We were asked to do something invalid: a bug or a misconfiguration."""
