"""The gate every accepted connection passes before its session starts.

In order: the PROXY v2 header when ``relay.proxy_protocol`` is on (only from
``relay.proxy_trusted`` networks), then :class:`~relay.limits.Limiter`'s caps
and handshake rate for the client's source.  A connection turned away here is
closed at once, before the TLS handshake, and counted in
``dbgrelay_refusals_total{reason}``.

Refusals caused by load are logged (``connection.refused``) and audited at
most once per reason every 10 s, with the number left out: one log line and
one audit record per refused connection would fill the disk the limits
protect.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .errors import RemoteProtocolError
from .limits import Limiter, LogThrottle, Refused, Ticket, source_key
from .proxy_protocol import NEED_DATA, ProxyHeader, ProxyHeaderParser

if TYPE_CHECKING:
    from .context import RelayContext

__all__ = ["Admission", "Gate"]

log = logging.getLogger("dbgrelay.relay")

#: Seconds between two log lines (and audit records) for the same refusal reason.
REFUSAL_LOG_INTERVAL = 10.0


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Admission:
    """A connection the gate let through: its source and its hold on the limits.

    Attributes:
        source: The source key limits count against.
        peer: The client's address as audit and logs show it.
    """

    def __init__(self, gate: Gate, ticket: Ticket, peer: str) -> None:
        self._gate = gate
        self.ticket = ticket
        self.source = ticket.source
        self.peer = peer
        self.authenticated = False

    def passed(self) -> None:
        """The token checked out: the connection no longer counts as unauthenticated."""
        self.ticket.authenticated()
        self.authenticated = True
        self._gate.update_gauge()

    def failed(self) -> Refused | None:
        """A failed handshake or refused request; ``auth_rate`` if the source was over it.

        When this returns a :class:`Refused`, the source has used up its
        failures: the caller answers quietly (no per-connection audit record)
        and :meth:`throttled` reports it.
        """
        return self.ticket.auth_failed(trio.current_time())

    def throttled(self, reason: str, **fields: Any) -> None:
        """Count and (rate-limited) report a refusal of this connection."""
        self._gate.refused(reason, self.source, **fields)


class Gate:
    """Per-connection admission in front of :func:`relay.session.handle_connection`.

    Args:
        relay: The relay (its config, metrics and audit trail); it is also
            what ``handle`` is given.
    """

    def __init__(self, relay: RelayContext) -> None:
        self.relay = relay
        self.limiter = Limiter(relay.config.limits)
        # Sessions past the per-user check whose audit file is still being
        # written: they count against their user's cap until registered.
        self._throttle = LogThrottle(REFUSAL_LOG_INTERVAL)

    def update_gauge(self) -> None:
        self.relay.metrics.unauthenticated(self.limiter.unauthenticated)

    def refused(self, reason: str, source: str, **fields: Any) -> None:
        """Count a refusal; log and audit it unless one was reported recently."""
        self.relay.metrics.refusal(reason)
        suppressed = self._throttle.should_log(reason, trio.current_time())
        if suppressed is None:
            return
        record = {"reason": reason, "source": source, "suppressed": suppressed} | fields
        log.warning("connection.refused", extra=record)
        self.relay.audit_event("connection.refused", **record)

    async def serve(
        self,
        stream: trio.SocketStream,
        handle: Callable[..., Awaitable[None]],
    ) -> None:
        """Admit ``stream`` and run ``handle(relay, stream, admission=...)``, or close it.

        Resource handling:
            The caller (the accept loop) closes ``stream``.
        """
        config = self.relay.config
        self.limiter.configure(config.limits)
        try:
            host, port = stream.socket.getpeername()[:2]
        except (OSError, ValueError):
            return  # already gone
        peer = _format(host, port)
        address = host
        if config.relay.proxy_protocol:
            trusted = config.relay.proxy_trusted
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # a dual-stack listener's view of an IPv4 balancer
            if not any(ip in net for net in trusted):
                self.refused("proxy_untrusted", source_key(host), client=peer)
                return
            try:
                with trio.fail_after(config.relay.handshake_timeout):
                    header = await _read_proxy_header(stream)
            except (RemoteProtocolError, trio.TooSlowError) as exc:
                error = str(exc) or "no PROXY header within relay.handshake_timeout"
                self.refused("proxy_invalid", source_key(host), client=peer, error=error)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if header.command == "PROXY" and isinstance(header.source, tuple):
                address = header.source[0]
                peer = _format(*header.source)
            elif header.command == "PROXY" and isinstance(header.source, str):
                # A Unix-socket client of the balancer: limits count against the balancer.
                peer = f"unix:{header.source} via {peer}"
        source = source_key(address)
        ticket = self.limiter.open(source, trio.current_time())
        if isinstance(ticket, Refused):
            self.refused(ticket.reason, source)
            return
        self.update_gauge()
        admission = Admission(self, ticket, peer)
        try:
            await handle(self.relay, stream, admission=admission)
        finally:
            ticket.release()
            self.update_gauge()


async def _read_proxy_header(stream: trio.SocketStream) -> ProxyHeader:
    """Read exactly the PROXY header, never a byte of what follows it."""
    parser = ProxyHeaderParser()
    while (event := parser.next_event()) is NEED_DATA:
        parser.receive_data(await stream.receive_some(parser.bytes_wanted()))
    return event
