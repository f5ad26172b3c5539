"""One CA and one server certificate shared by every TLS path of a run.

stunnel and dbgrelay present the same ECDSA P-256 certificate (made by the
project's own ``certs init`` code), so neither path pays for a bigger key or
a longer chain than the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from auth import init_pki

__all__ = ["CertFiles", "make_certs"]


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Paths of the PEM files :func:`make_certs` wrote."""

    ca: Path
    cert: Path
    key: Path


def make_certs(folder: Path) -> CertFiles:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` (for 127.0.0.1 and localhost)."""
    paths = init_pki(folder, ["127.0.0.1", "localhost"])
    return CertFiles(ca=paths.ca_cert, cert=paths.server_cert, key=paths.server_key)
