"""Where the connector's token comes from: refresh timing and command failures."""

from __future__ import annotations

import sys

import jwt
import pytest

from relay.credentials import TokenSource, TokenSourceError, refresh_at, token_summary


def token(**claims) -> str:
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def test_refresh_time_is_before_expiry() -> None:
    # A long token: 300 s before exp.
    assert refresh_at(token(iat=0, exp=3600), fetched=0) == 3300
    # A short token: halfway through its life.
    assert refresh_at(token(iat=100, exp=140), fetched=0) == 120
    # No iat: counted from when it was fetched.
    assert refresh_at(token(exp=1000), fetched=900) == 950
    # No exp: nothing to go by.
    assert refresh_at(token(sub="x"), fetched=0) is None
    assert refresh_at("not-a-jwt", fetched=0) is None


def test_summary_names_issuer_and_expiry() -> None:
    assert token_summary(token(iss="https://idp", exp=0)) == (
        "issuer https://idp, valid until 1970-01-01T00:00:00Z"
    )
    assert token_summary("garbage") == "no readable claims"


def test_split_command() -> None:
    assert TokenSource.split_command("az account get-access-token --query 'a b'") == (
        "az",
        "account",
        "get-access-token",
        "--query",
        "a b",
    )
    with pytest.raises(TokenSourceError, match="--token-command"):
        TokenSource.split_command("'unbalanced")
    with pytest.raises(TokenSourceError, match="empty"):
        TokenSource.split_command("  ")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import sys; print('oops', file=sys.stderr); sys.exit(3)", "exited with status 3: oops"),
        ("print('hello world')", "printed no JWT"),
    ],
)
async def test_a_failing_command_keeps_the_current_token(code: str, message: str) -> None:
    source = TokenSource(token="a.b.c", command=(sys.executable, "-c", code))
    with pytest.raises(TokenSourceError, match=message):
        await source.refresh()
    assert source.token == "a.b.c"


async def test_a_missing_program_is_named() -> None:
    source = TokenSource(token="a.b.c", command=("/nonexistent/get-token",))
    with pytest.raises(TokenSourceError, match="cannot run it"):
        await source.refresh()


async def test_a_command_token_is_read_from_stdout() -> None:
    good = token(exp=10)
    source = await TokenSource.open_command((sys.executable, "-c", f"print({good!r})"))
    assert source.token == good and source.next_refresh() is not None
