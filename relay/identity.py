"""Keeping the signing keys of the OpenID Connect issuers fresh, off the tunnels' path.

::

    serve_identity_keys
    └─ one task per [[identity.oidc]] issuer:
         fetch discovery + JWK Set (HTTPS, bounded in time and size)
         wait for refresh_interval, or for an unknown kid (after the cooldown)

Tunnels never wait for the IdP: they read :meth:`IdentityKeys.trust`, a
snapshot of the last good key sets, and a token with an unknown ``kid`` only
raises a flag that the issuer's task acts on, at most once per
``unknown_kid_cooldown``.  A failed fetch (timeout, HTTP error, bad JSON, a
body over :data:`auth.oidc.MAX_DOCUMENT_BYTES`) keeps the last good key set;
:func:`auth.oidc.verify_oidc_token` refuses the issuer's tokens once that set
is older than ``max_staleness``.

HTTPS goes through httpx, which runs on trio via anyio: a maintained client
with certificate checks, HTTP/1.1 framing and per-phase timeouts, which a
hand-written h11 loop would have to repeat.  It is imported by the first
fetch: a relay without ``[[identity.oidc]]`` never loads it (3 MiB).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from auth import (
    MAX_DOCUMENT_BYTES,
    DiscoveryError,
    IssuerKeys,
    OidcTrust,
    parse_discovery,
    parse_key_set,
)
from config import OidcIssuerConfig

from .access import issuer_policy
from .errors import LocalProtocolError

__all__ = ["IdentityKeys", "FetchError", "fetch_issuer_keys", "issuer_ssl_contexts"]

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("dbgrelay.identity")
# httpx logs every request at INFO; our own identity.* events say what matters.
logging.getLogger("httpx").setLevel(logging.WARNING)

#: After a failed fetch, try again after this long (capped by refresh_interval).
RETRY_INTERVAL = 30.0


class FetchError(Exception):
    """One fetch from an IdP failed; the message says why, in one line."""


@dataclass(eq=False)
class _Issuer:
    config: OidcIssuerConfig
    index: int
    keys: IssuerKeys | None = None
    # Set when a token named an unknown kid; the issuer's task clears it.
    wanted: trio.Event = field(default_factory=trio.Event)
    # Fetches started, completed (good or bad), and an event per completion.
    started: int = 0
    attempts: int = 0
    attempted: trio.Event = field(default_factory=trio.Event)
    last_error: str | None = None


def _ssl_context(item: OidcIssuerConfig, index: int) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(item.ca) if item.ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise LocalProtocolError(
            f"identity.oidc[{index}].ca: cannot load {item.ca} as a PEM CA bundle ({exc}); "
            "give the CA certificate(s) that signed the IdP's HTTPS certificate",
            reason="bad_config",
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def issuer_ssl_contexts(issuers: tuple[OidcIssuerConfig, ...]) -> tuple[ssl.SSLContext, ...]:
    """The HTTPS client context of each issuer, so a bad ``ca`` file fails at start or reload.

    Raises:
        LocalProtocolError: A ``ca`` file is not a usable PEM bundle; the message names the key.
    """
    return tuple(_ssl_context(item, index) for index, item in enumerate(issuers))


async def _get(client: httpx.AsyncClient, url: str, what: str) -> bytes:
    import httpx

    if not url.startswith("https://"):
        raise FetchError(f"{what} URL {url[:200]!r} is not https://")
    try:
        async with client.stream("GET", url, headers={"accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise FetchError(f"{what} {url[:200]} answered HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_DOCUMENT_BYTES:
                raise FetchError(f"{what} {url[:200]} is larger than {MAX_DOCUMENT_BYTES} bytes")
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(
                        f"{what} {url[:200]} is larger than {MAX_DOCUMENT_BYTES} bytes"
                    )
            return bytes(body)
    except httpx.HTTPError as exc:
        raise FetchError(f"{what} {url[:200]}: {type(exc).__name__}: {exc}"[:400]) from exc


async def fetch_issuer_keys(client: httpx.AsyncClient, item: OidcIssuerConfig) -> dict:
    """Fetch discovery and the JWK Set of one issuer, within ``fetch_timeout``.

    Returns:
        Usable keys by kid.

    Raises:
        FetchError: Anything went wrong; nothing is kept from a failed fetch.
    """
    policy = issuer_policy(item)
    with trio.move_on_after(item.fetch_timeout) as scope:
        try:
            discovery = await _get(client, policy.discovery_url, "discovery")
            jwks_uri = parse_discovery(discovery, issuer=item.issuer)
            return parse_key_set(
                await _get(client, jwks_uri, "JWK Set"), algorithms=item.algorithms
            )
        except DiscoveryError as exc:
            raise FetchError(str(exc)) from exc
    assert scope.cancelled_caught
    raise FetchError(f"the IdP did not answer within fetch_timeout ({item.fetch_timeout:g}s)")


class IdentityKeys:
    """The last good key set of every configured issuer, and the tasks that refresh them.

    Args:
        issuers: ``config.identity.oidc``.
        wall_clock: Unix time source; ``fetched_at`` and staleness use it.
        audit: Called as ``audit(event, **fields)`` for fetch results that
            change what the relay trusts.
    """

    def __init__(
        self,
        issuers: tuple[OidcIssuerConfig, ...],
        *,
        wall_clock: Callable[[], float],
        audit: Callable[..., None] | None = None,
    ) -> None:
        self.wall_clock = wall_clock
        self._audit = audit or (lambda event, **fields: None)
        self._contexts = issuer_ssl_contexts(issuers)
        self._issuers = {
            item.issuer: _Issuer(config=item, index=i) for i, item in enumerate(issuers)
        }
        self._policies = {item.issuer: issuer_policy(item, i) for i, item in enumerate(issuers)}

    def trust(self) -> OidcTrust:
        """A snapshot for :func:`relay.access.authorize`: policies and last good keys."""
        return OidcTrust(
            policies=self._policies,
            keys={iss: st.keys for iss, st in self._issuers.items() if st.keys is not None},
            on_unknown_kid=self.note_unknown_kid,
        )

    def note_unknown_kid(self, issuer: str) -> None:
        """Ask for an early fetch of ``issuer``'s keys; never blocks, never fetches here."""
        state = self._issuers.get(issuer)
        if state is not None:
            state.wanted.set()

    def attempts(self, issuer: str) -> int:
        """How many fetches of ``issuer`` have completed (good or bad)."""
        return self._issuers[issuer].attempts

    def fetches_started(self, issuer: str) -> int:
        """How many fetches of ``issuer`` have started."""
        return self._issuers[issuer].started

    async def wait_attempt(self, issuer: str, after: int) -> int:
        """Wait until more than ``after`` fetches of ``issuer`` completed; return the count."""
        state = self._issuers[issuer]
        while state.attempts <= after:
            await state.attempted.wait()
        return state.attempts

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh every issuer's keys until cancelled.

        ``task_status.started()`` is called once every issuer had its first
        fetch attempt (each bounded by its ``fetch_timeout``), so a relay
        whose IdP is up accepts IdP tokens from its first tunnel on, and one
        whose IdP is down still starts.
        """
        async with trio.open_nursery() as nursery:
            for state in self._issuers.values():
                nursery.start_soon(self._run_issuer, state)
            # The first fetches run side by side: start-up waits for the slowest,
            # not for the sum.
            for issuer in self._issuers:
                await self.wait_attempt(issuer, 0)
            task_status.started()

    async def _run_issuer(self, state: _Issuer) -> None:
        import httpx

        item = state.config
        async with httpx.AsyncClient(
            verify=self._contexts[state.index],
            timeout=item.fetch_timeout,
            follow_redirects=False,
            trust_env=False,
        ) as client:
            while True:
                state.wanted = trio.Event()  # kid misses before this fetch are answered by it
                ok = await self._fetch(client, state)
                last = trio.current_time()
                wait = item.refresh_interval if ok else min(item.refresh_interval, RETRY_INTERVAL)
                with trio.move_on_after(wait):
                    await state.wanted.wait()
                    # A flood of unknown kids makes at most one fetch per cooldown.
                    await trio.sleep_until(last + item.unknown_kid_cooldown)

    async def _fetch(self, client: httpx.AsyncClient, state: _Issuer) -> bool:
        item = state.config
        fields = {"issuer": item.issuer}
        state.started += 1
        try:
            keys = await fetch_issuer_keys(client, item)
        except FetchError as exc:
            state.last_error = str(exc)
            age = self.wall_clock() - state.keys.fetched_at if state.keys is not None else math.inf
            log.warning(
                "identity.fetch_failed",
                extra=fields
                | {
                    "error": str(exc),
                    "keys_age": None if math.isinf(age) else round(age, 3),
                    "max_staleness": item.max_staleness,
                },
            )
            ok = False
        else:
            old = set(state.keys.keys) if state.keys is not None else set()
            state.keys = IssuerKeys(keys=keys, fetched_at=self.wall_clock())
            state.last_error = None
            if set(keys) != old:
                fields |= {"kids": sorted(keys), "added": sorted(set(keys) - old)}
                fields["removed"] = sorted(old - set(keys))
                log.info("identity.keys_changed", extra=fields)
                self._audit("identity.keys_changed", **fields)
            else:
                log.debug("identity.keys_fetched", extra=fields)
            ok = True
        state.attempts += 1
        state.attempted.set()
        state.attempted = trio.Event()
        return ok
