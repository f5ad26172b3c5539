"""The ``dbgrelay`` command line.

This is the only module that prints to stderr or chooses an exit code.
Errors people can fix (a bad flag, a bad config, an unreadable key) end with
one line naming what was wrong and what to do, and exit 2; a refused token
exits 3; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import trio

from config.schema import DATA_PLANES

from .printable import escape_text

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class UserError(Exception):
    """A problem the user can fix; printed as one line (or one per problem)."""

    def __init__(self, message: str, *, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# Logging: one JSON object per line on stderr, or text for a terminal.

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        obj |= _fields(record)
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class TextFormatter(logging.Formatter):
    """One line per event for people: ``HH:MM:SS level event key=value ...``.

    Field values often come from peers (a refused token's claimed ``sub``), so
    the event and every key and value go through :func:`escape_text`: a
    ``\n`` cannot forge a log line and an ESC sequence cannot act on the
    terminal.  A traceback keeps its line breaks, each of its lines escaped
    and indented, so none of them can pass for a log line either.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(
            f"{escape_text(k)}={escape_text(v)}"
            for k, v in _fields(record).items()
            if v is not None
        )
        event = escape_text(record.getMessage())
        line = f"{stamp} {record.levelname.lower():7} {event} {fields}".rstrip()
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join(f"  {escape_text(t)}" for t in trace.split("\n"))
        return line


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither formatter shows where an event was logged from.  Without this,
    # every record walks the stack for it (logging's documented switch), and
    # the frames it touches stay materialised as long as their coroutine:
    # a tunnel's session task, for the tunnel's life.
    logging._srcfile = None


# ---------------------------------------------------------------------------
# Helpers


def _duration(text: str) -> float:
    from config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int | None:
    if text == "auto":
        return None  # one per CPU, resolved with the config
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number of processes >= 1 or 'auto', got {text!r}"
        )
    return value


def _load_config(path: Path):
    from config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UserError("\n".join(exc.problems)) from None


def _read_token(args: argparse.Namespace) -> str:
    if args.token_file is None:
        name = getattr(args, "token_env", None) or "DBGRELAY_TOKEN"
        token = os.environ.get(name, "").strip()
        if not token:
            raise UserError(
                f"no token: pass --token-file FILE or --token-command CMD (or set ${name})"
            )
        return token
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        raise UserError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    if not token:
        raise UserError(
            f"--token-file {args.token_file} is empty; it must hold the JWT an admin issued"
        )
    return token


def _err(message: str) -> None:
    # Messages may carry text a peer sent (a relay's refusal): escape it.
    for line in message.split("\n"):
        print(f"dbgrelay: {escape_text(line)}", file=sys.stderr)


def _say(message: str, *, file: Any = None) -> None:
    """Print one line for people on stdout (or ``file``), control characters escaped.

    A newline in ``message`` (say, in a ``sub`` the relay echoes) is shown as
    ``\\n``: it cannot start a line of its own.
    """
    print(escape_text(message), file=file or sys.stdout)


# ---------------------------------------------------------------------------
# keys / certs


def cmd_keys_init(args: argparse.Namespace) -> int:
    from auth import init_keys

    paths = init_keys(Path(args.out))
    print(f"signing key (keep secret): {paths.signing_key}", file=sys.stderr)
    print(f"public keys for [auth] jwks: {paths.jwks}", file=sys.stderr)
    print(f"audit key for [auth] audit_key (keep secret): {paths.audit_key}", file=sys.stderr)
    print(
        f"audit public key for 'dbgrelay audit verify --pubkey': {paths.audit_pub}", file=sys.stderr
    )
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from auth import rotate_keys

    paths = rotate_keys(Path(args.out))
    print(
        f"new signing key: {paths.signing_key}; {paths.jwks} now holds old and new public keys",
        file=sys.stderr,
    )
    print("send SIGHUP to the relay (or restart it) to load the new JWKS", file=sys.stderr)
    return EXIT_OK


def cmd_certs_init(args: argparse.Namespace) -> int:
    from auth import init_pki

    if not args.host:
        raise UserError(
            "certs init needs at least one --host (a DNS name or IP address of the relay)"
        )
    paths = init_pki(Path(args.out), args.host)
    print(f"CA certificate (give to developers for --ca): {paths.ca_cert}", file=sys.stderr)
    print(f"server certificate for [tls] cert: {paths.server_cert}", file=sys.stderr)
    print(f"server key for [tls] key: {paths.server_key}", file=sys.stderr)
    return EXIT_OK


def cmd_certs_issue_client(args: argparse.Namespace) -> int:
    from auth import issue_client_cert

    password = None
    if args.p12_password_file:
        password = Path(args.p12_password_file).read_bytes().strip()
    paths = issue_client_cert(Path(args.ca_dir), args.user, Path(args.out), p12_password=password)
    print(f"client certificate: {paths.cert}", file=sys.stderr)
    print(f"client key: {paths.key}", file=sys.stderr)
    print(f"PKCS#12 bundle for the Windows certificate store: {paths.p12}", file=sys.stderr)
    print(f"serial (for revocation): {paths.serial:x}", file=sys.stderr)
    return EXIT_OK


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    try:
        serial = int(args.serial, 16)
    except ValueError:
        raise UserError(
            f"certs revoke: {args.serial!r} is not a hex serial (as 'certs issue-client' prints it)"
        ) from None
    with _store(args) as store:
        store.revoke_serial(serial, now=time.time(), reason=args.reason or "")
    print(
        f"revoked client certificate serial {serial:x}; the relay refuses it in the TLS handshake "
        "once it re-reads its revocations (within seconds)",
        file=sys.stderr,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------
# tokens


def cmd_token_issue(args: argparse.Namespace) -> int:
    from auth import issue_token, load_signing_key, verify_token

    issuer, audience = args.issuer, args.audience
    config = _load_config(Path(args.config)) if args.config else None
    if config is not None:
        issuer = issuer or config.auth.issuer
        audience = audience or config.auth.audience
    if not args.target and args.scope != "admin":
        raise UserError(
            "token issue needs at least one --target NAME (globs like 'build*' allowed)"
        )
    key = load_signing_key(Path(args.key))
    now = time.time()
    try:
        token = issue_token(
            key,
            user=args.user,
            targets=args.target or [],
            ttl=args.ttl,
            issuer=issuer or "dbgrelay",
            audience=audience or "dbgrelay",
            now=now,
            scope=args.scope,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config is not None:
        from auth import KeySet

        from .state import open_revocation_store

        claims = verify_token(
            token,
            KeySet({key.kid: key.private_key.public_key()}),
            issuer=issuer or "dbgrelay",
            audience=audience or "dbgrelay",
            now=now,
            leeway=0,
        )
        with open_revocation_store(config) as store:
            store.record_issued(claims)
    print(token)
    return EXIT_OK


def _store(args: argparse.Namespace):
    from .state import open_revocation_store

    return open_revocation_store(_load_config(Path(args.config)))


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if bool(args.jti) == bool(args.user):
        raise UserError("token revoke needs a JTI, or --user NAME to revoke all of a user's tokens")
    config = _load_config(Path(args.config))
    reason = args.reason or ""
    what = args.jti if args.jti else f"every token of {args.user} issued until now"
    answer, why = _revoke_via_relay(args, config, reason)
    if answer is not None:
        ended = answer.get("sessions_ended") or []
        tunnels = f"{len(ended)} live tunnel(s) ended" + (f" ({', '.join(ended)})" if ended else "")
        _say(f"revoked {what} through the running relay; {tunnels}", file=sys.stderr)
        return EXIT_OK
    now = time.time()
    with _store(args) as store:
        if args.user:
            n = store.revoke_user(args.user, now=now, reason=reason)
            what += f" ({n} known)"
        elif not store.revoke(args.jti, now=now, reason=reason):
            what += " (already revoked)"
    _say(f"revoked {what} in the revocation store: {why}", file=sys.stderr)
    return EXIT_OK


def _revoke_via_relay(
    args: argparse.Namespace, config: Any, reason: str
) -> tuple[dict[str, Any] | None, str]:
    """Revoke through the admin API so live tunnels end now.

    Returns:
        The API's answer, or ``None`` and why the store must be written instead.
    """
    from .admin_client import AdminClient, AdminEndpoint, AdminError, AdminUnavailable

    token = _admin_token(args)
    endpoint = AdminEndpoint.from_config(config, token=token)
    if endpoint.address is not None and token is None:
        return None, (
            f"no --admin-token-file for the admin API at {endpoint}; a running relay "
            f"applies it within {config.relay.revocation_interval:g}s"
        )
    client = AdminClient(endpoint)

    async def call() -> dict[str, Any]:
        if args.user:
            return await client.revoke_user(args.user, reason=reason)
        return await client.revoke_token(args.jti, reason=reason)

    try:
        return trio.run(call), ""
    except AdminUnavailable:
        return None, "the relay is not running; it refuses the token when it starts"
    except AdminError as exc:
        raise _admin_failure(exc) from None


def cmd_token_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        records = store.list_tokens()
    rows = [_record_dict(r) for r in records]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    _table(rows, ["jti", "sub", "targets", "status", "issued_at", "exp", "revoked_at"])
    return EXIT_OK


def _record_dict(record: Any) -> dict[str, Any]:
    if hasattr(record, "__dataclass_fields__"):
        from dataclasses import asdict

        data = asdict(record)
    else:
        data = dict(record)
    for key in ("iat", "exp", "issued_at", "revoked_at"):
        if isinstance(data.get(key), int | float):
            data[key] = datetime.fromtimestamp(data[key], UTC).strftime("%Y-%m-%d %H:%M")
    if isinstance(data.get("targets"), list | tuple):
        data["targets"] = ",".join(data["targets"])
    return data


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    # Cells hold peer-chosen text (a token's sub, a client address).
    cells = [
        [escape_text(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# ---------------------------------------------------------------------------
# sessions, reload: the running relay's admin API


def _admin_token(args: argparse.Namespace) -> str | None:
    path = getattr(args, "admin_token_file", None)
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"--admin-token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise UserError(
            f"--admin-token-file {path} is empty; it must hold a token from "
            "'dbgrelay token issue --scope admin'"
        )
    return token


def _admin_config(args: argparse.Namespace) -> Any:
    if not args.config:
        raise UserError(f"{args.command} needs --config FILE (the relay's dbgrelay.toml)")
    return _load_config(Path(args.config))


def _admin_client(args: argparse.Namespace, config: Any = None):
    from .admin_client import AdminClient, AdminEndpoint

    if config is None:
        config = _admin_config(args)
    token = _admin_token(args)
    endpoint = AdminEndpoint.from_config(config, token=token)
    if endpoint.address is not None and token is None:
        raise UserError(
            f"the admin API listens on {endpoint} (TCP): pass --admin-token-file FILE "
            "holding an admin token ('dbgrelay token issue --scope admin')"
        )
    return AdminClient(endpoint)


def _admin_failure(exc: Any) -> UserError:
    """One line for a failed admin request; 3 if the admin token was refused."""
    from .admin_client import AdminUnavailable

    if isinstance(exc, AdminUnavailable):
        return UserError(f"{exc}; start it with 'dbgrelay serve'", code=EXIT_FAIL)
    if exc.status in (401, 403):
        return UserError(f"the relay refused the admin token: {exc}", code=EXIT_REFUSED)
    return UserError(str(exc), code=EXIT_FAIL)


def _run_admin(call: Callable[[], Any]) -> Any:
    from .admin_client import AdminError

    try:
        return trio.run(call)
    except AdminError as exc:
        raise _admin_failure(exc) from None


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def cmd_sessions(args: argparse.Namespace) -> int:
    client = _admin_client(args)
    sessions = _run_admin(client.sessions)
    if args.json:
        print(json.dumps(sessions, indent=2))
        return EXIT_OK
    rows = [
        s | {"age": _age(s.get("duration", 0)), "state": s.get("ending") or s.get("state", "open")}
        for s in sessions
    ]
    columns = ["id", "user", "target", "client", "age", "bytes_to_backend", "bytes_to_client"]
    # With shared state the list is the cluster's: say which relay holds each session.
    if any("relay" in s for s in sessions):
        columns.append("relay")
    # With several workers sharing SQLite: say which worker holds each session.
    if any("worker" in s for s in sessions):
        columns.append("worker")
    _table(rows, [*columns, "state"])
    return EXIT_OK


def cmd_sessions_end(args: argparse.Namespace) -> int:
    client = _admin_client(args)
    answer = _run_admin(lambda: client.end_session(args.id))
    state = "closed" if answer.get("closed") else "closing"
    _say(
        f"ended session {answer['id']} of {answer['user']} to {answer['target']} "
        f"(reason {answer['reason']}, {state})",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from .admin_client import AdminError

    try:
        config = _admin_config(args)
    except UserError as exc:
        raise UserError(
            f"{exc}\nthe relay was not asked to reload and keeps its current config",
            code=exc.code,
        ) from None
    client = _admin_client(args, config)
    try:
        answer = trio.run(client.reload)
    except AdminError as exc:
        problems = exc.body.get("problems")
        if exc.status == 409 and problems:
            _err("\n".join(["the relay refused the new config and keeps the old one:", *problems]))
            return EXIT_FAIL
        raise _admin_failure(exc) from None
    _say(f"reloaded; targets: {', '.join(answer['targets']) or '(none)'}", file=sys.stderr)
    if answer.get("restart_needed"):
        _say(
            f"changed keys that apply only after a restart: {', '.join(answer['restart_needed'])}",
            file=sys.stderr,
        )
    return EXIT_OK


# ---------------------------------------------------------------------------
# config, serve, connect


def cmd_check_config(args: argparse.Namespace) -> int:
    from .privsep import development_mode_warning, missing_account_warnings
    from .server import load_runtime

    config = _load_config(Path(args.config))
    load_runtime(config)
    warnings = missing_account_warnings(config)
    warnings += [w for w in [development_mode_warning(config)] if w is not None]
    for warning in warnings:
        print(f"{args.config}: {warning}", file=sys.stderr)
    print(f"{args.config}: ok ({len(config.targets)} targets)", file=sys.stderr)
    return EXIT_OK


def cmd_state_migrate(args: argparse.Namespace) -> int:
    from auth import migrate_schema, read_dsn

    config = _load_config(Path(args.config))
    state = config.state
    if state.backend != "postgres":
        raise UserError(
            f'{args.config}: state.backend is "{state.backend}"; state migrate applies to '
            '[state] backend = "postgres" (the SQLite file sets itself up)'
        )
    assert state.dsn_file is not None
    before, after = migrate_schema(read_dsn(state.dsn_file), connect_timeout=state.connect_timeout)
    if before == after:
        print(f"state schema is at version {after}; nothing to do", file=sys.stderr)
    else:
        print(f"state schema migrated from version {before} to {after}", file=sys.stderr)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from auth import ensure_private_dir

    config = _load_config(Path(args.config))
    # Created before anything is written into them: mode 0700, or on Windows
    # an owner-only DACL that the audit files and the state database inherit.
    for folder in (config.relay.state_dir, config.relay.audit_dir):
        ensure_private_dir(folder)  # KeyFileError: one line, from main()
    if args.worker_index is not None:
        from .workers import log_filter, worker_config

        for handler in logging.getLogger().handlers:
            handler.addFilter(log_filter(args.worker_index, os.getpid()))
        siblings = {}
        if args.worker_index == 0 and args.workers:
            from .workers import sibling_admins

            siblings = sibling_admins(config, args.workers)
        config = worker_config(config, args.worker_index)
        helper = _separate_privileges(config)
        run = partial(_run_relay, config, None, helper, worker=args.worker_index, siblings=siblings)
        trio.run(run)
        return EXIT_OK
    workers = args.workers
    if workers is None:
        from .workers import auto_workers

        workers, single = auto_workers(config)
        if single is not None:
            logging.getLogger("dbgrelay.relay").info(
                "workers.single", extra={"reason": single, "note": "one relay process"}
            )
    if workers > 1:
        from .workers import reuseport_available, run_supervisor, worker_argv

        if not reuseport_available():
            raise UserError(
                "serve --workers needs SO_REUSEPORT, which this platform lacks; run one "
                "relay per port instead"
            )
        if any(port == 0 for _host, port in config.relay.listen):
            raise UserError(
                f"{args.config}: relay.listen has port 0; --workers needs a fixed port that "
                "every worker binds"
            )
        argv = worker_argv(args.config, args.log_format, args.log_level, workers)
        return trio.run(run_supervisor, argv, workers)
    helper = _separate_privileges(config)
    trio.run(_run_relay, config, None, helper)
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    try:
        from . import winservice
    except ImportError:
        raise UserError(
            "dbgrelay service manages a Windows service; elsewhere run 'dbgrelay serve' "
            "under systemd (deploy/)"
        ) from None
    name = args.name
    try:
        if args.action == "install":
            if args.config is None:
                raise UserError("service install needs --config PATH: the relay's dbgrelay.toml")
            _load_config(Path(args.config))  # refuse a bad config now, not at start
            winservice.install(Path(args.config), name=name, auto_start=args.auto_start)
            _say(f"service {name} installed for {Path(args.config).resolve()}", file=sys.stderr)
        elif args.action == "remove":
            winservice.remove(name)
            _say(f"service {name} removed", file=sys.stderr)
        elif args.action == "start":
            winservice.start(name)
            _say(f"service {name} running", file=sys.stderr)
        elif args.action == "stop":
            winservice.stop(name)
            _say(f"service {name} stopped", file=sys.stderr)
        else:
            print(winservice.status(name))
    except OSError as exc:
        hint = "run it from an administrator's prompt"
        if getattr(exc, "winerror", None) == 1060:  # ERROR_SERVICE_DOES_NOT_EXIST
            hint = "install it first with 'dbgrelay service install --config PATH'"
        raise UserError(
            f"service {args.action} {name}: {exc.strerror or exc}; {hint}", code=EXIT_FAIL
        ) from None
    return EXIT_OK


def _separate_privileges(config: Any) -> Any:
    """As root with ``relay.user`` set: start the privileged helper, then drop to relay.user.

    Returns:
        The relay's end of the helper's socket, or None when there is no helper.
    """
    user = config.relay.user
    if user is None:
        return None
    try:
        import pwd
    except ImportError:  # Windows: no uids to drop to
        raise UserError(
            f"relay.user is {user!r}, but this system has no Unix accounts to drop to; "
            "remove relay.user and run the relay (or its service) as that account"
        ) from None

    from .privsep import drop_privileges, run_as_accounts, start_helper

    if os.geteuid() != 0:
        if pwd.getpwuid(os.geteuid()).pw_name == user:
            return None  # already relay.user (e.g. systemd User=): managed servers need root
        raise UserError(
            f"relay.user is {user!r} but 'dbgrelay serve' runs as uid {os.geteuid()}: "
            "start it as root (it drops to relay.user) or remove relay.user"
        )
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UserError(
            f"relay.user {user!r} does not exist; create it (deploy/sysusers.d/dbgrelay.conf)"
        ) from None
    helper = start_helper(run_as_accounts(config), relay_uid=uid)
    drop_privileges(user, [config.relay.state_dir, config.relay.audit_dir])
    logging.getLogger("dbgrelay.relay").info(
        "relay.privileges_dropped", extra={"user": user, "uid": uid, "helper": True}
    )
    return helper


async def run_relay_with_stop(
    config: Any, ready: Callable[[trio.Event], object], signals: bool
) -> None:
    """Run the relay; once it listens, ``ready(stop)`` gets the event that starts its drain.

    The Windows service uses it: its stop request sets ``stop`` from the
    service manager's thread, and ``signals=False`` because it does not run
    on Python's main thread.
    """
    await _run_relay(config, ready=ready, signals=signals)


async def _run_relay(
    config: Any,
    before: Callable[[trio.Nursery], Any] | None = None,
    helper: Any = None,
    *,
    worker: int | None = None,
    ready: Callable[[trio.Event], object] | None = None,
    signals: bool = True,
    siblings: dict[int, Any] | None = None,
) -> None:
    """Run the relay with its metrics endpoint, admin API and signal handling."""
    from .privsep import Launchers
    from .server import open_relay, run_signals, serve_relay

    metrics = _make_metrics(config)
    relay = open_relay(config, metrics=metrics)
    relay.launchers = Launchers(helper)
    relay.worker_index = worker
    relay.worker_siblings = siblings or {}
    if worker is not None and relay.leases is None:
        # SQLite workers: the caps and the watcher count the host's sessions.
        from .state import open_worker_sessions

        try:
            relay.leases = relay.server_claims = open_worker_sessions(config, worker)
        except BaseException:
            relay.close()
            raise
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(run_signals, relay, stop, stop_signals=signals))
            await _start_side_services(nursery, relay, metrics)
            if ready is None:
                await serve_relay(relay, stop=stop)
            else:
                async with trio.open_nursery() as serving:
                    await serving.start(partial(serve_relay, relay, stop=stop))
                    ready(stop)  # the tunnel listeners are bound
            nursery.cancel_scope.cancel()
    finally:
        relay.close()


def _make_metrics(config):
    """Live metrics when ``[metrics]`` serves them, else :class:`NilMetrics`.

    Without an endpoint nothing reads the counters, and the relay does not
    load prometheus_client at all.
    """
    from .metrics import Metrics, NilMetrics

    if not config.metrics.enabled:
        return NilMetrics()
    return Metrics(version=_version(), targets=[t.name for t in config.targets])


async def _start_side_services(nursery: trio.Nursery, relay: Any, metrics: Any) -> None:
    """The metrics endpoint and the admin API, when configured."""
    import ipaddress

    from config import format_address

    from .httpd import listener_address, serve_metrics

    config = relay.config
    section = config.metrics
    if section.listen is not None:
        listeners = await nursery.start(
            partial(serve_metrics, section, metrics, unready=relay.unready_reason)
        )
        auth = ["client_cert"] if section.tls else []
        auth += ["bearer_token"] if section.bearer_token_file is not None else []
        for lst in listeners:
            logging.getLogger("dbgrelay.relay").info(
                "metrics.listening",
                extra={"address": listener_address(lst), "auth": auth or ["none"]},
            )
        try:
            loopback = ipaddress.ip_address(section.listen[0]).is_loopback
        except ValueError:
            loopback = section.listen[0] == "localhost"
        if not loopback and not auth:
            # /metrics names every target: off loopback it should need credentials.
            logging.getLogger("dbgrelay.relay").warning(
                "metrics.unauthenticated",
                extra={
                    "address": format_address(section.listen),
                    "note": "set [metrics] bearer_token_file or tls_cert/tls_key/client_ca",
                },
            )
    try:
        from .admin import serve_admin
    except ImportError:  # pragma: no cover - admin API not present
        return
    await nursery.start(serve_admin, relay)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dbgrelay")
    except Exception:  # pragma: no cover - running from a source tree
        return "0.0.0"


def cmd_connect(args: argparse.Namespace) -> int:
    from .connector import (
        ConnectFailed,
        RelayRefused,
        check_password,
        debugger_commands,
        make_settings,
        preflight,
        serve_connector,
    )
    from .credentials import TokenSource, TokenSourceError, token_summary
    from .platform import INTERRUPT_SIGNALS

    if args.token_command is not None and args.token_file is not None:
        raise UserError("give either --token-file or --token-command, not both")
    command = None
    if args.token_command is not None:
        try:
            command = TokenSource.split_command(args.token_command)
        except TokenSourceError as exc:
            raise UserError(str(exc)) from None
        token = ""
    else:
        token = _read_token(args)
    password = _read_password(args, check_password)
    try:
        settings = make_settings(
            relay=args.relay,
            ca=Path(args.ca) if args.ca else None,
            target=args.target,
            token=token,
            listen=args.listen,
            engine=args.tls_engine,
            server_name=args.server_name,
            cert=Path(args.cert) if args.cert else None,
            key=Path(args.key) if args.key else None,
            token_source=TokenSource(token=token) if command is None else None,
            data_plane=args.data_plane,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    reported: set[tuple[int, str]] = set()

    def on_refused(exc: RelayRefused | ConnectFailed) -> None:
        key = (getattr(exc, "status", 0), exc.reason)
        if key not in reported:  # each distinct refusal is reported once
            reported.add(key)
            _err(escape_text(exc))  # the relay's words: one line, escaped

    def identity_line(headers: dict[str, str], token: str) -> str:
        user = unquote(headers.get("dbgrelay-user", "?"))
        groups = [unquote(g) for g in headers.get("dbgrelay-groups", "").split(",") if g]
        shown = ", ".join(groups) if groups else "none"
        return f"identity {user}, groups: {shown} ({token_summary(token)})"

    async def serve(headers: dict[str, str]) -> None:
        kind = args.kind or headers.get("dbgrelay-target-kind", "tcp")
        kd_transport = args.kd_transport or headers.get("dbgrelay-kd-transport")
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: serve_connector(
                    settings, on_refused=on_refused, task_status=task_status
                )
            )
            host, port = listeners[0].socket.getsockname()[:2]
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            print(
                f"dbgrelay connect: listening on {shown}, tunnelling to target {args.target} "
                f"via {args.relay} (Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )
            try:
                lines = debugger_commands(
                    kind, host, port, kd_transport=kd_transport, password=password
                )
            except ValueError as exc:
                raise UserError(f"cannot print a command line: {exc}") from None
            if kind == "kdsrv" and not lines:
                _err(
                    f"target {args.target} is a kdsrv target and the relay names no kernel "
                    "connection; pass --kd-transport net:port=PORT,key=KEY (as given to kdsrv's "
                    "target) to print the windbg and kd command lines"
                )
            if password is not None and kind in ("gdbserver", "tcp"):
                _err(f"--password-file is not used: a {kind} target has no WinDbg password")
            for line in lines:
                # kind and kd_transport may come from the relay's answer.
                print(escape_text(line), flush=True)

    async def run() -> int:
        nonlocal settings
        if command is not None:
            try:
                source = await TokenSource.open_command(command)
            except TokenSourceError as exc:
                _err(str(exc))
                return EXIT_FAIL
            settings = dataclasses.replace(settings, token_source=source)
        source = settings.token_source
        assert source is not None
        try:
            headers = await preflight(settings)
        except RelayRefused as exc:
            _err(escape_text(exc))
            return EXIT_REFUSED
        except ConnectFailed as exc:
            _err(escape_text(exc))
            return EXIT_FAIL
        print(
            f"dbgrelay connect: using {identity_line(headers, source.token)}",
            file=sys.stderr,
            flush=True,
        )

        async def refreshed(token: str) -> None:
            try:
                answer = await preflight(settings)
            except (RelayRefused, ConnectFailed) as exc:
                _err(f"the refreshed token does not work: {escape_text(exc)}")
                return
            print(
                f"dbgrelay connect: token refreshed; {identity_line(answer, token)}",
                file=sys.stderr,
                flush=True,
            )

        def refresh_failed(exc: TokenSourceError) -> None:
            _err(f"{exc}; keeping the current token and trying again")

        # Ctrl-C (or Ctrl-Break on Windows) ends the connector through
        # cancellation, so the tunnels close and nothing prints a traceback.
        with trio.open_signal_receiver(*INTERRUPT_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, headers)
                nursery.start_soon(source.run_refresh, refreshed, refresh_failed)
                # serve() runs until cancelled or until it fails (which
                # cancels this loop), so only a signal gets past here.
                signum = await signals.__anext__()
                nursery.cancel_scope.cancel()
        _err(f"connect: stopped by {_signal_name(signum)}; tunnels closed")
        return 128 + signum

    return trio.run(run)


def _signal_name(signum: int) -> str:
    import signal

    name = signal.Signals(signum).name
    return {"SIGINT": "Ctrl-C", "SIGBREAK": "Ctrl-Break"}.get(name, name)


def _read_password(args: argparse.Namespace, check: Callable[[str], None]) -> str | None:
    """The debug server's password from ``--password-file``, or ``None``."""
    if args.password_file is None:
        return None
    try:
        text = Path(args.password_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"--password-file {args.password_file}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    password = text.rstrip("\r\n")
    try:
        check(password)
    except ValueError as exc:
        raise UserError(f"--password-file {args.password_file}: {exc}") from None
    return password


# ---------------------------------------------------------------------------
# audit


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from auth import KeyFileError, load_audit_pubkey

    from .audit import verify_file

    pubkey = None
    if args.pubkey:
        try:
            pubkey = load_audit_pubkey(Path(args.pubkey))
        except KeyFileError as exc:
            raise UserError(f"--pubkey {args.pubkey}: {exc}") from None
    failed = False
    unreadable = False
    for name in args.paths:
        try:
            report = verify_file(
                Path(name), pubkey=pubkey, allow_unsigned_tail=args.allow_unsigned_tail
            )
        except OSError as exc:
            _err(f"audit verify: cannot read {name}: {exc.strerror or exc}")
            unreadable = True
            continue
        if report.ok:
            if report.signed:
                note = "signature ok"
            elif pubkey is None:
                note = "chain ok (no --pubkey: signatures not checked)"
            elif report.kind == "bytes":
                note = "chain ok (covered by its session file's signature)"
            elif report.signed_through == 0:
                note = (
                    f"no signature yet; {report.lines} unsigned line(s) accepted "
                    "(--allow-unsigned-tail)"
                )
            else:
                note = (
                    f"signature ok through line {report.signed_through}; "
                    f"{report.lines - report.signed_through} unsigned line(s) after it "
                    "accepted (--allow-unsigned-tail)"
                )
            _say(f"{name}: ok, {report.records} records, {note}")
        else:
            failed = True
            for problem in report.problems:
                _say(f"{name}: {problem}")
        for text in report.notes:
            _say(f"{name}: note: {text}")
    if unreadable:
        return EXIT_USAGE
    return EXIT_FAIL if failed else EXIT_OK


def cmd_audit_show(args: argparse.Namespace) -> int:
    from .audit import render_timeline

    code = EXIT_OK
    for name in args.paths:
        try:
            print(render_timeline(Path(name), show_bytes=args.bytes), end="")
        except OSError as exc:
            _err(f"audit show: cannot read {name}: {exc.strerror or exc}")
            code = EXIT_USAGE
    return code


# ---------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import prepare_demo, serve_echo, write_demo_config

    setup = prepare_demo(Path(args.state), port=args.port)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            echo_port = await nursery.start(serve_echo)
            write_demo_config(setup, echo_port=echo_port)
            config = _load_config(setup.config)
            here = Path.cwd()

            def rel(p: Path) -> str:
                return str(p.relative_to(here)) if p.is_relative_to(here) else str(p)

            connect = (
                f"dbgrelay connect --relay 127.0.0.1:{setup.port} --ca {rel(setup.ca)} "
                f"--token-file {rel(setup.token_file)}"
            )
            print(f"dbgrelay demo: relay on 127.0.0.1:{setup.port}, config {rel(setup.config)}")
            print("In another terminal (after 'source .venv/bin/activate'):")
            print(f"  {connect} --target demo-echo --listen 127.0.0.1:5005")
            print(
                "  then type into: python3 -c \"import socket,sys; s=socket.create_connection(('127.0.0.1',5005)); "
                "s.sendall(b'hello\\n'); print(s.recv(100))\""
            )
            if setup.gdbserver:
                print(f"  {connect} --target demo-gdb --listen 127.0.0.1:5006")
                print(
                    "  then: gdb -ex 'target remote 127.0.0.1:5006'   (gdbserver starts on demand)"
                )
            print(f"Audit logs: {rel(config.relay.audit_dir)}; Ctrl-C stops the relay.", flush=True)
            await _run_relay(config)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# ---------------------------------------------------------------------------


_ADMIN_TOKEN_HELP = (
    "file holding an admin token ('token issue --scope admin'); "
    "needed when [admin] listen is a TCP address"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbgrelay", description="Authenticated TLS relay for remote debugging sessions."
    )
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=None,
        help="log format on stderr (default: json for serve, text otherwise)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, parent=sub):
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("serve", cmd_serve, "run the relay")
    p.add_argument("--config", required=True, help="dbgrelay.toml")
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="run N relay processes sharing the listeners (SO_REUSEPORT) and the state, "
        "under a supervisor (default 'auto': one per CPU; one process where relay.listen "
        "has port 0 or the platform lacks SO_REUSEPORT)",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)

    state_sub = add("state", None, "the shared state database").add_subparsers(
        dest="state_command", metavar="COMMAND", required=True
    )
    p = add(
        "migrate",
        cmd_state_migrate,
        "apply the PostgreSQL schema migrations this dbgrelay needs",
        parent=state_sub,
    )
    p.add_argument("--config", required=True, help="dbgrelay.toml")

    p = add("check-config", cmd_check_config, "validate a config file and the files it names")
    p.add_argument("--config", required=True)

    p = add("connect", cmd_connect, "open tunnels from a local port to a target through the relay")
    p.add_argument("--relay", required=True, help="HOST:PORT of the relay")
    p.add_argument(
        "--ca",
        help="CA certificate (PEM) that signed the relay's certificate; default: the system store",
    )
    p.add_argument("--target", required=True)
    p.add_argument("--token-file", help="file holding the JWT (default: $DBGRELAY_TOKEN)")
    p.add_argument(
        "--token-env",
        metavar="NAME",
        help="environment variable holding the JWT when no --token-file (default DBGRELAY_TOKEN)",
    )
    p.add_argument(
        "--token-command",
        metavar="CMD",
        help="command that prints a fresh JWT on stdout (split like a shell, no pipes); "
        "run again before each token expires",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:5005",
        help="loopback HOST:PORT for the debugger "
        "(default 127.0.0.1:5005; port 0 picks a free one)",
    )
    p.add_argument(
        "--kind",
        choices=["dbgsrv", "kdsrv", "server", "gdbserver", "tcp"],
        help="override the target kind the relay reports",
    )
    p.add_argument(
        "--server-name", help="name to check in the relay's certificate (default: the --relay host)"
    )
    p.add_argument("--tls-engine", choices=["stdlib", "pyopenssl"], default="stdlib")
    p.add_argument(
        "--data-plane",
        choices=list(DATA_PLANES),
        default="auto",
        help="who moves an open tunnel's bytes, as the relay's relay.data_plane "
        "(default auto: a data-plane thread where the platform has epoll)",
    )
    p.add_argument("--cert", help="client certificate (PEM) for relays that require one")
    p.add_argument("--key", help="client key (PEM)")
    p.add_argument(
        "--password-file",
        help="file holding the debug server's password (its -server ...,password=); "
        "it appears only in the printed command lines",
    )
    p.add_argument(
        "--kd-transport",
        help="kdsrv kernel connection string (e.g. net:port=50000,key=1.2.3.4) for the "
        "printed command line, when the relay's target names none",
    )

    keys = add("keys", None, "token-signing and audit keys").add_subparsers(
        dest="sub", required=True
    )
    p = add("init", cmd_keys_init, "create signing.key, jwks.json, audit.key and audit.pub", keys)
    p.add_argument("--out", required=True)
    p = add("rotate", cmd_keys_rotate, "new signing key; old public keys stay in jwks.json", keys)
    p.add_argument("--out", required=True)

    certs = add("certs", None, "a small CA for labs without a PKI").add_subparsers(
        dest="sub", required=True
    )
    p = add("init", cmd_certs_init, "create a CA and a server certificate", certs)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--host", action="append", default=[], help="DNS name or IP of the relay (repeat)"
    )
    p = add("issue-client", cmd_certs_issue_client, "issue a client certificate for mTLS", certs)
    p.add_argument("--ca-dir", required=True, help="folder with ca.pem and ca.key")
    p.add_argument("--user", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--p12-password-file", help="file with the PKCS#12 password")
    p = add("revoke", cmd_certs_revoke, "revoke a client certificate by serial", certs)
    p.add_argument("serial", help="hex serial, as 'certs issue-client' prints it")
    p.add_argument("--reason")
    p.add_argument("--config", required=True)

    token = add("token", None, "issue, revoke and list tokens").add_subparsers(
        dest="sub", required=True
    )
    p = add("issue", cmd_token_issue, "print a signed token (JWT) on stdout", token)
    p.add_argument("--key", required=True, help="signing.key from 'dbgrelay keys init'")
    p.add_argument("--user", required=True)
    p.add_argument("--target", action="append", default=[], help="target name or glob (repeat)")
    p.add_argument(
        "--ttl", type=_duration, default=_duration("8h"), help='lifetime, e.g. "2h" (default 8h)'
    )
    p.add_argument("--issuer")
    p.add_argument("--audience")
    p.add_argument("--scope", choices=["admin"], help="issue an admin-API token instead")
    p.add_argument("--config", help="record the token in this relay's state (for 'token list')")
    p = add("revoke", cmd_token_revoke, "revoke a token by jti, or all of a user's", token)
    p.add_argument("jti", nargs="?")
    p.add_argument("--user")
    p.add_argument("--reason")
    p.add_argument("--config", required=True)
    p.add_argument("--admin-token-file", help=_ADMIN_TOKEN_HELP)
    p = add("list", cmd_token_list, "tokens this relay knows of", token)
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")

    audit = add("audit", None, "check and read audit logs").add_subparsers(
        dest="sub", required=True
    )
    p = add("verify", cmd_audit_verify, "check audit files for tampering and truncation", audit)
    p.add_argument("paths", nargs="+")
    p.add_argument("--pubkey", help="audit.pub (checks the signatures)")
    p.add_argument(
        "--allow-unsigned-tail",
        action="store_true",
        help="accept records after the last signature (the live file of a running relay, "
        "or a relay that crashed); they are listed as notes",
    )
    p = add("show", cmd_audit_show, "print a readable timeline", audit)
    p.add_argument("paths", nargs="+")
    p.add_argument("--bytes", action="store_true", help="also dump the recorded byte stream")

    def admin_flags(p: argparse.ArgumentParser, *, sub: bool = False) -> None:
        # On a sub-command the flags default to SUPPRESS, so they do not
        # overwrite values given before the sub-command's name.
        default = argparse.SUPPRESS if sub else None
        p.add_argument("--config", default=default, help="the relay's dbgrelay.toml (required)")
        p.add_argument("--admin-token-file", default=default, help=_ADMIN_TOKEN_HELP)

    p = add("sessions", cmd_sessions, "list the running relay's live tunnels, or end one")
    admin_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    ends = p.add_subparsers(dest="sessions_sub", metavar="end")
    q = add("end", cmd_sessions_end, "end a live tunnel (reason ended_by_admin)", ends)
    q.add_argument("id", help="the session id, as 'dbgrelay sessions' lists it")
    admin_flags(q, sub=True)

    p = add("reload", cmd_reload, "make the running relay re-read config, certificates and JWKS")
    admin_flags(p)

    p = add("service", cmd_service, "run the relay as a Windows service (install, start, ...)")
    p.add_argument("action", choices=["install", "remove", "start", "stop", "status"])
    p.add_argument("--config", help="the relay's dbgrelay.toml (install only)")
    p.add_argument("--name", default="dbgrelay", help="the service's name (default dbgrelay)")
    p.add_argument(
        "--auto-start", action="store_true", help="install: start with Windows (default: by hand)"
    )

    p = add("demo", cmd_demo, "start a relay with generated dev keys, CA and demo targets")
    p.add_argument(
        "--state", default="demo-state", help="folder for the demo's files (default demo-state)"
    )
    p.add_argument("--port", type=int, default=7443)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The relay logs JSON lines for machines; commands people run log text.
    fmt = args.log_format or ("json" if args.command == "serve" else "text")
    setup_logging(fmt, args.log_level)
    from auth import AuthError
    from config import ConfigError

    from .errors import RelayError

    expected = (UserError, ConfigError, AuthError, RelayError)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err(f"{args.command}: interrupted")
        return 130
    except expected as exc:
        return _report(exc)
    except BaseExceptionGroup as group:
        # Errors raised inside trio nurseries arrive wrapped in groups.
        interrupted, group = group.split(KeyboardInterrupt)
        if group is None:
            _err(f"{args.command}: interrupted")
            return 130
        mine, rest = group.split(expected)
        if rest is not None or mine is None:
            raise
        codes = [_report(exc) for exc in _leaves(mine)]
        return max(codes)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _report(exc: BaseException) -> int:
    """Print an expected error as one line per problem; return its exit code."""
    problems = getattr(exc, "problems", None)
    _err("\n".join(problems) if problems else str(exc))
    return getattr(exc, "code", EXIT_USAGE)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
