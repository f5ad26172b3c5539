"""A client for a running relay's admin API (see :mod:`relay.admin`).

``dbgrelay sessions``, ``dbgrelay reload`` and ``dbgrelay token revoke`` use
it.  Each call opens one connection, sends one request and reads the whole
answer, all within the endpoint's ``timeout``.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h11
import trio

from config import Config, format_address

from .errors import RelayError

__all__ = ["AdminEndpoint", "AdminError", "AdminUnavailable", "AdminClient", "admin_request"]

# A session list of a full relay (256 tunnels) is about 150 KB.
_MAX_RESPONSE = 16 * 1024 * 1024
_NOBODY_LISTENING = (errno.ENOENT, errno.ECONNREFUSED)


class AdminError(RelayError):
    """The admin API refused a request or could not be reached.

    Attributes:
        status: The HTTP status, or ``None`` if no answer arrived.
        body: The decoded JSON answer, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: int | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.status = status
        self.body = body or {}


class AdminUnavailable(AdminError):
    """Nothing listens on the admin address: the relay is not running."""


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    """Where the admin API listens and how to authenticate.

    Attributes:
        unix_path: The Unix socket, or ``None``.
        address: Loopback ``(host, port)`` for TCP, or ``None``.
        pipe: The Windows admin pipe's path (``\\\\.\\pipe\\NAME``), or ``None``.
        token: Admin token for a TCP endpoint (ignored on a socket or pipe).
        timeout: Seconds for connecting, sending and reading one request.

    Raises:
        ValueError: Not exactly one of ``unix_path``, ``address`` and ``pipe`` is set.
    """

    unix_path: Path | None = None
    address: tuple[str, int] | None = None
    token: str | None = None
    timeout: float = 10.0
    pipe: str | None = None

    def __post_init__(self) -> None:
        if [self.unix_path, self.address, self.pipe].count(None) != 2:
            raise ValueError("AdminEndpoint needs exactly one of unix_path, address and pipe")

    @classmethod
    def from_config(
        cls, config: Config, *, token: str | None = None, timeout: float = 10.0
    ) -> AdminEndpoint:
        """The endpoint named by ``config``'s ``[admin] listen``."""
        if config.admin.unix_path is not None:
            return cls(unix_path=config.admin.unix_path, token=token, timeout=timeout)
        if config.admin.pipe is not None:
            return cls(pipe=config.admin.pipe.path, token=token, timeout=timeout)
        return cls(address=config.admin.listen, token=token, timeout=timeout)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        if self.pipe is not None:
            return self.pipe
        assert self.address is not None
        return format_address(self.address)


def _errnos(exc: OSError) -> set[int | None]:
    """The error numbers behind ``exc``.

    ``trio.open_tcp_stream`` raises one plain ``OSError`` whose cause is a
    group holding the failure for each address it tried.
    """
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return {exc.errno} | {getattr(e, "errno", None) for e in cause.exceptions}
    return {exc.errno}


async def _connect(endpoint: AdminEndpoint) -> trio.abc.Stream:
    try:
        if endpoint.pipe is not None:
            from .npipe import open_pipe_stream

            return await open_pipe_stream(endpoint.pipe)
        if endpoint.unix_path is not None:
            return await trio.open_unix_socket(str(endpoint.unix_path))
        assert endpoint.address is not None
        host, port = endpoint.address
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        errnos = _errnos(exc)
        if errnos & set(_NOBODY_LISTENING):
            raise AdminUnavailable(
                f"the relay is not running: nothing listens on {endpoint} (admin.listen)",
                reason="not_running",
            ) from exc
        if errnos & {errno.EACCES, errno.EPERM}:
            raise AdminError(
                f"cannot open the admin socket {endpoint}: permission denied; run this as the "
                "relay's user (for example with sudo -u dbgrelay)",
                reason="permission_denied",
            ) from exc
        raise AdminError(
            f"cannot reach the admin API at {endpoint}: {exc.strerror or exc}",
            reason="unreachable",
        ) from exc


async def admin_request(
    endpoint: AdminEndpoint, method: str, path: str, *, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send one request and return the decoded JSON answer.

    Args:
        endpoint: Where the relay's admin API listens.
        method: ``GET``, ``POST`` or ``DELETE``.
        path: ``/v1/...``, already percent-encoded.
        body: A JSON object to send, if any.

    Returns:
        The answer, for a 2xx status.

    Raises:
        AdminUnavailable: Nothing listens (the relay is not running).
        AdminError: The relay refused the request (``status`` and ``reason``
            from its answer), the answer was not JSON, or the exchange did
            not finish within ``endpoint.timeout``.
    """
    try:
        with trio.fail_after(endpoint.timeout):
            stream = await _connect(endpoint)
            try:
                status, data = await _exchange(stream, endpoint, method, path, body)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        raise AdminError(
            f"the admin API at {endpoint} did not answer within {endpoint.timeout:g}s",
            reason="timeout",
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        raise AdminError(
            f"the admin API at {endpoint} closed the connection: {exc}", reason="broken"
        ) from exc
    try:
        decoded = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        decoded = None
    if not isinstance(decoded, dict):
        raise AdminError(
            f"the admin API at {endpoint} answered {status} without a JSON object",
            reason="bad_answer",
            status=status,
        )
    if status >= 300:
        raise AdminError(
            str(decoded.get("error") or f"HTTP {status}"),
            reason=str(decoded.get("reason") or "refused"),
            status=status,
            body=decoded,
        )
    return decoded


async def _exchange(
    stream: trio.abc.Stream,
    endpoint: AdminEndpoint,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT)
    payload = json.dumps(body).encode() if body is not None else b""
    headers = [
        ("host", "localhost" if endpoint.address is None else str(endpoint)),
        ("accept", "application/json"),
        ("connection", "close"),
        ("content-length", str(len(payload))),
    ]
    if payload:
        headers.append(("content-type", "application/json"))
    if endpoint.token and endpoint.address is not None:
        headers.append(("authorization", f"Bearer {endpoint.token}"))
    data = conn.send(h11.Request(method=method, target=path, headers=headers))
    if payload:
        data += conn.send(h11.Data(data=payload))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)

    status = 0
    received = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            received += event.data
            if len(received) > _MAX_RESPONSE:
                raise AdminError(
                    f"the admin API at {endpoint} sent more than {_MAX_RESPONSE} bytes",
                    reason="bad_answer",
                )
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, bytes(received)


def _seg(value: str) -> str:
    return quote(value, safe="")


class AdminClient:
    """The admin API's endpoints as methods.

    Args:
        endpoint: Where the relay's admin API listens.

    Every method raises :class:`AdminUnavailable` or :class:`AdminError`
    as :func:`admin_request` does.
    """

    def __init__(self, endpoint: AdminEndpoint) -> None:
        self.endpoint = endpoint

    async def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "draining", "version", "sessions", "targets", ...}``."""
        return await admin_request(self.endpoint, "GET", "/v1/health")

    async def sessions(self) -> list[dict[str, Any]]:
        """Every live tunnel, oldest first."""
        return (await admin_request(self.endpoint, "GET", "/v1/sessions"))["sessions"]

    async def session(self, session_id: str) -> dict[str, Any]:
        """One live tunnel."""
        return await admin_request(self.endpoint, "GET", f"/v1/sessions/{_seg(session_id)}")

    async def end_session(self, session_id: str) -> dict[str, Any]:
        """End a tunnel; returns once its end record is written (``closed``) or after 5 s."""
        return await admin_request(self.endpoint, "DELETE", f"/v1/sessions/{_seg(session_id)}")

    async def revoke_token(self, jti: str, *, reason: str = "") -> dict[str, Any]:
        """Revoke one token; ``sessions_ended`` lists the tunnels that ended."""
        return await admin_request(
            self.endpoint, "POST", f"/v1/tokens/{_seg(jti)}/revoke", body={"reason": reason}
        )

    async def revoke_user(self, user: str, *, reason: str = "") -> dict[str, Any]:
        """Revoke every token of ``user`` issued until now."""
        return await admin_request(
            self.endpoint, "POST", f"/v1/users/{_seg(user)}/revoke", body={"reason": reason}
        )

    async def reload(self) -> dict[str, Any]:
        """Reload; a refused config raises :class:`AdminError` with ``body["problems"]``."""
        return await admin_request(self.endpoint, "POST", "/v1/reload")
