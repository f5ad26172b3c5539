"""The verified-token cache: hits skip the signature, never the time or key checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from auth import KeySet, SigningKey, TokenCache, TokenRejected, init_keys, load_jwks

from .conftest import AUDIENCE, ISSUER, NOW
from .test_tokens import LEEWAY, TTL, make


def check(cache: TokenCache, token: str, keys: KeySet, *, now: float = NOW, audience=AUDIENCE):
    return cache.verify(token, keys, issuer=ISSUER, audience=audience, now=now, leeway=LEEWAY)


def test_a_token_verified_again_is_answered_from_the_cache(signing_key, keyset):
    cache = TokenCache()
    token = make(signing_key)
    first = check(cache, token, keyset)
    again = check(cache, token, keyset, now=NOW + 60)
    assert again == first and first.sub == "alice"
    assert cache.hits == 1 and len(cache) == 1


def test_a_cached_token_still_expires(signing_key, keyset):
    cache = TokenCache()
    token = make(signing_key)
    check(cache, token, keyset)
    with pytest.raises(TokenRejected) as info:
        check(cache, token, keyset, now=NOW + TTL + LEEWAY)
    assert info.value.reason == "expired"
    assert len(cache) == 0  # an expired token is dropped, not kept


def test_a_cached_token_is_not_valid_before_its_nbf(signing_key, keyset):
    cache = TokenCache()
    token = make(signing_key, now=NOW + 1000)
    check(cache, token, keyset, now=NOW + 1000)
    with pytest.raises(TokenRejected) as info:
        check(cache, token, keyset, now=NOW)
    assert info.value.reason == "not_yet_valid"


def test_a_removed_key_takes_effect_at_once(signing_key, keyset, tmp_path: Path):
    cache = TokenCache()
    token = make(signing_key)
    check(cache, token, keyset)
    other = load_jwks(init_keys(tmp_path / "other").jwks)
    with pytest.raises(TokenRejected) as info:
        check(cache, token, other)
    assert info.value.reason == "unknown_kid"
    assert cache.hits == 0


def test_another_audience_is_verified_again(signing_key, keyset):
    cache = TokenCache()
    token = make(signing_key)
    check(cache, token, keyset)
    with pytest.raises(TokenRejected) as info:
        check(cache, token, keyset, audience="someone-else")
    assert info.value.reason == "bad_audience"
    assert cache.hits == 0


def test_a_rejected_token_is_not_cached(signing_key: SigningKey, keyset):
    cache = TokenCache()
    head, payload, sig = make(signing_key).split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    for _ in range(2):
        with pytest.raises(TokenRejected) as info:
            check(cache, forged, keyset)
        assert info.value.reason == "bad_signature"
    assert len(cache) == 0 and cache.hits == 0


def test_the_cache_is_bounded_least_recently_used_first(signing_key, keyset):
    cache = TokenCache(max_entries=2)
    a, b, c = (make(signing_key, user=u) for u in ("a", "b", "c"))
    check(cache, a, keyset)
    check(cache, b, keyset)
    check(cache, a, keyset)  # a is now the most recently used
    check(cache, c, keyset)  # evicts b
    assert len(cache) == 2 and cache.hits == 1
    check(cache, b, keyset)
    assert cache.hits == 1  # b was verified again
    check(cache, c, keyset)
    assert cache.hits == 2
