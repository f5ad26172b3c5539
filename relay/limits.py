"""Bounds on unauthenticated load: connection caps and per-source rate limits.

Protocol code (layer 1): nothing here does I/O or reads a clock.  Every
method that depends on time takes ``now`` (trio's clock in the relay, any
number in tests), so the limits are tested synchronously.

A *source* is who the limits count against: an IPv4 address, or the /64
network of an IPv6 address (one customer or one host usually gets a whole
/64, so counting single IPv6 addresses would let one machine rotate through
2**64 of them).  :func:`source_key` makes that key.

Per source the :class:`Limiter` keeps two token buckets and a counter:

- handshakes: every accepted connection takes a token; an empty bucket
  closes the connection at once, before the TLS handshake;
- failed authentication: a failed TLS handshake or a refused request takes
  a token; once the bucket is empty, failures are answered ``429`` with
  ``Retry-After`` (or closed, before a request was read) and reported only
  in summary.  A valid token is still checked and let through, so an
  attacker behind the same NAT address as an office cannot lock it out;
- connections not yet authenticated, capped per source and in total.

Memory is bounded: the table of sources holds at most ``max_sources``
entries, ordered by last use.  An entry that has been untouched long enough
for both buckets to refill, with no connection open, equals a fresh one and
is dropped; when the table is full the least recently used entry without an
open connection goes.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from config import LimitsSection

__all__ = [
    "LIMIT_REASONS",
    "Limiter",
    "LogThrottle",
    "Refused",
    "Ticket",
    "TokenBucket",
    "source_key",
]

#: Refusal reasons of this module, also metric labels (``dbgrelay_refusals_total``).
LIMIT_REASONS = (
    "unauthenticated_total",
    "unauthenticated_per_source",
    "handshake_rate",
    "auth_rate",
    "source_table_full",
)

# Entries looked at (and maybe dropped) from the old end of the table per call:
# enough to keep up with any arrival rate, small enough to stay O(1).
_SWEEP_PER_CALL = 4


def source_key(address: str) -> str:
    """The key per-source limits count against.

    Args:
        address: An IP address as text (IPv6 without brackets; a zone such as
            ``%eth0`` is ignored).  Anything else (a Unix socket path) is
            returned unchanged.

    Returns:
        ``"192.0.2.7"`` for IPv4 (and IPv4-mapped IPv6), ``"2001:db8:1:2::/64"``
        for IPv6.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class TokenBucket:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second.

    Args:
        rate: Tokens added per second (> 0).
        burst: Capacity (>= 1); the bucket starts full.
        now: The current time, in seconds.
    """

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"TokenBucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self._tokens

    def take(self, now: float) -> bool:
        """Take one token if there is one; return whether it was taken."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def give_back(self, now: float) -> None:
        """Return a token taken by :meth:`take` (never above ``burst``)."""
        self._refill(now)
        self._tokens = min(self.burst, self._tokens + 1)

    def wait_time(self, now: float) -> float:
        """Seconds until one token is available (0 if one is now)."""
        missing = 1 - self.tokens(now)
        return 0.0 if missing <= 0 else missing / self.rate

    def full_at(self) -> float:
        """When the bucket will be full again if nobody takes a token."""
        return self._at + (self.burst - self._tokens) / self.rate


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection the limits turn away.

    Attributes:
        reason: One of :data:`LIMIT_REASONS`.
        retry_after: Whole seconds after which the same request may pass,
            or ``None`` when that cannot be known.
    """

    reason: str
    retry_after: int | None = None


class _Source:
    __slots__ = ("handshakes", "failures", "unauthenticated")

    def __init__(self, settings: LimitsSection, now: float) -> None:
        self.handshakes = TokenBucket(settings.handshake_rate, settings.handshake_burst, now)
        self.failures = TokenBucket(settings.auth_failure_rate, settings.auth_failure_burst, now)
        self.unauthenticated = 0

    def stale(self, now: float) -> bool:
        """Whether this entry is indistinguishable from a fresh one at ``now``."""
        return (
            self.unauthenticated == 0
            and self.handshakes.full_at() <= now
            and self.failures.full_at() <= now
        )


class Ticket:
    """One admitted connection's hold on its source's limits.

    Obtained from :meth:`Limiter.open`.  While the connection is not yet
    authenticated it counts against the caps; :meth:`authenticated` or
    :meth:`release` (both idempotent) ends that.

    Attributes:
        source: The source key the connection counts against.
    """

    __slots__ = ("source", "_limiter", "_entry", "_counted")

    def __init__(self, limiter: Limiter, source: str, entry: _Source) -> None:
        self.source = source
        self._limiter = limiter
        self._entry = entry
        self._counted = True

    def auth_failed(self, now: float) -> Refused | None:
        """The handshake or request failed: it costs one failed-authentication token.

        Returns:
            ``None``, or ``auth_rate`` when the source had no token left:
            the source is over its rate, so the failure is answered quietly.
        """
        bucket = self._entry.failures
        if bucket.take(now):
            return None
        return Refused("auth_rate", retry_after=max(1, math.ceil(bucket.wait_time(now))))

    def authenticated(self) -> None:
        """The connection no longer counts as unauthenticated."""
        self.release()

    def release(self) -> None:
        """Stop counting this connection (on authentication or close)."""
        if self._counted:
            self._counted = False
            self._entry.unauthenticated -= 1
            self._limiter._unauthenticated -= 1


class Limiter:
    """Per-source and total limits on connections not yet authenticated.

    Args:
        settings: ``[limits]`` from the config; :meth:`configure` swaps it
            (a reload).
    """

    def __init__(self, settings: LimitsSection) -> None:
        self.settings = settings
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._unauthenticated = 0

    @property
    def unauthenticated(self) -> int:
        """Connections admitted and not yet authenticated or closed."""
        return self._unauthenticated

    def __len__(self) -> int:
        """Sources remembered right now."""
        return len(self._sources)

    def configure(self, settings: LimitsSection) -> None:
        """Use new limits; sources start over with full buckets under them."""
        if settings != self.settings:
            self.settings = settings
            for entry in self._sources.values():
                fresh = _Source(settings, entry.handshakes._at)
                entry.handshakes, entry.failures = fresh.handshakes, fresh.failures

    def open(self, source: str, now: float) -> Ticket | Refused:
        """Admit a new connection from ``source``, or say why not.

        Checks, in order: the total cap, the per-source cap, the per-source
        handshake rate.  An admitted connection counts as unauthenticated
        until its :class:`Ticket` is released.

        Args:
            source: A key from :func:`source_key`.
            now: The current time, in seconds.
        """
        s = self.settings
        self._sweep(now)
        if self._unauthenticated >= s.max_unauthenticated:
            return Refused("unauthenticated_total")
        entry = self._entry(source, now)
        if entry is None:
            return Refused("source_table_full")
        if entry.unauthenticated >= s.max_unauthenticated_per_source:
            return Refused("unauthenticated_per_source")
        if not entry.handshakes.take(now):
            return Refused(
                "handshake_rate", retry_after=max(1, math.ceil(entry.handshakes.wait_time(now)))
            )
        entry.unauthenticated += 1
        self._unauthenticated += 1
        return Ticket(self, source, entry)

    def _entry(self, source: str, now: float) -> _Source | None:
        entry = self._sources.get(source)
        if entry is not None:
            self._sources.move_to_end(source)
            return entry
        if len(self._sources) >= self.settings.max_sources and not self._evict_one():
            return None
        entry = self._sources[source] = _Source(self.settings, now)
        return entry

    def _evict_one(self) -> bool:
        """Drop the least recently used entry with no open connection."""
        for key, entry in self._sources.items():
            if entry.unauthenticated == 0:
                del self._sources[key]
                return True
        return False

    def _sweep(self, now: float) -> None:
        """Drop a few entries from the old end that equal fresh ones."""
        for _ in range(_SWEEP_PER_CALL):
            if not self._sources:
                return
            key, entry = next(iter(self._sources.items()))
            if not entry.stale(now):
                return
            del self._sources[key]


class LogThrottle:
    """At most one log line per key per ``interval``, counting the rest.

    Refusals caused by load must not produce load of their own (a log line
    and an audit record per refused connection would fill the disk they are
    meant to protect), so they are logged through this.  Keys are a small
    fixed set (the refusal reasons), so memory stays bounded.

    Args:
        interval: Seconds between two lines for the same key.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def should_log(self, key: str, now: float) -> int | None:
        """Whether to log an event for ``key`` now.

        Returns:
            ``None`` to stay quiet, else how many events were suppressed
            since the last line for this key.
        """
        if now < self._next.get(key, -math.inf):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._suppressed.pop(key, 0)
