"""Authentication for dbgrelay: signed tokens, their keys, revocation, and a lab PKI.

This package never imports ``relay`` or trio; its token checks are pure
functions of their arguments.

The names below are imported on first use (PEP 562): a process that needs
only the errors, or nothing from here, does not load ``cryptography``, PyJWT
and ``sqlite3`` (``dbgrelay connect`` saves about 10 MiB of memory).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it.
_EXPORTS = {
    "AuthError": "errors",
    "ensure_private_dir": "_files",
    "KeyFileError": "errors",
    "TOKEN_REJECT_REASONS": "errors",
    "TokenRejected": "errors",
    "init_keys": "keys",
    "jwk_thumbprint": "keys",
    "KeyPaths": "keys",
    "KeySet": "keys",
    "load_audit_key": "keys",
    "load_audit_pubkey": "keys",
    "load_jwks": "keys",
    "load_signing_key": "keys",
    "parse_jwks": "keys",
    "public_jwk": "keys",
    "rotate_keys": "keys",
    "SigningKey": "keys",
    "DiscoveryError": "oidc",
    "IssuerKeys": "oidc",
    "IssuerPolicy": "oidc",
    "MAX_DOCUMENT_BYTES": "oidc",
    "OIDC_ALGORITHMS": "oidc",
    "OidcTrust": "oidc",
    "parse_discovery": "oidc",
    "parse_key_set": "oidc",
    "unverified_issuer": "oidc",
    "USER_CLAIMS": "oidc",
    "verify_oidc_token": "oidc",
    "ClientCertPaths": "pki",
    "init_pki": "pki",
    "issue_client_cert": "pki",
    "PkiPaths": "pki",
    "RevocationSet": "revocation",
    "RevocationStore": "revocation",
    "TokenRecord": "revocation",
    "PgRevocationStore": "revocation_pg",
    "migrate_schema": "revocation_pg",
    "read_dsn": "revocation_pg",
    "ADMIN_SCOPE": "tokens",
    "ALGORITHM": "tokens",
    "Claims": "tokens",
    "issue_token": "tokens",
    "MAX_TIME_CLAIM": "tokens",
    "MAX_TOKEN_LENGTH": "tokens",
    "peek_unverified": "tokens",
    "TokenCache": "tokens",
    "verify_token": "tokens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
