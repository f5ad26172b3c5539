"""Authentication for dbgrelay: signed tokens, their keys, revocation, and a lab PKI.

This package never imports ``relay`` or trio; its token checks are pure
functions of their arguments.
"""

from .errors import TOKEN_REJECT_REASONS, AuthError, KeyFileError, TokenRejected
from .keys import (
    KeyPaths,
    KeySet,
    SigningKey,
    init_keys,
    jwk_thumbprint,
    load_audit_key,
    load_audit_pubkey,
    load_jwks,
    load_signing_key,
    parse_jwks,
    public_jwk,
    rotate_keys,
)
from .pki import ClientCertPaths, PkiPaths, init_pki, issue_client_cert
from .revocation import RevocationSet, RevocationStore, TokenRecord
from .tokens import (
    ADMIN_SCOPE,
    ALGORITHM,
    MAX_TOKEN_LENGTH,
    Claims,
    issue_token,
    peek_unverified,
    verify_token,
)

__all__ = [
    "ADMIN_SCOPE",
    "ALGORITHM",
    "MAX_TOKEN_LENGTH",
    "TOKEN_REJECT_REASONS",
    "AuthError",
    "Claims",
    "ClientCertPaths",
    "KeyFileError",
    "KeyPaths",
    "KeySet",
    "PkiPaths",
    "RevocationSet",
    "RevocationStore",
    "SigningKey",
    "TokenRecord",
    "TokenRejected",
    "init_keys",
    "init_pki",
    "issue_client_cert",
    "issue_token",
    "jwk_thumbprint",
    "load_audit_key",
    "load_audit_pubkey",
    "load_jwks",
    "load_signing_key",
    "parse_jwks",
    "peek_unverified",
    "public_jwk",
    "rotate_keys",
    "verify_token",
]
