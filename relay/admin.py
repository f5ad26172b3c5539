"""The admin API: live sessions, revocation, reload and health over HTTP/JSON.

It listens on ``[admin] listen``: by default a Unix socket in the state
folder, created with mode 0600; or a loopback TCP address, where every
request must carry an admin token (a JWT with ``scope = "admin"``, checked
against the relay's own JWKS, issuer, audience and revocations) as
``Authorization: Bearer <token>``.

On the Unix socket the file mode is not the only check: every request is
authenticated by the kernel's peer credentials (``SO_PEERCRED``).  Root, the
relay's own uid, and the accounts in ``[admin] users`` or members of
``[admin] groups`` are admitted; anyone else gets 403 (logged as
``admin.refused`` and counted in ``dbgrelay_admin_refusals_total``), so a
process that reaches the socket some other way (a file mode loosened by
hand, an inherited descriptor) still cannot use it.

Endpoints:

=======  ===============================  ==========================================
GET      ``/v1/health``                   status, version, live session count
GET      ``/v1/sessions``                 every live tunnel
GET      ``/v1/sessions/{id}``            one live tunnel
DELETE   ``/v1/sessions/{id}``            end it (reason ``ended_by_admin``)
POST     ``/v1/sessions/{id}/end``        the same, for clients without DELETE
POST     ``/v1/tokens/{jti}/revoke``      revoke one token; its tunnels end now
POST     ``/v1/users/{user}/revoke``      revoke all of a user's tokens issued so far
POST     ``/v1/reload``                   re-read config, certificates and JWKS
=======  ===============================  ==========================================

``POST`` bodies are optional JSON objects; the revoke endpoints read
``{"reason": "..."}`` from them.  Errors are ``{"error": "<message>",
"reason": "<code>"}`` with status 400, 401, 403, 404, 405 (with ``Allow``),
409 (a reload that was refused) or 503.

Every state-changing request is logged and written to the relay's audit file
(``admin.session_ended``, ``token.revoked``, ``admin.reload``) with the actor:
the admin token's ``sub``, or ``unix:uid=N`` for the Unix socket.

On Windows the default is the named pipe ``\\\\.\\pipe\\dbgrelay-admin``
(``npipe:NAME``): its DACL admits only Administrators, LocalSystem, the
relay's own account and ``[admin] users``/``groups``, so Windows refuses
anyone else's open; local clients only (remote ones are rejected), and the
name is claimed first so no other process can impersonate the relay.  The
actor is ``npipe:pid=N,sid=S-1-...`` of the calling process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import trio

from auth import AuthError
from config import Config, format_address

from .access import is_admin, verify_identity
from .admin_client import AdminEndpoint, AdminError, admin_request
from .httpd import Handler, HttpRequest, HttpResponse, open_http_listeners, serve_http

if TYPE_CHECKING:
    from .server import Relay
    from .session import Session

__all__ = ["admin_listen_spec", "admin_handler", "serve_admin", "END_WAIT_TIMEOUT"]

log = logging.getLogger("dbgrelay.admin")

#: Seconds ``DELETE /v1/sessions/{id}`` waits for the tunnel's end record.
END_WAIT_TIMEOUT = 5.0

_MAX_REASON = 200
_SESSION_ID = re.compile(r"[a-z2-7]{1,32}")


def admin_listen_spec(config: Config) -> str:
    """``[admin] listen`` as :func:`relay.httpd.open_http_listeners` takes it.

    Returns:
        ``"unix:/abs/path.sock"`` or ``"127.0.0.1:9465"``.
    """
    listen = config.admin.listen
    if config.admin.unix_path is not None:
        return f"unix:{config.admin.unix_path}"
    return format_address(listen)  # type: ignore[arg-type]


async def serve_admin(
    relay: Relay,
    *,
    task_status: trio.TaskStatus[list[trio.abc.Listener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on the relay's ``[admin] listen`` until cancelled.

    Start it with ``await nursery.start(serve_admin, relay)``: once that
    returns, the socket accepts requests (and ``admin.listening`` is logged).

    Raises:
        LocalProtocolError: With ``reason="bad_listen"`` if the address
            cannot be bound (for example another relay holds the socket).

    Resource handling:
        Opens the listeners itself; they are closed (and a Unix socket file
        removed) when this returns or is cancelled.
    """
    admin = relay.config.admin
    if admin.pipe is not None:
        # Windows: the pipe's DACL is the check, made by the kernel on open.
        from .errors import LocalProtocolError
        from .npipe import open_pipe_listener

        try:
            listener = open_pipe_listener(admin.pipe.name, admit=admin.users + admin.groups)
        except OSError as exc:
            raise LocalProtocolError(
                f"admin.listen {admin.pipe}: {exc.strerror or exc}", reason="bad_listen"
            ) from exc
        log.info("admin.listening", extra={"address": listener.path, "auth": "pipe_dacl"})
        await serve_http([listener], admin_handler(relay, auth="pipe"), task_status=task_status)
        return
    spec = admin_listen_spec(relay.config)
    unix = admin.unix_path is not None
    listeners = await open_http_listeners(spec)
    for lst in listeners:
        address = spec if unix else format_address(lst.socket.getsockname()[:2])
        log.info(
            "admin.listening",
            extra={"address": address, "auth": "peer_credentials" if unix else "token"},
        )
    await serve_http(
        listeners, admin_handler(relay, auth="peer" if unix else "token"), task_status=task_status
    )


# ---------------------------------------------------------------------------
# Responses


class _Refusal(Exception):
    """Answer ``status`` with a JSON error; raised anywhere in a request."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    def response(self) -> HttpResponse:
        return _json(self.status, {"error": str(self), "reason": self.reason}, self.headers)


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> HttpResponse:
    body = json.dumps(obj, default=str, indent=1).encode() + b"\n"
    return HttpResponse(status, body, headers=headers or {})


# ---------------------------------------------------------------------------
# Who is asking


def _unix_actor(peer: str) -> str:
    """``unix:uid=N`` from the server's ``unix:pid=N,uid=N`` peer name."""
    match = re.search(r"uid=(\d+)", peer)
    return f"unix:uid={match.group(1)}" if match else "unix"


def peer_allowed(uid: int, gid: int, *, users: tuple[str, ...], groups: tuple[str, ...]) -> bool:
    """Whether the process with ``uid``/``gid`` may use the admin Unix socket.

    Admitted: root, the relay's own uid, an account named in ``users``, and
    a member (primary or supplementary) of a group named in ``groups``.
    Names that do not exist admit nobody.
    """
    import grp  # POSIX only, like the Unix socket this checks
    import pwd

    if uid in (0, os.getuid()):
        return True
    try:
        account = pwd.getpwuid(uid)
    except KeyError:
        account = None
    if account is not None and account.pw_name in users:
        return True
    if not groups:
        return False
    member_of = {gid}
    if account is not None:
        member_of.update(os.getgrouplist(account.pw_name, account.pw_gid))
    for name in groups:
        try:
            if grp.getgrnam(name).gr_gid in member_of:
                return True
        except KeyError:
            continue
    return False


def _authenticate(relay: Relay, request: HttpRequest, auth: str) -> dict[str, str]:
    """The actor fields for the audit trail, or a 401/403 refusal.

    ``auth`` is ``"token"`` (TCP), ``"peer"`` (Unix socket credentials) or
    ``"pipe"`` (the Windows admin pipe: its DACL let the caller in, and
    the caller is named by its process id and account SID).

    Raises:
        _Refusal: 401 without a valid admin token, 403 for a valid token
            without ``scope = "admin"``, 403 on the Unix socket for a peer
            that is not admitted (see :func:`peer_allowed`).
    """
    if auth == "pipe":
        return {"actor": request.peer}
    if auth == "peer":
        creds = request.credentials
        admin = relay.config.admin
        if creds is None:
            raise _Refusal(
                403, "peer_unknown", "the admin socket could not identify the caller (SO_PEERCRED)"
            )
        _pid, uid, gid = creds
        if not peer_allowed(uid, gid, users=admin.users, groups=admin.groups):
            raise _Refusal(
                403,
                "peer_not_allowed",
                f"uid {uid} may not use the admin socket; add its account to admin.users "
                "or admin.groups in the relay's config",
            )
        return {"actor": _unix_actor(request.peer)}
    challenge = {"www-authenticate": 'Bearer realm="dbgrelay-admin"'}
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _Refusal(
            401,
            "missing",
            "send an admin token as 'Authorization: Bearer <token>' "
            "(dbgrelay token issue --scope admin)",
            challenge,
        )
    config = relay.config
    try:
        claims = verify_identity(
            token,
            config=config,
            keys=relay.keys,
            revoked=relay.revoked,
            oidc=relay.identity.trust(),
            now=relay.wall_clock(),
        )
    except AuthError as exc:
        raise _Refusal(
            401, exc.reason, f"the admin token was refused: {exc.reason}", challenge
        ) from None
    admin_by = is_admin(claims, config)
    if admin_by is None:
        raise _Refusal(
            403,
            "not_admin",
            f"the token of {claims.sub!r} is not an admin token (scope 'admin', or a group "
            "in identity.admin_groups)",
        )
    actor = {"actor": claims.sub, "actor_jti": claims.jti}
    if claims.oidc:
        actor |= {"actor_issuer": claims.iss, "admin_by": admin_by}
    return actor


# ---------------------------------------------------------------------------
# Routing


def admin_handler(relay: Relay, *, auth: str) -> Handler:
    """The request handler for :func:`relay.httpd.serve_http`.

    Args:
        relay: The running relay.
        auth: How callers are checked: ``"token"`` (TCP: an admin token),
            ``"peer"`` (Unix socket credentials) or ``"pipe"`` (the Windows
            admin pipe's DACL); see :func:`_authenticate`.
    """

    async def handle(request: HttpRequest) -> HttpResponse:
        try:
            route, params = _route(request)
            actor = _authenticate(relay, request, auth)
            return await route(relay, request, actor, *params)
        except _Refusal as refusal:
            level = logging.WARNING if refusal.status in (401, 403) else logging.INFO
            if refusal.status in (401, 403):
                relay.metrics.admin_refused(refusal.reason)
            log.log(
                level,
                "admin.refused",
                extra={
                    "peer": request.peer,
                    "method": request.method,
                    "path": request.path,
                    "status": refusal.status,
                    "reason": refusal.reason,
                },
            )
            return refusal.response()

    return handle


_Route = Callable[..., Any]


def _route(request: HttpRequest) -> tuple[_Route, list[str]]:
    """The function for the request's path and method, and its path parameters.

    Unknown paths are 404 and wrong methods 405 before authentication, so a
    typo is reported as such; neither reveals anything about the relay.
    """
    parts = request.path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != "v1":
        raise _Refusal(404, "not_found", f"no such endpoint {request.path!r}; see /v1/health")
    parts = [unquote(p) for p in parts[2:]]
    table: dict[str, _Route]
    params: list[str] = []
    match parts:
        case ["health"]:
            table = {"GET": _health}
        case ["sessions"]:
            table = {"GET": _list_sessions}
        case ["sessions", sid] if sid:
            table, params = {"GET": _get_session, "DELETE": _end_session}, [sid]
        case ["sessions", sid, "end"] if sid:
            table, params = {"POST": _end_session}, [sid]
        case ["tokens", jti, "revoke"] if jti:
            table, params = {"POST": _revoke_token}, [jti]
        case ["users", user, "revoke"] if user:
            table, params = {"POST": _revoke_user}, [user]
        case ["reload"]:
            table = {"POST": _reload}
        case _:
            raise _Refusal(404, "not_found", f"no such endpoint {request.path!r}; see /v1/health")
    if "GET" in table:
        table["HEAD"] = table["GET"]
    route = table.get(request.method)
    if route is None:
        allow = ", ".join(table)
        raise _Refusal(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use {allow}",
            {"allow": allow},
        )
    return route, params


def _body(request: HttpRequest) -> dict[str, Any]:
    """The optional JSON object body.

    Raises:
        _Refusal: 400 if the body is not a JSON object or ``reason`` is not a short string.
    """
    if not request.body.strip():
        return {}
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise _Refusal(
            400, "bad_json", 'the body must be a JSON object like {"reason": "..."}'
        ) from None
    if not isinstance(body, dict):
        raise _Refusal(400, "bad_json", 'the body must be a JSON object like {"reason": "..."}')
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise _Refusal(
            400, "bad_reason", f"'reason' must be a string of at most {_MAX_REASON} characters"
        )
    return body


def _describe(relay: Relay, session: Session) -> dict[str, Any]:
    return session.describe() | {
        "duration": round(max(0.0, relay.wall_clock() - session.started), 3),
        "ending": session.end_reason,
    }


def _find(relay: Relay, sid: str) -> Session:
    session = relay.sessions.get(sid) if _SESSION_ID.fullmatch(sid) else None
    if session is None:
        raise _Refusal(
            404, "unknown_session", f"no live session {sid!r} (it may have ended already)"
        )
    return session


# ---------------------------------------------------------------------------
# Endpoints


async def _health(relay: Relay, request: HttpRequest, actor: dict) -> HttpResponse:
    from .server import VERSION

    return _json(
        200,
        {
            "status": "draining" if relay.draining else "ok",
            "version": VERSION,
            "sessions": len(relay.sessions),
            "targets": [t.name for t in relay.config.targets],
            "managed_servers": sorted(n for n, s in relay.managed.items() if s.running),
            "state": relay.shared.describe() if relay.shared else {"backend": "sqlite"},
        },
    )


async def _list_sessions(relay: Relay, request: HttpRequest, actor: dict) -> HttpResponse:
    sessions = sorted(relay.sessions.values(), key=lambda s: (s.started, s.id))
    listed = [_describe(relay, s) for s in sessions]
    if relay.shared is None and relay.worker_siblings:
        # Worker 0 of several sharing SQLite: every worker's sessions, each naming its worker.
        for item in listed:
            item["worker"] = relay.worker_index
        more, missing = await _sibling_sessions(relay, request)
        listed += more
        listed.sort(key=lambda s: (s["started"], s["id"]))
        body: dict[str, Any] = {"sessions": listed}
        if missing:
            body["partial"] = "; ".join(missing)
        return _json(200, body)
    if relay.shared is None:
        return _json(200, {"sessions": listed})
    # With shared state: every relay's sessions, each naming the relay that holds it.
    for item in listed:
        item["relay"] = relay.shared.relay_id
    try:
        listed += await relay.shared.list_sessions(relay.wall_clock())
    except AuthError as exc:
        return _json(200, {"sessions": listed, "partial": f"only this relay's sessions: {exc}"})
    listed.sort(key=lambda s: (s["started"], s["id"]))
    return _json(200, {"sessions": listed})


async def _get_session(relay: Relay, request: HttpRequest, actor: dict, sid: str) -> HttpResponse:
    if relay.worker_siblings and sid not in relay.sessions and _SESSION_ID.fullmatch(sid):
        # Worker 0 of several sharing SQLite: the worker holding it answers.
        index, answer = await _ask_siblings(relay, request, "GET", sid)
        return _json(200, answer | {"worker": index})
    return _json(200, _describe(relay, _find(relay, sid)))


async def _end_session(relay: Relay, request: HttpRequest, actor: dict, sid: str) -> HttpResponse:
    _body(request)
    if relay.shared is not None and sid not in relay.sessions and _SESSION_ID.fullmatch(sid):
        return await _end_elsewhere(relay, actor, sid)
    if relay.worker_siblings and sid not in relay.sessions and _SESSION_ID.fullmatch(sid):
        return await _end_on_sibling(relay, request, actor, sid)
    session = _find(relay, sid)
    fields = {"session_id": sid, "user": session.user, "target": session.target} | actor
    log.info("admin.session_ended", extra=fields)
    relay.audit_event("admin.session_ended", **fields)
    session.end("ended_by_admin")
    closed = await _wait_closed(relay, sid)
    return _json(
        200,
        {
            "id": sid,
            "user": session.user,
            "target": session.target,
            "reason": session.end_reason,
            "closed": closed,
        },
    )


async def _end_elsewhere(relay: Relay, actor: dict, sid: str) -> HttpResponse:
    """End a session another relay of the cluster holds, through the shared state."""
    assert relay.shared is not None
    reason = "ended_by_admin"
    try:
        found = await relay.shared.request_end(sid, reason)
    except AuthError as exc:
        raise _Refusal(503, exc.reason, f"the shared state cannot be reached: {exc}") from exc
    if found is None:
        raise _Refusal(
            404, "unknown_session", f"no live session {sid!r} (it may have ended already)"
        )
    holder, session = found
    fields = {
        "session_id": sid,
        "user": session["user"],
        "target": session["target"],
        "relay": holder,
    } | actor
    log.info("admin.session_ended", extra=fields)
    relay.audit_event("admin.session_ended", **fields)
    closed = False
    with trio.move_on_after(END_WAIT_TIMEOUT):
        try:
            await relay.shared.wait_session_gone(sid)
            closed = True
        except AuthError:
            pass
    return _json(
        200,
        {
            "id": sid,
            "user": session["user"],
            "target": session["target"],
            "reason": reason,
            "closed": closed,
            "relay": holder,
        },
    )


def _as_caller(request: HttpRequest, endpoint: AdminEndpoint) -> AdminEndpoint:
    """``endpoint`` carrying the caller's admin token (TCP), which the sibling checks again."""
    if endpoint.unix_path is not None:
        return endpoint
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    return dataclasses.replace(endpoint, token=token.strip() or None)


async def _sibling_sessions(relay: Relay, request: HttpRequest) -> tuple[list[dict], list[str]]:
    """The other workers' sessions (each with its ``worker``), and which workers did not answer."""
    listed: list[dict] = []
    missing: list[str] = []

    async def ask(index: int, endpoint: AdminEndpoint) -> None:
        try:
            answer = await admin_request(_as_caller(request, endpoint), "GET", "/v1/sessions")
        except AdminError as exc:
            missing.append(f"worker {index} did not answer: {exc}")
            return
        listed.extend(item | {"worker": index} for item in answer.get("sessions", []))

    async with trio.open_nursery() as nursery:
        for index, endpoint in relay.worker_siblings.items():
            nursery.start_soon(ask, index, endpoint)
    return listed, sorted(missing)


async def _ask_siblings(
    relay: Relay, request: HttpRequest, method: str, sid: str
) -> tuple[int, dict]:
    """``method`` on ``/v1/sessions/<sid>`` at the worker that holds it: its index and answer.

    Raises:
        _Refusal: 404 when no worker holds it, or the holder's refusal.
    """
    for index, endpoint in sorted(relay.worker_siblings.items()):
        try:
            answer = await admin_request(
                _as_caller(request, endpoint), method, f"/v1/sessions/{quote(sid, safe='')}"
            )
        except AdminError as exc:
            if exc.status is None or exc.status == 404:
                continue  # not this worker's, or it is restarting: ask the next
            raise _Refusal(exc.status, exc.reason, str(exc)) from exc
        return index, answer
    raise _Refusal(404, "unknown_session", f"no live session {sid!r} (it may have ended already)")


async def _end_on_sibling(
    relay: Relay, request: HttpRequest, actor: dict, sid: str
) -> HttpResponse:
    """End a session another worker of this host holds, through its admin endpoint."""
    index, answer = await _ask_siblings(relay, request, "DELETE", sid)
    fields = {
        "session_id": sid,
        "user": answer.get("user"),
        "target": answer.get("target"),
        "worker": index,
    } | actor
    log.info("admin.session_ended", extra=fields)
    relay.audit_event("admin.session_ended", **fields)
    return _json(200, answer | {"worker": index})


async def _wait_closed(relay: Relay, sid: str) -> bool:
    """Whether the session left the relay (end record written) within the wait."""
    with trio.move_on_after(END_WAIT_TIMEOUT):
        await relay.wait_session_gone(sid)
    return sid not in relay.sessions


async def _revoke_token(relay: Relay, request: HttpRequest, actor: dict, jti: str) -> HttpResponse:
    reason = _body(request).get("reason", "")
    new = await _write_store(
        relay, partial(relay.store.revoke, jti, now=relay.wall_clock(), reason=reason)
    )
    ended = _apply_revocations(relay)
    fields = {"jti": jti, "reason": reason, "new": new, "sessions_ended": ended} | actor
    log.info("token.revoked", extra=fields)
    relay.audit_event("token.revoked", **fields)
    return _json(200, {"jti": jti, "revoked": True, "new": new, "sessions_ended": ended})


async def _revoke_user(relay: Relay, request: HttpRequest, actor: dict, user: str) -> HttpResponse:
    reason = _body(request).get("reason", "")
    now = relay.wall_clock()
    count = await _write_store(
        relay, partial(relay.store.revoke_user, user, now=now, reason=reason)
    )
    ended = _apply_revocations(relay)
    fields = {"user": user, "reason": reason, "tokens": count, "sessions_ended": ended} | actor
    log.info("token.revoked", extra=fields)
    relay.audit_event("token.revoked", **fields)
    return _json(200, {"user": user, "revoked": True, "tokens": count, "sessions_ended": ended})


async def _write_store(relay: Relay, write: Callable[[], Any]) -> Any:
    """Run a revocation-store write in a worker thread (SQLite may wait for its lock)."""
    try:
        return await trio.to_thread.run_sync(write)
    except AuthError as exc:
        log.error("admin.store_failed", extra={"error": str(exc)})
        raise _Refusal(503, exc.reason, f"the revocation store cannot be written: {exc}") from exc
    except ValueError as exc:
        raise _Refusal(400, "bad_request", str(exc)) from None


def _apply_revocations(relay: Relay) -> list[str]:
    """Load the store's new state now and end revoked tunnels; their ids."""
    live = [s for s in relay.sessions.values() if s.end_reason is None]
    relay.refresh_revocations()
    return sorted(s.id for s in live if s.end_reason == "revoked")


async def _reload(relay: Relay, request: HttpRequest, actor: dict) -> HttpResponse:
    _body(request)
    result = relay.reload(actor=actor["actor"])
    fields = {"ok": result.ok, "problems": list(result.problems)} | actor
    log.info("admin.reload", extra=fields)
    relay.audit_event("admin.reload", **fields)
    body = {
        "ok": result.ok,
        "targets": list(result.targets),
        "restart_needed": list(result.restart_needed),
    }
    if not result.ok:
        return _json(
            409,
            body
            | {
                "error": "the new config was refused; the relay keeps the old one",
                "reason": "reload_failed",
                "problems": list(result.problems),
            },
        )
    return _json(200, body)
