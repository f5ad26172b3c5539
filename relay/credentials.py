"""Where ``dbgrelay connect`` gets its token: a file, an environment variable, or a command.

A command (``--token-command "az account get-access-token ..."``) is run
again before the token expires, so a developer never pastes tokens and a
long debugging day outlives any one token.  Tunnels that are already open
keep running; new tunnels use the newest token.

The connector has no keys: it reads ``exp``/``iat`` from the token unverified,
only to decide when to ask for the next one.  The relay verifies.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .errors import RelayError

__all__ = ["TokenSource", "TokenSourceError", "token_summary", "refresh_at"]

log = logging.getLogger("dbgrelay.connect")

#: Refresh this long before expiry at most (and at half the lifetime for short tokens).
REFRESH_MARGIN = 300.0
#: After a failed command run, try again this long later (or sooner near expiry).
RETRY_INTERVAL = 10.0
#: Longest single sleep while waiting to refresh, so a suspend/resume is noticed.
WAKE_INTERVAL = 30.0
#: Largest token a command may print.
MAX_TOKEN_BYTES = 16384


class TokenSourceError(RelayError):
    """The token could not be read or the command failed; the message says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="token_source")


def _payload(token: str) -> dict[str, Any]:
    """The token's claims, unverified; empty if it cannot be read."""
    try:
        segment = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def refresh_at(token: str, *, fetched: float) -> float | None:
    """Unix time to fetch the next token: ``REFRESH_MARGIN`` before ``exp``, or halfway.

    Args:
        token: The current token.
        fetched: When it was obtained (stands in for a missing ``iat``).

    Returns:
        The time, or ``None`` if the token has no readable ``exp``.
    """
    claims = _payload(token)
    exp = _number(claims.get("exp"))
    if exp is None:
        return None
    iat = _number(claims.get("iat"))
    start = iat if iat is not None and iat <= exp else fetched
    return exp - min(REFRESH_MARGIN, max(0.0, exp - start) / 2)


def token_summary(token: str) -> str:
    """``issuer X, valid until ...`` for the connector's messages, read unverified."""
    claims = _payload(token)
    parts = []
    if isinstance(claims.get("iss"), str):
        parts.append(f"issuer {claims['iss'][:200]}")
    exp = _number(claims.get("exp"))
    if exp is not None:
        parts.append(f"valid until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(exp))}")
    return ", ".join(parts) or "no readable claims"


@dataclass
class TokenSource:
    """The connector's current token, and how to get the next one.

    Attributes:
        token: The current token.
        command: Program and arguments that print a fresh token on stdout,
            or ``None`` for a fixed token (file or environment variable).
        command_timeout: Seconds the command may run.
        wall_clock: Unix time source.
    """

    token: str
    command: tuple[str, ...] | None = None
    command_timeout: float = 60.0
    wall_clock: Callable[[], float] = time.time
    fetched: float = 0.0

    @classmethod
    def split_command(cls, text: str) -> tuple[str, ...]:
        """Split ``--token-command`` like a POSIX shell would (no pipes or expansions).

        Raises:
            TokenSourceError: The text is empty or has unbalanced quotes.
        """
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:
            raise TokenSourceError(f"--token-command {text!r}: {exc}") from None
        if not argv:
            raise TokenSourceError("--token-command is empty; give the program that prints a token")
        return argv

    @classmethod
    async def open_command(cls, command: tuple[str, ...], **kw: Any) -> TokenSource:
        """Run ``command`` once and return a source holding its token.

        Raises:
            TokenSourceError: The command failed or printed no token.
        """
        source = cls(token="", command=command, **kw)
        await source.refresh()
        return source

    async def refresh(self) -> str:
        """Run the command again and keep its token.

        Raises:
            TokenSourceError: The command could not run, failed, took longer
                than ``command_timeout``, or printed something that is not a
                JWT; the current token is kept.
        """
        if self.command is None:
            return self.token
        shown = shlex.join(self.command)[:200]
        try:
            with trio.fail_after(self.command_timeout):
                done = await trio.run_process(
                    list(self.command), capture_stdout=True, capture_stderr=True, check=False
                )
        except OSError as exc:
            raise TokenSourceError(
                f"--token-command {shown}: cannot run it: {exc.strerror or exc}"
            ) from None
        except trio.TooSlowError:
            raise TokenSourceError(
                f"--token-command {shown}: no token within {self.command_timeout:g}s"
            ) from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()
            raise TokenSourceError(
                f"--token-command {shown} exited with status {done.returncode}"
                + (f": {why[-1][:200]}" if why else "")
            )
        out = done.stdout[:MAX_TOKEN_BYTES].decode(errors="replace").strip()
        if out.count(".") != 2 or any(c.isspace() for c in out):
            raise TokenSourceError(
                f"--token-command {shown} printed no JWT; it must print only the token on stdout"
            )
        self.token = out
        self.fetched = self.wall_clock()
        return out

    def next_refresh(self) -> float | None:
        """Unix time of the next command run, or ``None`` if the token stays as it is."""
        if self.command is None:
            return None
        return refresh_at(self.token, fetched=self.fetched)

    async def run_refresh(
        self,
        on_refreshed: Callable[[str], Awaitable[None]],
        on_failed: Callable[[TokenSourceError], None],
    ) -> None:
        """Re-run the command before each token expires, until cancelled.

        Args:
            on_refreshed: Awaited with each new token.
            on_failed: Called when a run fails; the old token stays and the
                run is tried again after :data:`RETRY_INTERVAL`.
        """
        if self.command is None:
            return
        retry_at: float | None = None
        while True:
            when = retry_at if retry_at is not None else self.next_refresh()
            if when is None:
                return  # no exp: nothing tells us when to refresh
            # Sleep in short steps against the wall clock: trio's clock stops
            # while a laptop is suspended, the token's expiry does not.
            left = when - self.wall_clock()
            while left > 0:
                await trio.sleep(min(left, WAKE_INTERVAL))
                left = when - self.wall_clock()
            previous = self.token
            try:
                token = await self.refresh()
            except TokenSourceError as exc:
                on_failed(exc)
                retry_at = self.wall_clock() + RETRY_INTERVAL
                continue
            upcoming = self.next_refresh()
            # A command that hands out a cached token close to its expiry
            # must not make us run it in a tight loop.
            retry_at = (
                self.wall_clock() + RETRY_INTERVAL
                if upcoming is not None and upcoming <= self.wall_clock()
                else None
            )
            if token != previous:
                log.info("token.refreshed", extra={"summary": token_summary(token)})
                await on_refreshed(token)
