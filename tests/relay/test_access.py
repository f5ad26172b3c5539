"""verify_identity: the one path from a token to claims, revocation included."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from auth import RevocationSet, TokenRejected, load_jwks, peek_unverified
from config import Config
from relay.access import authorize, verify_identity
from relay.errors import RemoteProtocolError

TARGET = {"name": "build42", "kind": "tcp", "backend": "tcp://127.0.0.1:9"}


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config([TARGET])


def _verify(config: Config, keydir: Path, token: str, revoked: RevocationSet):
    return verify_identity(
        token,
        config=config,
        keys=load_jwks(keydir / "jwks.json"),
        revoked=revoked,
        oidc=None,
        now=time.time(),
    )


def test_revocation_is_a_required_argument() -> None:
    # Callers cannot verify a token and forget to look it up in the
    # revocation set: there is no way to call it without one.
    parameter = inspect.signature(verify_identity).parameters["revoked"]
    assert parameter.default is inspect.Parameter.empty


@pytest.mark.parametrize("scope", [None, "admin"])
def test_revoked_by_jti_or_user_cutoff(
    config: Config, keydir: Path, token_for: Callable[..., str], scope: str | None
) -> None:
    token = token_for(scope=scope) if scope else token_for()
    claims = _verify(config, keydir, token, RevocationSet())
    assert claims.jti == peek_unverified(token)["jti"]
    for revoked in (
        RevocationSet(jtis=frozenset({claims.jti})),
        RevocationSet(user_cutoffs={"alice": claims.iat}),
    ):
        with pytest.raises(TokenRejected) as info:
            _verify(config, keydir, token, revoked)
        assert info.value.reason == "revoked"


def test_authorize_refuses_a_revoked_token_with_401(
    config: Config, keydir: Path, token_for: Callable[..., str]
) -> None:
    token = token_for()
    with pytest.raises(RemoteProtocolError) as info:
        authorize(
            token=token,
            target_name="build42",
            config=config,
            keys=load_jwks(keydir / "jwks.json"),
            revoked=RevocationSet(jtis=frozenset({peek_unverified(token)["jti"]})),
            now=time.time(),
        )
    assert (info.value.status, info.value.reason) == (401, "revoked")
