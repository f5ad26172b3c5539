"""Reading and validating the TOML configuration.

:func:`load_config` reads a file with :mod:`tomllib`; :func:`config_from_dict`
validates an already-parsed table.  Both check every key, collect every
problem and raise one :class:`~config.errors.ConfigError` listing them all,
so an operator fixes the whole file in one pass.  Each problem line names the
file, the key and what is expected::

    dbgrelay.toml: targets[1].idle_timeout: expected a duration like "30s", "15m" or "8h", got -5

Files the relay will read (certificates, keys, the JWKS) are opened here so a
typo shows up at start-up rather than at the first handshake; their contents
are checked by the code that uses them.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import shutil
import stat
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .addresses import (
    BACKEND_FORMS,
    PORT_PLACEHOLDER,
    parse_backend_url,
    parse_listen_address,
    same_socket,
)
from .durations import parse_duration
from .errors import ConfigError
from .schema import (
    CERT_USER_RULES,
    DATA_PLANES,
    DEBUGGER_RESTRICTIONS,
    TARGET_KINDS,
    Address,
    AdminSection,
    AuthSection,
    Config,
    IdentitySection,
    LimitsSection,
    MetricsSection,
    NpipeBackend,
    OidcIssuerConfig,
    PipeAddress,
    RelaySection,
    StateSection,
    TargetConfig,
    TcpBackend,
    TLSSection,
    debugger_name,
    file_defaults,
    file_keys,
    file_tables,
    format_address,
)

__all__ = ["load_config", "config_from_dict"]

# Every key each table accepts, in the order the README documents them: the
# schema's field order.
_SECTIONS: dict[str, type] = file_tables()
_KEYS: dict[str, tuple[str, ...]] = {name: file_keys(cls) for name, cls in _SECTIONS.items()}
_TABLES = tuple(_KEYS)
# [[identity.oidc]] entries.
_OIDC_KEYS: tuple[str, ...] = file_keys(OidcIssuerConfig)
# Each table's defaults, by the ``where`` of its problem lines without index.
_DEFAULTS: dict[str, dict[str, Any]] = {
    name: file_defaults(cls) for name, cls in _SECTIONS.items()
} | {"identity.oidc": file_defaults(OidcIssuerConfig)}

_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_LOOPBACK_NAMES = ("localhost",)

_DURATION_FORMS = 'expected a duration like "30s", "15m" or "8h"'
#: The admin pipe on Windows: ``\\\\.\\pipe\\dbgrelay-admin``.
DEFAULT_ADMIN_PIPE = "dbgrelay-admin"


class _Bad:
    """Marks a value that already produced a problem."""

    def __repr__(self) -> str:
        return "<bad>"


_T = TypeVar("_T")

_BAD: Any = _Bad()
_MISSING: Any = object()
# A validator's default: the schema's default of that key.
_SCHEMA: Any = object()
_INDEX = re.compile(r"\[\d+\]$")


# --------------------------------------------------------------------------
# Showing values in messages


def _show(value: Any) -> str:
    """Write a value the way it looks in TOML, shortened for one line."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, int | float):
        shown = repr(value)
    elif isinstance(value, os.PathLike):
        shown = json.dumps(os.fspath(value), ensure_ascii=False)
    elif isinstance(value, list | tuple):
        shown = "[" + ", ".join(_show(item) for item in value) + "]"
    elif isinstance(value, Mapping):
        return "a table"
    else:
        shown = f"{type(value).__name__} {value}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return shown


# --------------------------------------------------------------------------
# The validator


class _Validator:
    """Walks the parsed TOML, records problems and gathers constructor kwargs."""

    def __init__(self, source_name: str, base_dir: Path) -> None:
        self.source_name = source_name
        self.base_dir = base_dir
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source_name}: {key}: {message}")

    def default(self, where: str, key: str, default: Any) -> Any:
        """``default``, or the schema's default of ``key`` when it is ``_SCHEMA``."""
        if default is _SCHEMA:
            return _DEFAULTS[_INDEX.sub("", where)][key]
        return default

    # -- tables and unknown keys ------------------------------------------

    def table(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
        value = data.get(name, _MISSING)
        if value is _MISSING:
            return {}
        if not isinstance(value, Mapping):
            self.problem(name, f"expected a [{name}] table, got {_show(value)}")
            return None
        self.unknown_keys(value, name, _KEYS[name])
        return value

    def unknown_keys(self, table: Mapping[str, Any], where: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key in known:
                continue
            message = "unknown key"
            homes = [
                "[[targets]]" if name == "targets" else f"[{name}]"
                for name, keys in _KEYS.items()
                if key in keys and name != where.split("[")[0]
            ]
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.85)
            if homes:
                message += f" (it belongs in {' or '.join(homes)})"
            elif close:
                message += f' (did you mean "{close[0]}"?)'
            self.problem(f"{where}.{key}", f"{message}; known keys: {', '.join(known)}")

    # -- scalar values ------------------------------------------------------

    def string(
        self,
        table: Mapping[str, Any],
        where: str,
        key: str,
        default: Any = _SCHEMA,
        *,
        choices: tuple[str, ...] | None = None,
        required: str | None = None,
    ) -> Any:
        value = table.get(key, _MISSING)
        name = f"{where}.{key}"
        if value is _MISSING:
            if required is not None:
                self.problem(name, f"required key is missing; {required}")
                return _BAD
            return self.default(where, key, default)
        if choices is not None:
            if not isinstance(value, str) or value not in choices:
                options = " or ".join(json.dumps(choice) for choice in choices)
                self.problem(name, f"expected {options}, got {_show(value)}")
                return _BAD
            return value
        if not isinstance(value, str) or not value.strip():
            self.problem(name, f"expected a non-empty string, got {_show(value)}")
            return _BAD
        return value

    def boolean(
        self, table: Mapping[str, Any], where: str, key: str, default: Any = _SCHEMA
    ) -> Any:
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return self.default(where, key, default)
        if not isinstance(value, bool):
            self.problem(f"{where}.{key}", f"expected true or false, got {_show(value)}")
            return _BAD
        return value

    def positive_int(
        self, table: Mapping[str, Any], where: str, key: str, default: Any = _SCHEMA
    ) -> Any:
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return self.default(where, key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.problem(f"{where}.{key}", f"expected a positive integer, got {_show(value)}")
            return _BAD
        return value

    def duration(
        self,
        table: Mapping[str, Any],
        where: str,
        key: str,
        default: Any = _SCHEMA,
        *,
        zero: str = "allowed",
    ) -> Any:
        """Read a duration.

        ``zero`` is ``"allowed"``, ``"forbidden"`` (the value must be
        positive) or ``"none"`` (0 means "off" and becomes ``None``).
        """
        value = table.get(key, _MISSING)
        name = f"{where}.{key}"
        if value is _MISSING:
            return self.default(where, key, default)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.problem(name, f"{_DURATION_FORMS}, got {_show(value)}")
            return _BAD
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.problem(name, f"{_DURATION_FORMS}, got {_show(value)}")
            return _BAD
        if seconds == 0:
            if zero == "none":
                return None
            if zero == "forbidden":
                self.problem(name, f"{_DURATION_FORMS} and greater than 0, got {_show(value)}")
                return _BAD
        return seconds

    # -- paths and programs ---------------------------------------------------

    def path(
        self,
        table: Mapping[str, Any],
        where: str,
        key: str,
        default: Any = _SCHEMA,
        *,
        required: str | None = None,
        readable: bool = False,
    ) -> Any:
        """Read a path, resolve it against the config folder, maybe open it."""
        value = table.get(key, _MISSING)
        name = f"{where}.{key}"
        if value is _MISSING:
            if required is not None:
                self.problem(name, f"required key is missing; {required}")
                return _BAD
            return self.default(where, key, default)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            self.problem(name, f"expected a file path, got {_show(value)}")
            return _BAD
        path = self.resolve(value)
        if readable:
            self.check_readable(name, path)
        return path

    def resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def check_readable(self, name: str, path: Path) -> None:
        # O_NONBLOCK so a FIFO at that path cannot hang start-up.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            self.problem(name, f"cannot read {path}: {exc.strerror or exc}")
            return
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if stat.S_ISDIR(mode):
            self.problem(name, f"cannot read {path}: Is a directory")
        elif not stat.S_ISREG(mode):
            self.problem(name, f"cannot read {path}: not a regular file")

    def command(self, table: Mapping[str, Any], where: str, key: str, target_name: Any) -> Any:
        """Read a command list and check its program can be run.

        Returns the command as a tuple (a relative program path such as
        ``bin/gdbserver`` is resolved against the config folder), ``None``
        when absent, or ``_BAD``.
        """
        value = table.get(key, _MISSING)
        name = f"{where}.{key}"
        if value is _MISSING:
            return None
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(arg, str) for arg in value)
        ):
            self.problem(
                name,
                "expected a non-empty list of strings, the program first, like "
                f'["gdbserver", "--once", "127.0.0.1:{{port}}", "/path/prog"], got {_show(value)}',
            )
            return _BAD
        program = value[0]
        who = f"target {json.dumps(target_name)}" if isinstance(target_name, str) else "this target"
        if not program.strip():
            self.problem(name, f"{who}: the program (first item) is empty")
            return _BAD
        if os.path.isabs(program) or "/" in program or os.sep in program:
            path = self.resolve(program)
            if not path.exists():
                self.problem(name, f"{who}: program {path} does not exist")
                return _BAD
            if not path.is_file() or not os.access(path, os.X_OK):
                self.problem(name, f"{who}: program {path} is not an executable file")
                return _BAD
            return (str(path), *value[1:])
        if shutil.which(program) is None:
            self.problem(
                name,
                f"{who}: program {json.dumps(program)} was not found on PATH; "
                "install it or give its absolute path",
            )
            return _BAD
        return tuple(value)

    # -- addresses ------------------------------------------------------------

    def address(self, value: Any, name: str) -> Any:
        try:
            return parse_listen_address(value)
        except ValueError as exc:
            if not isinstance(value, str):
                self.problem(
                    name, f'expected "host:port" like "127.0.0.1:7443", got {_show(value)}'
                )
            else:
                self.problem(name, str(exc))
            return _BAD

    # -- sections -------------------------------------------------------------

    def relay(self, data: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "relay")
        if table is None:
            return {}
        w = "relay"
        out: dict[str, Any] = {}
        listen = table.get("listen", _MISSING)
        if listen is _MISSING:
            out["listen"] = self.default(w, "listen", _SCHEMA)
        elif not isinstance(listen, list | tuple) or not listen:
            self.problem(
                "relay.listen",
                'expected a non-empty list of "host:port" strings like ["127.0.0.1:7443"], '
                f"got {_show(listen)}",
            )
        else:
            addresses: list[Address] = []
            for index, item in enumerate(listen):
                address = self.address(item, f"relay.listen[{index}]")
                if address is _BAD:
                    continue
                if address in addresses:
                    self.problem(
                        f"relay.listen[{index}]",
                        f"{json.dumps(item)} is listed twice "
                        f"(also relay.listen[{addresses.index(address)}])",
                    )
                addresses.append(address)
            out["listen"] = tuple(addresses)
        state_dir = self.path(table, w, "state_dir", self.base_dir / "state")
        out["state_dir"] = state_dir
        audit_dir = self.path(table, w, "audit_dir", _MISSING)
        if audit_dir is _MISSING:
            audit_dir = _BAD if state_dir is _BAD else state_dir / "audit"
        out["audit_dir"] = audit_dir
        out["handshake_timeout"] = self.duration(table, w, "handshake_timeout", zero="forbidden")
        out["close_timeout"] = self.duration(table, w, "close_timeout")
        out["shutdown_grace"] = self.duration(table, w, "shutdown_grace")
        out["max_sessions"] = self.positive_int(table, w, "max_sessions")
        out["revocation_interval"] = self.duration(
            table, w, "revocation_interval", zero="forbidden"
        )
        out["checkpoint_interval"] = self.duration(
            table, w, "checkpoint_interval", zero="forbidden"
        )
        out["audit_fsync_interval"] = self.duration(table, w, "audit_fsync_interval")
        out["data_plane"] = self.string(table, w, "data_plane", choices=DATA_PLANES)
        out["user"] = self.account(table, w, "user")
        out["run_as"] = self.account(table, w, "run_as")
        for key in ("final_write_timeout", "session_end_timeout", "server_stop_timeout"):
            out[key] = self.duration(table, w, key, zero="forbidden")
        out["proxy_protocol"] = self.boolean(table, w, "proxy_protocol")
        out["proxy_trusted"] = self.networks(table, w, "proxy_trusted")
        if out["proxy_protocol"] is True and out["proxy_trusted"] == ():
            self.problem(
                "relay.proxy_trusted",
                "relay.proxy_protocol = true needs the load balancers' networks here, "
                'like proxy_trusted = ["10.0.0.0/8"]; a PROXY header from anyone else '
                "would let them pick their own address",
            )
        return out

    def networks(self, table: Mapping[str, Any], where: str, key: str) -> Any:
        """Read a list of CIDR networks (a bare address is a /32 or /128)."""
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return ()
        name = f"{where}.{key}"
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            self.problem(
                name,
                f'expected a list of networks like ["10.0.0.0/8", "fd00::/8"], got {_show(value)}',
            )
            return _BAD
        networks = []
        for index, text in enumerate(value):
            try:
                networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                self.problem(
                    f"{name}[{index}]",
                    f'expected a network like "10.0.0.0/8" or "fd00::/8", got {_show(text)} ({exc})',
                )
                return _BAD
        return tuple(networks)

    def rate(self, table: Mapping[str, Any], where: str, key: str, default: Any = _SCHEMA) -> Any:
        """Read a positive number of events per second."""
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return self.default(where, key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value < float("inf")
        ):
            self.problem(
                f"{where}.{key}", f"expected a positive number per second, got {_show(value)}"
            )
            return _BAD
        return float(value)

    def limits(self, data: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "limits")
        if table is None:
            return {}
        w = "limits"
        out: dict[str, Any] = {}
        for key in (
            "max_unauthenticated",
            "max_unauthenticated_per_source",
            "handshake_burst",
            "auth_failure_burst",
            "max_sources",
            "max_sessions_per_user",
            "max_handshakes",
        ):
            out[key] = self.positive_int(table, w, key)
        for key in ("handshake_rate", "auth_failure_rate"):
            out[key] = self.rate(table, w, key)
        total, sources = out["max_unauthenticated"], out["max_sources"]
        if _BAD not in (total, sources) and sources <= total:
            self.problem(
                "limits.max_sources",
                f"must be larger than limits.max_unauthenticated ({total}), got {sources}; "
                "every source holding a connection needs a place in the table",
            )
        return out

    def tls(self, data: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "tls")
        if table is None:
            return {}
        w = "tls"
        out: dict[str, Any] = {
            "cert": self.path(
                table,
                w,
                "cert",
                None,
                required='the PEM certificate chain the relay presents, like cert = "server.pem"',
                readable=True,
            ),
            "key": self.path(
                table,
                w,
                "key",
                None,
                required='the PEM private key of tls.cert, like key = "server.key"',
                readable=True,
            ),
            "min_version": self.string(table, w, "min_version", choices=("1.2", "1.3")),
            "engine": self.string(table, w, "engine", choices=("stdlib", "pyopenssl")),
            "client_ca": self.path(table, w, "client_ca", readable=True),
            "require_client_cert": self.boolean(table, w, "require_client_cert"),
            "require_pq": self.boolean(table, w, "require_pq"),
            "ocsp_response": self.path(table, w, "ocsp_response", readable=True),
            "ticket_key_interval": self.duration(table, w, "ticket_key_interval"),
        }
        if out["require_client_cert"] is True and out["client_ca"] is None:
            self.problem(
                "tls.require_client_cert",
                "needs tls.client_ca, the CA bundle client certificates are verified against",
            )
        if out["engine"] == "stdlib":
            if out["require_pq"] is True:
                self.problem(
                    "tls.require_pq",
                    'needs tls.engine = "pyopenssl"; the stdlib engine cannot limit key '
                    "exchange to post-quantum groups",
                )
            if out["ocsp_response"] not in (None, _BAD):
                self.problem(
                    "tls.ocsp_response",
                    'needs tls.engine = "pyopenssl"; the stdlib engine cannot staple OCSP responses',
                )
        return out

    def auth(self, data: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "auth")
        if table is None:
            return {}
        w = "auth"
        return {
            "issuer": self.string(table, w, "issuer"),
            "audience": self.string(table, w, "audience"),
            "jwks": self.path(
                table,
                w,
                "jwks",
                None,
                required='the JSON Web Key Set tokens are verified with, like jwks = "jwks.json"',
                readable=True,
            ),
            "leeway": self.duration(table, w, "leeway"),
            "audit_key": self.path(table, w, "audit_key", readable=True),
        }

    def names(self, value: Any, name: str, example: str) -> Any:
        """A list of non-empty strings, as a tuple, or ``_BAD``."""
        if not isinstance(value, list | tuple) or not all(
            isinstance(item, str) and item.strip() for item in value
        ):
            self.problem(name, f"expected a list of names like {example}, got {_show(value)}")
            return _BAD
        return tuple(value)

    def identity(self, data: Mapping[str, Any], tls: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "identity")
        if table is None:
            return {}
        out: dict[str, Any] = {}
        issuers = table.get("oidc", [])
        if not isinstance(issuers, list | tuple) or not all(
            isinstance(item, Mapping) for item in issuers
        ):
            self.problem("identity.oidc", "expected [[identity.oidc]] tables (an array of tables)")
            issuers = []
        parsed = []
        seen: dict[str, int] = {}
        for index, item in enumerate(issuers):
            entry = self.oidc_issuer(item, f"identity.oidc[{index}]")
            issuer = entry.get("issuer")
            if isinstance(issuer, str):
                if issuer in seen:
                    self.problem(
                        f"identity.oidc[{index}].issuer",
                        f"issuer {json.dumps(issuer)} is listed twice (also identity.oidc"
                        f"[{seen[issuer]}])",
                    )
                seen[issuer] = index
            parsed.append(entry)
        out["oidc"] = parsed
        mapping = table.get("group_targets", {})
        pairs: list[tuple[str, tuple[str, ...]]] = []
        if not isinstance(mapping, Mapping):
            self.problem(
                "identity.group_targets",
                'expected a table of group = ["target glob", ...], like '
                '[identity.group_targets] "firmware" = ["build*"]',
            )
        else:
            for group, globs in mapping.items():
                value = self.names(globs, f"identity.group_targets.{group}", '["build*", "lab1"]')
                if value is not _BAD:
                    pairs.append((str(group), value))
        out["group_targets"] = tuple(pairs)
        admin = table.get("admin_groups", _MISSING)
        out["admin_groups"] = (
            () if admin is _MISSING else self.names(admin, "identity.admin_groups", '["ops"]')
        )
        return out

    def oidc_issuer(self, table: Mapping[str, Any], w: str) -> dict[str, Any]:
        self.unknown_keys(table, w, _OIDC_KEYS)
        out: dict[str, Any] = {}
        issuer = self.string(
            table,
            w,
            "issuer",
            None,
            required='the IdP\'s issuer URL, like issuer = "https://idp.example.com/realms/dev"',
        )
        if issuer is not _BAD and (
            not issuer.startswith("https://") or len(issuer) <= len("https://") or " " in issuer
        ):
            self.problem(
                f"{w}.issuer",
                f"expected an https:// URL (keys are fetched over HTTPS only), got {_show(issuer)}",
            )
            issuer = _BAD
        out["issuer"] = issuer
        audience = table.get("audience", _MISSING)
        if audience is _MISSING:
            self.problem(
                f"{w}.audience",
                "required key is missing; the client ID or API the tokens are issued for, "
                'like audience = "dbgrelay"',
            )
            out["audience"] = _BAD
        elif isinstance(audience, str) and audience.strip():
            out["audience"] = (audience,)
        else:
            out["audience"] = self.names(audience, f"{w}.audience", '["dbgrelay"]')
            if out["audience"] == ():
                self.problem(f"{w}.audience", "name at least one audience")
                out["audience"] = _BAD
        algorithms = table.get("algorithms", _MISSING)
        if algorithms is _MISSING:
            out["algorithms"] = self.default(w, "algorithms", _SCHEMA)
        elif (
            not isinstance(algorithms, list | tuple)
            or not algorithms
            or not all(a in ("RS256", "ES256", "EdDSA") for a in algorithms)
        ):
            self.problem(
                f"{w}.algorithms",
                'expected a list of "RS256", "ES256" or "EdDSA" (never "none" or HMAC), '
                f"got {_show(algorithms)}",
            )
            out["algorithms"] = _BAD
        else:
            out["algorithms"] = tuple(dict.fromkeys(algorithms))
        out["ca"] = self.path(table, w, "ca", readable=True)
        out["user_claim"] = self.string(
            table, w, "user_claim", choices=("sub", "email", "preferred_username", "upn")
        )
        out["groups_claim"] = self.string(table, w, "groups_claim")
        out["refresh_interval"] = self.duration(table, w, "refresh_interval", zero="forbidden")
        out["unknown_kid_cooldown"] = self.duration(
            table, w, "unknown_kid_cooldown", zero="forbidden"
        )
        out["max_staleness"] = self.duration(table, w, "max_staleness", zero="forbidden")
        out["fetch_timeout"] = self.duration(table, w, "fetch_timeout", zero="forbidden")
        return out

    def metrics(self, data: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "metrics")
        if table is None:
            return {}
        value = table.get("listen", _MISSING)
        out: dict[str, Any] = {}
        if value is _MISSING:
            out["listen"] = self.default("metrics", "listen", _SCHEMA)
        elif value == "":
            out["listen"] = None
        else:
            out["listen"] = self.address(value, "metrics.listen")
        w = "metrics"
        out["bearer_token_file"] = self.path(table, w, "bearer_token_file", readable=True)
        tls_keys = ("tls_cert", "tls_key", "client_ca")
        for key in tls_keys:
            out[key] = self.path(table, w, key, readable=True)
        given = [key for key in tls_keys if key in table]
        if given and len(given) != len(tls_keys):
            missing = ", ".join(f"metrics.{key}" for key in tls_keys if key not in table)
            self.problem(
                f"metrics.{given[0]}",
                f"HTTPS for /metrics needs tls_cert, tls_key and client_ca together "
                f"(scrapers must present a client certificate); add {missing}",
            )
        return out

    def restrictions(self, table: Mapping[str, Any], where: str, launch: Any) -> Any:
        """``debugger_restrictions``: only for a ``launch`` debugger that offers them."""
        value = self.boolean(table, where, "debugger_restrictions")
        if value is not True or launch is _BAD:
            return value
        if launch is None:
            self.problem(
                f"{where}.debugger_restrictions",
                "only applies to targets with launch (the relay adds the options to that command)",
            )
            return _BAD
        name = debugger_name(launch[0])
        if name not in DEBUGGER_RESTRICTIONS:
            self.problem(
                f"{where}.debugger_restrictions",
                f"{launch[0]} offers no -noshell or -secure option (only "
                f"{', '.join(sorted(DEBUGGER_RESTRICTIONS))} do; dbgsrv and kdsrv take neither); "
                "remove the key or launch one of those",
            )
            return _BAD
        return value

    def account(
        self, table: Mapping[str, Any], where: str, key: str, default: Any = _SCHEMA
    ) -> Any:
        """An account or group name (checked for form only: it may not exist here yet)."""
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return self.default(where, key, default)
        if not isinstance(value, str) or not _ACCOUNT.fullmatch(value):
            self.problem(
                f"{where}.{key}",
                f'expected an account name like "dbgrelay-target", got {_show(value)}',
            )
            return _BAD
        return value

    def accounts(self, table: Mapping[str, Any], where: str, key: str) -> Any:
        value = table.get(key, _MISSING)
        if value is _MISSING:
            return ()
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and _ACCOUNT.fullmatch(v) for v in value
        ):
            self.problem(
                f"{where}.{key}",
                f'expected a list of names like ["alice", "ops"], got {_show(value)}',
            )
            return _BAD
        return tuple(value)

    def admin(self, data: Mapping[str, Any], state_dir: Any) -> dict[str, Any]:
        table = self.table(data, "admin")
        if table is None:
            return {}
        names = {"users": self.accounts(table, "admin", "users")}
        names["groups"] = self.accounts(table, "admin", "groups")
        return names | self._admin_listen(table, state_dir)

    def _admin_listen(self, table: Mapping[str, Any], state_dir: Any) -> dict[str, Any]:
        value = table.get("listen", _MISSING)
        if value is _MISSING:
            if sys.platform == "win32":  # no Unix sockets to rely on: a pipe with a DACL
                return {"listen": PipeAddress(DEFAULT_ADMIN_PIPE)}
            return {"listen": _BAD if state_dir is _BAD else state_dir / "admin.sock"}
        forms = 'expected "unix:PATH" or a loopback "host:port" like "127.0.0.1:9465"'
        if not isinstance(value, str) or not value:
            self.problem("admin.listen", f"{forms}, got {_show(value)}")
            return {}
        if value.startswith("npipe:"):
            name = value[len("npipe:") :]
            if not name or len(name) > 256 or any(c in name for c in "\\/\0"):
                self.problem(
                    "admin.listen", f'expected "npipe:NAME" with one pipe name, got {_show(value)}'
                )
                return {}
            if sys.platform != "win32":
                self.problem("admin.listen", 'named pipes exist only on Windows; use "unix:PATH"')
                return {}
            return {"listen": PipeAddress(name)}
        if value.startswith("unix:"):
            rest = value[len("unix:") :]
            if rest.startswith("///"):
                rest = rest[2:]
            if not rest or "\0" in rest:
                self.problem("admin.listen", f"{forms}, got {_show(value)}")
                return {}
            return {"listen": self.resolve(rest)}
        address = self.address(value, "admin.listen")
        if address is _BAD:
            return {}
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host.lower().rstrip(".") in _LOOPBACK_NAMES
        if not loopback:
            self.problem(
                "admin.listen",
                "the admin endpoint must listen on a loopback address like "
                f'"127.0.0.1:9465" or "[::1]:9465", or on "unix:PATH", got {_show(value)}',
            )
            return {}
        return {"listen": address}

    def state(self, data: Mapping[str, Any]) -> dict[str, Any]:
        table = self.table(data, "state")
        if table is None:
            return {}
        w = "state"
        backend = self.string(table, w, "backend", choices=("sqlite", "postgres"))
        required = None
        if backend == "postgres":
            required = (
                'backend = "postgres" needs the file holding the libpq connection string, '
                'like dsn_file = "/run/secrets/dbgrelay-dsn"'
            )
        return {
            "backend": backend,
            "dsn_file": self.path(table, w, "dsn_file", required=required, readable=True),
            "pool_size": self.positive_int(table, w, "pool_size"),
            "connect_timeout": self.duration(table, w, "connect_timeout", zero="forbidden"),
            "statement_timeout": self.duration(table, w, "statement_timeout", zero="forbidden"),
            "resync_interval": self.duration(table, w, "resync_interval", zero="forbidden"),
            "unavailable_grace": self.duration(table, w, "unavailable_grace"),
            "session_lease": self.duration(table, w, "session_lease", zero="forbidden"),
        }

    def targets(self, data: Mapping[str, Any], tls: Mapping[str, Any]) -> list[dict[str, Any]]:
        value = data.get("targets", _MISSING)
        if value is _MISSING:
            return []
        if isinstance(value, Mapping):
            self.problem(
                "targets",
                "expected [[targets]] tables (an array of tables), got a single [targets] "
                "table; write [[targets]]",
            )
            return []
        if not isinstance(value, list | tuple):
            self.problem("targets", f"expected [[targets]] tables, got {_show(value)}")
            return []
        targets: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for index, table in enumerate(value):
            where = f"targets[{index}]"
            if not isinstance(table, Mapping):
                self.problem(where, f"expected a [[targets]] table, got {_show(table)}")
                continue
            target = self.target(table, where, tls)
            name = target.get("name")
            if isinstance(name, str):
                if name in seen:
                    self.problem(
                        f"{where}.name",
                        f"duplicate target name {json.dumps(name)} (also targets[{seen[name]}])",
                    )
                else:
                    seen[name] = index
            targets.append(target)
        return targets

    def target(
        self, table: Mapping[str, Any], where: str, tls: Mapping[str, Any]
    ) -> dict[str, Any]:
        self.unknown_keys(table, where, _KEYS["targets"])
        w = where
        out: dict[str, Any] = {}

        name = self.string(
            table, w, "name", None, required='a unique target name, like name = "build42"'
        )
        if name is not _BAD and not _TARGET_NAME.fullmatch(name):
            self.problem(
                f"{w}.name",
                "expected 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
                f"digit, got {_show(name)}",
            )
            name = _BAD
        out["name"] = name
        kind = self.string(
            table,
            w,
            "kind",
            None,
            choices=TARGET_KINDS,
            required=f"one of {', '.join(TARGET_KINDS)}",
        )
        out["kind"] = kind

        allow = table.get("allow_users", _MISSING)
        allow_key = "allow_users"
        if "allow" in table:
            allow_key = "allow"
            # The older spelling: a list of user names, like allow_users.
            if allow is not _MISSING:
                self.problem(
                    f"{w}.allow",
                    "allow and allow_users are the same list; keep only allow_users",
                )
            allow = table["allow"]
        if allow is _MISSING:
            out["allow"] = None
        elif not isinstance(allow, list | tuple) or not all(
            isinstance(user, str) and user.strip() for user in allow
        ):
            self.problem(
                f"{w}.{allow_key}",
                f'expected a list of user names like ["alice", "bob"], got {_show(allow)}',
            )
            out["allow"] = _BAD
        else:
            out["allow"] = tuple(allow)
        groups = table.get("allow_groups", _MISSING)
        out["allow_groups"] = (
            None
            if groups is _MISSING
            else self.names(groups, f"{w}.allow_groups", '["firmware", "debug-admins"]')
        )
        out["cert_user"] = self.string(table, w, "cert_user", choices=CERT_USER_RULES)
        if out["cert_user"] not in (None, _BAD) and tls.get("client_ca") is None:
            self.problem(
                f"{w}.cert_user",
                "needs tls.client_ca: without client certificates there is nothing to tie "
                "to the user",
            )

        out["connect_timeout"] = self.duration(table, w, "connect_timeout", zero="forbidden")
        out["idle_timeout"] = self.duration(table, w, "idle_timeout", zero="forbidden")
        out["max_session"] = self.duration(table, w, "max_session", zero="none")
        out["end_on_token_expiry"] = self.boolean(table, w, "end_on_token_expiry")
        launch = self.command(table, w, "launch", name)
        if launch not in (None, _BAD) and not any(PORT_PLACEHOLDER in arg for arg in launch):
            self.problem(
                f"{w}.launch",
                "must contain {port} where the server's listen port goes, like "
                '["gdbserver", "--once", "127.0.0.1:{port}", "/path/prog"]',
            )
            launch = _BAD
        out["launch"] = launch
        out["launch_timeout"] = self.duration(table, w, "launch_timeout", zero="forbidden")
        out["kill_grace"] = self.duration(table, w, "kill_grace")
        out["on_idle"] = self.command(table, w, "on_idle", name)
        out["on_idle_timeout"] = self.duration(table, w, "on_idle_timeout", zero="forbidden")
        out["probe_interval"] = self.duration(table, w, "probe_interval", zero="none")
        out["record"] = self.boolean(table, w, "record")
        out["record_max_bytes"] = self.positive_int(table, w, "record_max_bytes")
        kd_transport = self.string(table, w, "kd_transport")
        if kd_transport not in (None, _BAD) and kind not in ("kdsrv", _BAD):
            self.problem(
                f"{w}.kd_transport",
                f'only valid for kind = "kdsrv" targets; this target is kind = {_show(kind)}',
            )
            kd_transport = _BAD
        out["kd_transport"] = kd_transport
        require_pq = self.boolean(table, w, "require_pq")
        if require_pq is True and tls.get("engine") == "stdlib":
            self.problem(
                f"{w}.require_pq",
                'needs tls.engine = "pyopenssl"; the stdlib engine cannot limit key '
                "exchange to post-quantum groups",
            )
            require_pq = _BAD
        out["require_pq"] = require_pq
        out["run_as"] = self.account(table, w, "run_as")
        out["debugger_restrictions"] = self.restrictions(table, w, launch)

        out["backend_url"], out["backend"] = self.backend(table, w, launch)

        # {port} is filled in only for managed targets.
        has_launch = launch is not None
        if not has_launch:
            for key in ("on_idle", "kd_transport"):
                item = table.get(key)
                items = item if isinstance(item, list | tuple) else [item]
                if any(isinstance(x, str) and PORT_PLACEHOLDER in x for x in items):
                    self.problem(
                        f"{w}.{key}",
                        "{port} is only filled in for targets with launch; "
                        "write the real port number",
                    )
                    out[key] = _BAD
        return out

    def backend(self, table: Mapping[str, Any], w: str, launch: Any) -> tuple[Any, Any]:
        name = f"{w}.backend"
        value = table.get("backend", _MISSING)
        if value is _MISSING:
            self.problem(
                name,
                "required key is missing; where the debug server listens, like "
                'backend = "tcp://10.0.5.42:5005"',
            )
            return _BAD, _BAD
        if not isinstance(value, str):
            self.problem(name, f"expected a string URL ({BACKEND_FORMS}), got {_show(value)}")
            return _BAD, _BAD
        try:
            backend = parse_backend_url(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return value, _BAD
        if isinstance(backend, NpipeBackend) and sys.platform != "win32":
            self.problem(
                name, "npipe:// backends need the relay to run on Windows; use tcp:// or unix://"
            )
            return value, _BAD
        if launch is None:
            if isinstance(backend, NpipeBackend) and backend.names_process:
                self.problem(
                    name,
                    f"the pipe name in {_show(value)} has %d or %x, which the debug server "
                    "replaces with its process id when it starts; write the name it "
                    "actually uses (cdb's .servers command shows it)",
                )
                return value, _BAD
            if PORT_PLACEHOLDER in value:
                self.problem(
                    name,
                    f"{{port}} is only allowed on targets with launch; write the real port, "
                    f"got {_show(value)}",
                )
                return value, _BAD
            return value, backend
        # A managed server is started by the relay on a port it picks, so the
        # backend must point at that port on this machine.
        managed_ok = (
            isinstance(backend, TcpBackend)
            and backend.port is None
            and backend.host.lower() in ("127.0.0.1", "localhost", "::1")
        )
        if not managed_ok:
            self.problem(
                name,
                'a target with launch must use backend = "tcp://127.0.0.1:{port}" '
                f"(or localhost / [::1]) so the relay can pick the port, got {_show(value)}",
            )
            return value, _BAD
        return value, backend

    # -- cross-section checks ---------------------------------------------

    def check_address_clashes(
        self, relay: Mapping[str, Any], metrics: Mapping[str, Any], admin: Mapping[str, Any]
    ) -> None:
        """Metrics and admin must not bind a port the tunnel listener binds."""
        taken: list[tuple[Address, str]] = [
            (address, f"relay.listen[{index}]")
            for index, address in enumerate(relay.get("listen") or ())
        ]
        for key, section in (("metrics.listen", metrics), ("admin.listen", admin)):
            address = section.get("listen")
            if not isinstance(address, tuple) or address[1] == 0:
                continue
            for other, other_key in taken:
                if same_socket(address, other):
                    self.problem(
                        key,
                        f"{format_address(address)} clashes with {other_key} "
                        f"({format_address(other)}); give each endpoint its own port",
                    )
                    break
            taken.append((address, key))

    # -- everything -------------------------------------------------------------

    def config(self, data: Any, source: Path | None) -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{self.source_name}: expected a table of sections at the top level, "
                f"got {_show(data)}"
            )
        for key, value in data.items():
            if key in _TABLES:
                continue
            kind = "table" if isinstance(value, Mapping) else "key"
            self.problem(str(key), f"unknown {kind}; known tables: {', '.join(_TABLES)}")
        relay = self.relay(data)
        tls = self.tls(data)
        auth = self.auth(data)
        identity = self.identity(data, tls)
        metrics = self.metrics(data)
        admin = self.admin(data, relay.get("state_dir", _BAD))
        limits = self.limits(data)
        state = self.state(data)
        targets = self.targets(data, tls)
        self.check_address_clashes(relay, metrics, admin)
        if self.problems:
            raise ConfigError(self.problems)
        return Config(
            relay=_build(RelaySection, relay),
            tls=_build(TLSSection, tls),
            auth=_build(AuthSection, auth),
            metrics=_build(MetricsSection, metrics),
            admin=_build(AdminSection, admin),
            identity=IdentitySection(
                oidc=tuple(_build(OidcIssuerConfig, item) for item in identity.get("oidc", ())),
                group_targets=identity.get("group_targets", ()),
                admin_groups=identity.get("admin_groups", ()),
            ),
            limits=_build(LimitsSection, limits),
            state=_build(StateSection, state),
            targets=tuple(_build(TargetConfig, target) for target in targets),
            source=source,
        )


def _build(cls: type[_T], values: Mapping[str, Any]) -> _T:
    """``cls(**values)``, insisting that the validator produced every field.

    The keys a table accepts come from the schema, so a field added there
    but never read here would be accepted in the file and silently ignored;
    this turns that mistake into a failure of every config load.
    """
    unread = [item.name for item in dataclasses.fields(cls) if item.name not in values]
    if unread:
        raise RuntimeError(f"config.load never reads {cls.__name__} field(s) {', '.join(unread)}")
    return cls(**values)


# --------------------------------------------------------------------------
# Entry points


def config_from_dict(
    data: Mapping[str, Any], *, base_dir: Path, source_name: str = "<config>"
) -> Config:
    """Validate an already-parsed config table and build the model.

    This is :func:`load_config` without the file: the relay's demo mode and
    tests build configs this way.  Besides TOML types, path keys also take
    :class:`os.PathLike` values and lists may be tuples.

    Args:
        data: The top-level table, as :func:`tomllib.loads` returns it.
        base_dir: Folder relative paths are resolved against.
        source_name: Prefix of every problem line (normally the file name).

    Returns:
        The validated :class:`Config`, with ``source=None``.

    Raises:
        ConfigError: listing every problem found.
    """
    base = Path(os.path.abspath(base_dir))
    return _Validator(source_name, base).config(data, None)


def load_config(path: Path | str) -> Config:
    """Read, validate and build the configuration from a TOML file.

    Relative paths inside the file are resolved against the file's folder.
    Problem lines start with ``path`` as given.

    Args:
        path: The TOML file.

    Returns:
        The validated :class:`Config`, with ``source`` set to the file's
        absolute path.

    Raises:
        ConfigError: the file cannot be read, is not valid UTF-8 or TOML (one
            problem, with tomllib's line and column), or fails validation
            (every problem found).
    """
    source_name = os.fspath(path)
    source = Path(os.path.abspath(path))
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{source_name}: cannot read the config file {source}: {exc.strerror or exc}"
        ) from exc
    try:
        # utf-8-sig: Windows editors like to start files with a byte-order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source_name}: the config file is not valid UTF-8 (bad byte at offset {exc.start})"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source_name}: invalid TOML: {exc}") from exc
    return _Validator(source_name, source.parent).config(data, source)
