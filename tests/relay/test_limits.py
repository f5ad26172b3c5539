"""The limiter's arithmetic, driven synchronously with explicit times."""

from __future__ import annotations

import pytest

from config import LimitsSection
from relay.accept import BACKOFF_MAX, BACKOFF_MIN, EPISODE_GAP, Exhaustion
from relay.limits import Limiter, LogThrottle, Refused, Ticket, TokenBucket, source_key


def settings(**kw) -> LimitsSection:
    return LimitsSection(**kw)


# -- source keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/lb.sock", "/run/lb.sock"),
    ],
)
def test_source_key_is_the_ipv4_address_or_the_ipv6_slash_64(address, key):
    assert source_key(address) == key


def test_two_addresses_of_one_ipv6_64_share_a_key_and_another_64_does_not():
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1")
    assert source_key("2001:db8::1") != source_key("2001:db8:0:1::1")


# -- token bucket -----------------------------------------------------------------


def test_bucket_starts_full_empties_and_refills_at_its_rate():
    bucket = TokenBucket(rate=0.5, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(100.0) == pytest.approx(2.0)
    assert not bucket.take(101.9)
    assert bucket.take(102.0)
    assert not bucket.take(102.0)
    # Never above burst, however long it waits.
    assert bucket.tokens(10_000.0) == 3
    assert bucket.full_at() <= 10_000.0


def test_bucket_give_back_never_exceeds_burst():
    bucket = TokenBucket(rate=1, burst=2, now=0.0)
    bucket.give_back(0.0)
    assert bucket.tokens(0.0) == 2


def test_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5, now=0)


# -- connection caps ------------------------------------------------------------


def test_per_source_cap_refuses_the_next_connection_until_one_is_released():
    limiter = Limiter(settings(max_unauthenticated_per_source=2))
    a = limiter.open("192.0.2.1", 0.0)
    b = limiter.open("192.0.2.1", 0.0)
    assert isinstance(a, Ticket) and isinstance(b, Ticket)
    assert limiter.open("192.0.2.1", 0.0) == Refused("unauthenticated_per_source")
    # Another source is not affected.
    assert isinstance(limiter.open("192.0.2.2", 0.0), Ticket)
    a.authenticated()
    a.release()  # idempotent: authenticated already released it
    assert limiter.unauthenticated == 2
    assert isinstance(limiter.open("192.0.2.1", 0.0), Ticket)


def test_total_cap_counts_every_source():
    limiter = Limiter(settings(max_unauthenticated=3, max_unauthenticated_per_source=2))
    tickets = [limiter.open(f"192.0.2.{i}", 0.0) for i in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    assert limiter.open("192.0.2.99", 0.0) == Refused("unauthenticated_total")
    tickets[0].release()
    assert isinstance(limiter.open("192.0.2.99", 0.0), Ticket)


def test_handshake_rate_refuses_with_the_wait_then_refills():
    limiter = Limiter(settings(handshake_rate=2.0, handshake_burst=3))
    for _ in range(3):
        limiter.open("192.0.2.1", 10.0).release()
    assert limiter.open("192.0.2.1", 10.0) == Refused("handshake_rate", retry_after=1)
    # Half a second later one token is back (rate 2/s).
    assert isinstance(limiter.open("192.0.2.1", 10.5), Ticket)
    assert isinstance(limiter.open("192.0.2.2", 10.5), Ticket)


# -- failed authentication --------------------------------------------------------


def test_failures_are_free_until_the_burst_is_spent_then_refused_with_retry_after():
    limiter = Limiter(settings(auth_failure_rate=0.5, auth_failure_burst=3))
    ticket = limiter.open("192.0.2.1", 0.0)
    assert [ticket.auth_failed(0.0) for _ in range(3)] == [None, None, None]
    assert ticket.auth_failed(0.0) == Refused("auth_rate", retry_after=2)
    assert ticket.auth_failed(1.0) == Refused("auth_rate", retry_after=1)
    # Two seconds after the last token was taken, one is back.
    assert ticket.auth_failed(2.0) is None
    # The budget is per source: a connection from elsewhere starts full.
    other = limiter.open("192.0.2.2", 2.0)
    assert other.auth_failed(2.0) is None


def test_failures_are_shared_by_every_connection_of_a_source():
    limiter = Limiter(settings(auth_failure_burst=2, auth_failure_rate=0.001))
    first, second = limiter.open("192.0.2.1", 0.0), limiter.open("192.0.2.1", 0.0)
    assert first.auth_failed(0.0) is None
    assert second.auth_failed(0.0) is None
    assert first.auth_failed(0.0) == Refused("auth_rate", retry_after=1000)


# -- the source table -------------------------------------------------------------


def test_stale_sources_expire_and_the_table_never_grows_past_its_cap():
    s = settings(max_sources=300, max_unauthenticated=256, handshake_rate=10, handshake_burst=10)
    limiter = Limiter(s)
    for i in range(10_000):
        ticket = limiter.open(f"10.0.{i >> 8}.{i & 255}", i * 0.001)
        assert isinstance(ticket, Ticket)
        ticket.release()
        assert len(limiter) <= 300
    # Long after, every entry equals a fresh one and goes as new sources arrive.
    for i in range(20):
        limiter.open(f"192.0.2.{i}", 10_000.0).release()
    assert len(limiter) < 300


def test_a_full_table_evicts_the_least_recently_used_idle_source():
    limiter = Limiter(settings(max_sources=3, max_unauthenticated=2))
    held = limiter.open("192.0.2.1", 0.0)  # holds a connection: never evicted
    limiter.open("192.0.2.2", 0.0).release()
    limiter.open("192.0.2.3", 0.0).release()
    assert isinstance(limiter.open("192.0.2.4", 0.0), Ticket)
    assert len(limiter) == 3
    assert isinstance(held, Ticket)
    # The held source still counts its connection.
    assert limiter.unauthenticated == 2


def test_a_table_full_of_sources_holding_connections_refuses_new_sources():
    # Only possible when max_sources <= max_unauthenticated, which the config
    # loader forbids; the limiter still stays bounded.
    limiter = Limiter(settings(max_sources=2, max_unauthenticated=10))
    limiter.open("192.0.2.1", 0.0)
    limiter.open("192.0.2.2", 0.0)
    assert limiter.open("192.0.2.3", 0.0) == Refused("source_table_full")
    assert len(limiter) == 2


def test_configure_applies_new_limits_to_known_sources():
    limiter = Limiter(settings(handshake_burst=1, handshake_rate=0.001))
    limiter.open("192.0.2.1", 0.0).release()
    assert limiter.open("192.0.2.1", 0.0) == Refused("handshake_rate", retry_after=1000)
    limiter.configure(settings(handshake_burst=5, handshake_rate=0.001))
    assert isinstance(limiter.open("192.0.2.1", 0.0), Ticket)


# -- reporting ------------------------------------------------------------------


def test_log_throttle_lets_one_line_per_interval_and_counts_the_rest():
    throttle = LogThrottle(10.0)
    assert throttle.should_log("auth_rate", 0.0) == 0
    assert [throttle.should_log("auth_rate", t) for t in (1.0, 5.0, 9.9)] == [None] * 3
    assert throttle.should_log("handshake_rate", 5.0) == 0  # keys are independent
    assert throttle.should_log("auth_rate", 10.0) == 3


def test_exhaustion_logs_once_per_episode_and_backs_off_exponentially():
    ex = Exhaustion()
    starts, waits = [], []
    for i in range(12):
        start, wait = ex.failed(float(i))
        starts.append(start)
        waits.append(wait)
    assert starts == [True] + [False] * 11
    assert waits[0] == BACKOFF_MIN
    assert waits == sorted(waits) and waits[-1] == BACKOFF_MAX
    assert ex.errors == 12 and ex.started == 0.0
    assert ex.succeeded(12.0) is True
    assert ex.succeeded(12.5) is False
    # A new episode starts from the shortest wait again.
    assert ex.failed(100.0) == (True, BACKOFF_MIN)


def test_exhaustion_flapping_soon_after_a_recovery_is_the_same_episode():
    ex = Exhaustion()
    assert ex.failed(0.0) == (True, BACKOFF_MIN)
    assert ex.succeeded(1.0) is True  # logged: accepts work again
    # A backlog of dead connections drains through more flaps: each waits from
    # the shortest back-off again, and none logs a start or a recovery.
    for at in (1.1, 5.0, 10.9):
        assert ex.failed(at) == (False, BACKOFF_MIN)
        assert ex.active
        assert ex.succeeded(at + 0.05) is False
        assert not ex.active
    assert ex.errors == 4 and ex.started == 0.0
    # EPISODE_GAP after the logged recovery, a failure is a new episode.
    assert ex.failed(1.0 + EPISODE_GAP) == (True, BACKOFF_MIN)
    assert ex.errors == 1 and ex.started == 1.0 + EPISODE_GAP
    assert ex.succeeded(12.0) is True
