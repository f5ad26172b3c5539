"""The configuration model: frozen, slotted dataclasses.

Everything here is already validated by :mod:`config.load`; the relay reads
these objects and never the TOML.  Durations are float seconds, sizes are int
bytes, paths are absolute :class:`~pathlib.Path` objects (relative paths in
the file are resolved against the config file's folder), and listen addresses
are ``(host, port)`` tuples with IPv6 hosts written without brackets.

Defaults below are those of the loader.  The model's own defaults match them,
except that paths derived from ``state_dir`` can only be filled in by the
loader, which knows the config file's folder.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "TARGET_KINDS",
    "TargetKind",
    "DATA_PLANES",
    "Address",
    "TcpBackend",
    "UnixBackend",
    "NpipeBackend",
    "PipeAddress",
    "Backend",
    "RelaySection",
    "TLSSection",
    "AuthSection",
    "OidcIssuerConfig",
    "IdentitySection",
    "CERT_USER_RULES",
    "MetricsSection",
    "AdminSection",
    "LimitsSection",
    "TargetConfig",
    "Config",
    "format_address",
    "DEBUGGER_RESTRICTIONS",
    "debugger_name",
    "FILE_KEYS",
    "file_keys",
    "file_defaults",
    "file_tables",
]

#: What sort of debug server a target is.  ``dbgsrv``/``kdsrv``/``server`` are
#: WinDbg's process server, kernel server and ``cdb -server``; ``tcp`` is any
#: other plaintext TCP protocol.
TARGET_KINDS: tuple[str, ...] = ("dbgsrv", "kdsrv", "server", "gdbserver", "tcp")
TargetKind = Literal["dbgsrv", "kdsrv", "server", "gdbserver", "tcp"]

#: Who may move an established tunnel's bytes (``relay.data_plane``,
#: ``dbgrelay connect --data-plane``; see :func:`relay.pump.driver_for`).
DATA_PLANES: tuple[str, ...] = ("auto", "trio", "thread")

#: A listen address: ``(host, port)``.  IPv6 hosts have no brackets.
Address = tuple[str, int]


def format_address(address: Address) -> str:
    """Write ``(host, port)`` as ``host:port``, bracketing IPv6 hosts.

    Args:
        address: A ``(host, port)`` pair as stored in the model.

    Returns:
        ``"127.0.0.1:7443"`` or ``"[::1]:7443"``.
    """
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


#: Field metadata key: the keys a field is written as in the file, when they
#: are not exactly the field's name.  ``()`` marks a field the file never
#: sets (the loader fills it in).
FILE_KEYS = "file_keys"


def file_keys(cls: type) -> tuple[str, ...]:
    """The keys a section's table accepts, in field order (the documented order).

    Args:
        cls: A section dataclass such as :class:`RelaySection`.

    Returns:
        Each field's name, or the names in its :data:`FILE_KEYS` metadata.
    """
    keys: list[str] = []
    for item in dataclasses.fields(cls):
        keys.extend(item.metadata.get(FILE_KEYS, (item.name,)))
    return tuple(keys)


def file_defaults(cls: type) -> dict[str, object]:
    """The default of every key of a section that has one, by file key.

    Args:
        cls: A section dataclass such as :class:`RelaySection`.

    Returns:
        ``{key: default}`` for the fields with a default or default factory;
        required fields are left out.
    """
    defaults: dict[str, object] = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            value = item.default
        elif item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
        else:
            continue
        for key in item.metadata.get(FILE_KEYS, (item.name,)):
            defaults[key] = value
    return defaults


def file_tables() -> dict[str, type]:
    """The top-level tables of the file and the dataclass of each, in field order.

    ``targets`` maps to :class:`TargetConfig`, the class of one
    ``[[targets]]`` entry.
    """
    hints = typing.get_type_hints(Config)
    tables: dict[str, type] = {}
    for item in dataclasses.fields(Config):
        if item.metadata.get(FILE_KEYS, (item.name,)) == ():
            continue
        hint = hints[item.name]
        if typing.get_origin(hint) is tuple:
            hint = typing.get_args(hint)[0]
        tables[item.name] = hint
    return tables


@dataclass(frozen=True, slots=True)
class TcpBackend:
    """A debug server reached over TCP: ``tcp://HOST:PORT``.

    Attributes:
        host: An IP literal (IPv6 without brackets) or a DNS name.
        port: 1-65535, or ``None`` for a managed target whose URL says
            ``{port}``: the relay picks a free port per launch and calls
            :meth:`with_port`.
    """

    host: str
    port: int | None

    def __post_init__(self) -> None:
        if self.port is not None and (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 1 <= self.port <= 65535
        ):
            raise ValueError(f"TcpBackend port must be 1-65535, got {self.port!r}")

    def with_port(self, port: int) -> TcpBackend:
        """Return a copy that connects to ``port``.

        Args:
            port: The port the launched server listens on, 1-65535.

        Raises:
            ValueError: ``port`` is out of range.
        """
        return dataclasses.replace(self, port=port)

    def __str__(self) -> str:
        port = "{port}" if self.port is None else str(self.port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"


@dataclass(frozen=True, slots=True)
class UnixBackend:
    """A debug server on a Unix domain socket: ``unix:///abs/path``.

    Attributes:
        path: Absolute path of the socket.
    """

    path: Path

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True, slots=True)
class NpipeBackend:
    """A debug server on a Windows named pipe: ``npipe://HOST/PIPE``.

    Only usable when the relay itself runs on Windows.

    Attributes:
        host: ``"."`` for this machine, or a server name.
        pipe: The pipe name, without ``\\\\HOST\\pipe\\``.
    """

    host: str
    pipe: str

    @property
    def names_process(self) -> bool:
        """Whether :attr:`pipe` holds ``%d``/``%x``: the debug server's process id.

        WinDbg replaces them when the server starts (``cdb -server
        npipe:pipe=dbg%d``), so only a relay that starts the server knows
        the real name; see :meth:`for_process`.
        """
        return any(f in self.pipe.replace("%%", "") for f in ("%d", "%x"))

    def for_process(self, pid: int) -> NpipeBackend:
        """This backend with ``%d``/``%x`` replaced as WinDbg does for process ``pid``.

        ``%d`` becomes the decimal id, ``%x`` the lowercase hexadecimal one and
        ``%%`` a single ``%``.
        """
        parts = self.pipe.split("%%")
        parts = [p.replace("%d", str(pid)).replace("%x", f"{pid:x}") for p in parts]
        return NpipeBackend(host=self.host, pipe="%".join(parts))

    @property
    def path(self) -> str:
        """The Win32 path, ``\\\\HOST\\pipe\\PIPE``."""
        return f"\\\\{self.host}\\pipe\\{self.pipe}"

    def __str__(self) -> str:
        return f"npipe://{self.host}/{self.pipe}"


Backend = TcpBackend | UnixBackend | NpipeBackend


@dataclass(frozen=True, slots=True)
class PipeAddress:
    """A local Windows named pipe the relay listens on: ``npipe:NAME``.

    Attributes:
        name: The pipe name, without ``\\\\.\\pipe\\``.
    """

    name: str

    @property
    def path(self) -> str:
        """The Win32 path, ``\\\\.\\pipe\\NAME``."""
        return f"\\\\.\\pipe\\{self.name}"

    def __str__(self) -> str:
        return f"npipe:{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RelaySection:
    """``[relay]``: where the relay listens and its global limits.

    Attributes:
        listen: Addresses for developers' TLS tunnels.  Default
            ``[("127.0.0.1", 7443)]``: loopback only.  Port 0 binds any free
            port.
        state_dir: Folder for the relay's state (revocations, admin socket).
            Default ``state`` next to the config file.
        audit_dir: Folder for audit logs and recordings.  Default
            ``<state_dir>/audit``.
        handshake_timeout: Seconds for the TLS handshake plus the CONNECT
            request.  Default 10.
        close_timeout: Seconds the other side may still send after one side
            half-closes.  Default 5.
        shutdown_grace: Seconds live tunnels may continue after SIGTERM.
            Default 30.
        max_sessions: Live tunnels allowed at once; further tunnels get 503.
            Default 256.
        revocation_interval: Seconds between re-reads of the revocation
            store.  Default 2.
        checkpoint_interval: Seconds a record may stay unsigned: this often,
            every audit file with records after its last signature (live
            session files, the relay file) gets a signed checkpoint.  A crash
            leaves at most this window covered by the hash chain alone.
            Default 5.
        audit_fsync_interval: Audit records are fsync'd at least this often,
            in seconds; 0 means after every record.  Default 2.
        final_write_timeout: Seconds for each last step with a peer: sending
            a refusal or error line, closing a connection (TLS
            close_notify), closing a listener at shutdown.  Default 2.
        session_end_timeout: Seconds tunnels ended at shutdown (after
            ``shutdown_grace``) get to write their end records and close
            before they are cancelled; also the limit of each end record's
            fsync and of the relay audit file's last fsync, so a hung disk
            cannot hang a teardown.  Default 10.
        server_stop_timeout: Seconds launched debug servers get to exit at
            shutdown before the relay stops waiting for them.  Default 30.
        proxy_protocol: Every connection to ``listen`` starts with a PROXY
            protocol v2 header from a load balancer; limits and audit use
            the client address it carries.  Default false.
        proxy_trusted: Networks the PROXY header is accepted from; a
            connection from elsewhere is closed.  Required (non-empty) when
            ``proxy_protocol`` is true.  Default empty.
        user: The account ``dbgrelay serve`` drops to when started as root;
            a small privileged helper keeps root only to start managed
            servers.  ``None`` (default): no drop.
        run_as: The account managed servers (and everything they start)
            run as, unless a target says otherwise.  Never root nor the
            relay's own account, except the relay's own account named
            explicitly by a relay that is not root (development).
            Default ``"dbgrelay-target"``.
        data_plane: Who moves an established tunnel's bytes: ``"trio"``
            (the session's own task), ``"thread"`` (one data-plane thread
            per process, Linux; ``"trio"`` elsewhere and for recorded
            targets) or ``"auto"``: the thread where it can serve the run
            (``epoll``, and trio's own clock, which is the thread's), else
            ``"trio"``.  Default ``"auto"``.
    """

    listen: tuple[Address, ...] = (("127.0.0.1", 7443),)
    state_dir: Path = Path("state")
    audit_dir: Path = Path("state/audit")
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    shutdown_grace: float = 30.0
    max_sessions: int = 256
    revocation_interval: float = 2.0
    checkpoint_interval: float = 5.0
    audit_fsync_interval: float = 2.0
    final_write_timeout: float = 2.0
    session_end_timeout: float = 10.0
    server_stop_timeout: float = 30.0
    proxy_protocol: bool = False
    proxy_trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    user: str | None = None
    run_as: str = "dbgrelay-target"
    data_plane: str = "auto"  # one of DATA_PLANES


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSection:
    """``[limits]``: bounds on unauthenticated load and on each user.

    A *source* is an IPv4 address or an IPv6 /64 network (the client address
    from the PROXY header when ``relay.proxy_protocol`` is on).  Connections
    over a cap or rate are closed before the TLS handshake; requests over the
    failed-authentication rate get ``429`` with ``Retry-After``.

    Attributes:
        max_unauthenticated: Connections accepted and not yet through the
            token check, in total.  Default 256.
        max_unauthenticated_per_source: The same, per source.  Default 32.
        handshake_rate: New connections per second per source, sustained.
            Default 20.
        handshake_burst: New connections a source may open at once.
            Default 100.
        auth_failure_rate: Failed authentications per second per source,
            sustained.  Default 0.5.
        auth_failure_burst: Failed authentications a source may have
            before it is throttled.  Default 20.
        max_sources: Sources remembered at once (bounds memory; about 400
            bytes each).  Default 65536.
        max_sessions_per_user: Live tunnels one user (token ``sub``) may
            hold; more get 429.  Default 16.
        max_handshakes: TLS handshakes the relay runs at once; more
            connections wait for a slot, within their ``handshake_timeout``.
            Bounds the memory and CPU of a connection burst.  Default 64
            (above ``max_unauthenticated_per_source``, so one source cannot
            hold every slot).
    """

    max_unauthenticated: int = 256
    max_unauthenticated_per_source: int = 32
    handshake_rate: float = 20.0
    handshake_burst: int = 100
    auth_failure_rate: float = 0.5
    auth_failure_burst: int = 20
    max_sources: int = 65536
    max_sessions_per_user: int = 16
    max_handshakes: int = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSection:
    """``[tls]``: the relay's server certificate and TLS policy.

    Attributes:
        cert: PEM certificate chain.  Required.
        key: PEM private key.  Required.
        min_version: ``"1.2"`` (default) or ``"1.3"``.
        engine: ``"stdlib"`` (default) or ``"pyopenssl"``.
        client_ca: PEM bundle client certificates are verified against;
            ``None`` (default) asks for no client certificate.
        require_client_cert: Refuse clients without a valid certificate.
            Needs ``client_ca``.  Default false.
        require_pq: Accept only hybrid post-quantum key exchange.  Needs
            ``engine = "pyopenssl"``.  Default false.
        ocsp_response: DER OCSP response to staple; needs
            ``engine = "pyopenssl"``.  Default ``None``.
        ticket_key_interval: Seconds between new TLS 1.3 session-ticket
            keys; a ticket resumes a session only until the key that sealed
            it is replaced, so this also bounds how long a client may
            resume.  ``0`` issues no tickets (every tunnel a full
            handshake).  Default 3600.
    """

    cert: Path
    key: Path
    min_version: Literal["1.2", "1.3"] = "1.2"
    engine: Literal["stdlib", "pyopenssl"] = "stdlib"
    client_ca: Path | None = None
    require_client_cert: bool = False
    require_pq: bool = False
    ocsp_response: Path | None = None
    ticket_key_interval: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSection:
    """``[auth]``: how tunnel tokens are checked.

    Attributes:
        jwks: JSON Web Key Set with the Ed25519 keys tokens may be signed
            with.  Required.
        issuer: Expected ``iss`` claim.  Default ``"dbgrelay"``.
        audience: Expected ``aud`` claim.  Default ``"dbgrelay"``.
        leeway: Seconds of clock skew tolerated on ``exp``/``nbf``.
            Default 30.
        audit_key: Ed25519 private key that signs audit logs; ``None``
            (default) leaves them unsigned.
    """

    issuer: str = "dbgrelay"
    audience: str = "dbgrelay"
    jwks: Path
    leeway: float = 30.0
    audit_key: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcIssuerConfig:
    """``[[identity.oidc]]``: one OpenID Connect provider whose tokens are accepted.

    Attributes:
        issuer: The exact ``iss`` value, an ``https://`` URL; discovery is
            read from ``<issuer>/.well-known/openid-configuration``.  Required.
        audience: Accepted ``aud`` values (one or more; the file may give a
            string).  ``azp`` must be one of them when a token has several
            audiences.  Required.
        algorithms: Accepted signature algorithms, some of ``RS256``,
            ``ES256``, ``EdDSA``.  Default ``("RS256", "ES256")``.
        ca: PEM bundle the IdP's HTTPS certificate is checked against;
            ``None`` (default) uses the system store.
        user_claim: Claim naming the user: ``sub`` (default), ``email``,
            ``preferred_username`` or ``upn``.
        groups_claim: Claim listing the user's groups.  Default ``"groups"``.
        refresh_interval: Seconds between key set fetches.  Default 3600.
        unknown_kid_cooldown: Least seconds between fetches caused by tokens
            with an unknown ``kid``.  Default 300.
        max_staleness: Seconds the last good key set stays in use while
            fetches fail; after that the issuer's tokens are refused.
            Default 86400.
        fetch_timeout: Seconds one fetch (discovery plus key set) may take.
            Default 10.
    """

    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    ca: Path | None = None
    user_claim: str = "sub"
    groups_claim: str = "groups"
    refresh_interval: float = 3600.0
    unknown_kid_cooldown: float = 300.0
    max_staleness: float = 86400.0
    fetch_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentitySection:
    """``[identity]``: tokens from the company's identity provider, and groups.

    Attributes:
        oidc: The accepted OpenID Connect issuers, ``[[identity.oidc]]``.
            Default none: only tokens from ``dbgrelay token issue``.
        group_targets: ``[identity.group_targets]``: group name to target
            globs; a member reaches those targets without a ``targets`` claim.
            Default none.
        admin_groups: Members of these groups may use the admin API with
            their IdP token.  Default none.
    """

    oidc: tuple[OidcIssuerConfig, ...] = ()
    group_targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    admin_groups: tuple[str, ...] = ()

    def issuer(self, iss: str) -> OidcIssuerConfig | None:
        """The configured issuer whose ``issuer`` is exactly ``iss``, or ``None``."""
        for item in self.oidc:
            if item.issuer == iss:
                return item
        return None


#: How a target may tie the client certificate to the token's user: the
#: subject's common name, a subjectAltName (email, DNS, URI), or either.
CERT_USER_RULES: tuple[str, ...] = ("cn", "san", "cn_or_san")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSection:
    """``[metrics]``: the Prometheus endpoint.

    ``/metrics`` names every target, so it is on loopback by default; to
    serve it further, require credentials with either or both of the ways
    Prometheus authenticates a scrape.

    Attributes:
        listen: Address to serve ``/metrics`` on, or ``None`` when the file
            says ``listen = ""``.  Default ``("127.0.0.1", 9464)``.
        bearer_token_file: File holding the token a scrape must send as
            ``Authorization: Bearer <token>`` (Prometheus'
            ``authorization.credentials_file``); surrounding whitespace is
            ignored.  ``/healthz`` stays open.  Default ``None``: no token.
        tls_cert: PEM certificate chain; with ``tls_key`` and ``client_ca``
            the endpoint serves HTTPS and requires a client certificate
            signed by ``client_ca`` (Prometheus' ``tls_config``).  Default
            ``None``: plain HTTP.
        tls_key: PEM private key of ``tls_cert``.  Default ``None``.
        client_ca: PEM bundle that scrapers' client certificates are
            verified against.  Default ``None``.
    """

    listen: Address | None = ("127.0.0.1", 9464)
    bearer_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        """Whether the metrics endpoint runs at all."""
        return self.listen is not None

    @property
    def tls(self) -> bool:
        """Whether the endpoint serves HTTPS with client certificates."""
        return self.tls_cert is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSection:
    """``[admin]``: the local control endpoint.

    Attributes:
        listen: A :class:`~pathlib.Path` for a Unix socket (the file says
            ``"unix:PATH"``), a loopback ``(host, port)``, or on Windows a
            :class:`PipeAddress` (``"npipe:NAME"``).  Default
            ``<state_dir>/admin.sock``; on Windows ``npipe:dbgrelay-admin``
            (``\\\\.\\pipe\\dbgrelay-admin``).
        users: Accounts (names) admitted on the Unix socket besides root
            and the relay's own account (on the admin pipe: besides
            Administrators, LocalSystem and the relay's account).  Default none.
        groups: Groups (names) whose members are admitted on the Unix
            socket (or the admin pipe).  Default none.
    """

    listen: Path | Address | PipeAddress = Path("state/admin.sock")
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def pipe(self) -> PipeAddress | None:
        """The named pipe when :attr:`listen` is one, else ``None``."""
        return self.listen if isinstance(self.listen, PipeAddress) else None

    @property
    def unix_path(self) -> Path | None:
        """The socket path when :attr:`listen` is a Unix socket, else ``None``."""
        return self.listen if isinstance(self.listen, Path) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class StateSection:
    """``[state]``: where revocations live, for one relay or several.

    Attributes:
        backend: ``"sqlite"`` (default): a file in ``relay.state_dir``, for
            one relay.  ``"postgres"``: a PostgreSQL database shared by
            several relays.
        dsn_file: File holding the libpq connection string (``host=...
            dbname=... user=...`` or a ``postgresql://`` URI), so no password
            sits in the config.  Required with ``backend = "postgres"``.
        pool_size: Database connections a relay opens at most for queries,
            and as many again for the per-user claims made at admission
            (the LISTEN connection comes on top).  Default 4.
        connect_timeout: Seconds to open a database connection.  Default 5.
        statement_timeout: Seconds one query may run.  Default 5.
        resync_interval: Seconds between full re-reads of the revocations,
            the backstop for notifications lost while disconnected.  Default 5.
        unavailable_grace: Seconds new tunnels are still admitted after the
            database became unreachable; after that they get 503
            ``state_unavailable``.  0 refuses at once.  Default 30.
        session_lease: Seconds a relay's registration of its live sessions
            stays valid without renewal (renewed every third of it); the
            sessions of a relay that died vanish from the cluster's list after
            it.  With SQLite, the same for the workers of ``serve --workers``
            (their sessions count against the host's caps).  Default 15.
    """

    backend: Literal["sqlite", "postgres"] = "sqlite"
    dsn_file: Path | None = None
    pool_size: int = 4
    connect_timeout: float = 5.0
    statement_timeout: float = 5.0
    resync_interval: float = 5.0
    unavailable_grace: float = 30.0
    session_lease: float = 15.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    """``[[targets]]``: one debug server developers may tunnel to.

    Attributes:
        name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, unique.  Required.
        kind: One of :data:`TARGET_KINDS`.  Required.
        backend: Where the debug server listens.  Required.
        backend_url: ``backend`` as written in the file.
        allow: User names allowed in addition to a valid token (the file's
            ``allow_users``, or its older spelling ``allow``); ``None``
            (default) allows every token holder unless ``allow_groups`` is set.
        allow_groups: Groups whose members are allowed; ``None`` (default)
            means no group check.  With both lists set, either admits.
        cert_user: ``"cn"``, ``"san"`` or ``"cn_or_san"``: the client
            certificate must name the token's user there.  ``None`` (default)
            does not tie the certificate to the user.
        connect_timeout: Seconds to connect to the backend.  Default 5.
        idle_timeout: Seconds without a byte either way before the tunnel is
            closed (and a managed server killed).  Default 900.
        max_session: Hard cap on a tunnel's life in seconds; ``None``
            (default, or ``"0"`` in the file) means no cap.
        end_on_token_expiry: End the tunnel when its token expires.
            Default true.
        launch: Command that starts a managed server per tunnel; contains
            ``{port}``.  ``None`` (default) means the server runs on its own.
        launch_timeout: Seconds a launched server may take to accept
            connections.  Default 10.
        kill_grace: Seconds between SIGTERM and SIGKILL for a managed
            server.  Default 5.
        on_idle: Command run when the target goes idle.  Default ``None``.
        on_idle_timeout: Seconds ``on_idle`` may run.  Default 30.
        probe_interval: Seconds between probes for a forgotten server on an
            unmanaged target; ``None`` (``"0"`` in the file) disables.
            Default 30.
        record: Keep the raw byte stream in the audit folder.  Default false.
        record_max_bytes: Cap on the recorded stream per session, in bytes.
            Default 67108864 (64 MiB).
        kd_transport: For ``kdsrv`` targets, the kernel transport string the
            connector prints (``"net:port=50000,key=..."``).  Default ``None``.
        require_pq: Per-target override of ``tls.require_pq``; ``None``
            (default) inherits it.
        run_as: The account this target's managed server runs as; ``None``
            (default) means ``relay.run_as``.
        debugger_restrictions: Start the ``launch`` debugger with the
            restrictions it offers: ``-noshell`` for cdb, ntsd and windbg
            (no ``.shell``), ``-noshell -secure`` for kd (Secure Mode, which
            WinDbg offers for kernel-mode sessions only).  dbgsrv and kdsrv
            accept neither option.  Default false.
    """

    name: str
    kind: TargetKind
    backend: Backend
    backend_url: str = field(metadata={FILE_KEYS: ()})
    # ``allow_users`` is the file's name for it; ``allow`` its older spelling.
    allow: tuple[str, ...] | None = field(
        default=None, metadata={FILE_KEYS: ("allow_users", "allow")}
    )
    allow_groups: tuple[str, ...] | None = None
    cert_user: Literal["cn", "san", "cn_or_san"] | None = None
    connect_timeout: float = 5.0
    idle_timeout: float = 900.0
    max_session: float | None = None
    end_on_token_expiry: bool = True
    launch: tuple[str, ...] | None = None
    launch_timeout: float = 10.0
    kill_grace: float = 5.0
    on_idle: tuple[str, ...] | None = None
    on_idle_timeout: float = 30.0
    probe_interval: float | None = 30.0
    record: bool = False
    record_max_bytes: int = 64 * 1024 * 1024
    kd_transport: str | None = None
    require_pq: bool | None = None
    run_as: str | None = None
    debugger_restrictions: bool = False

    @property
    def managed(self) -> bool:
        """Whether the relay launches this target's server per tunnel."""
        return self.launch is not None

    def allows(self, user: str, groups: tuple[str, ...] = ()) -> bool:
        """Whether ``user`` (in ``groups``) passes this target's allow lists.

        A valid token is still required; this is the extra per-target check.
        """
        return self.admitted_by(user, groups) is not None

    def admitted_by(self, user: str, groups: tuple[str, ...] = ()) -> str | None:
        """Which allow rule admits ``user``: ``"open"``, ``"user"``, ``"group:NAME"``, or ``None``."""
        if self.allow is None and self.allow_groups is None:
            return "open"
        if self.allow is not None and user in self.allow:
            return "user"
        for group in self.allow_groups or ():
            if group in groups:
                return f"group:{group}"
        return None

    def launch_command(self, port: int) -> tuple[str, ...]:
        """The ``launch`` command with every ``{port}`` replaced by ``port``.

        Raises:
            ValueError: the target is not managed.
        """
        if self.launch is None:
            raise ValueError(f"target {self.name!r} has no launch command")
        argv = tuple(arg.replace("{port}", str(port)) for arg in self.launch)
        if self.debugger_restrictions:
            flags = DEBUGGER_RESTRICTIONS.get(debugger_name(argv[0]))
            if flags is None:
                raise ValueError(f"{argv[0]} offers no restrictions (see DEBUGGER_RESTRICTIONS)")
            argv = (argv[0], *flags, *argv[1:])
        return argv


#: Command-line options each WinDbg-family debugger offers to restrict what a
#: remote client can do on the server's machine: ``-noshell`` disables
#: ``.shell``; ``-secure`` turns on Secure Mode (kernel-mode debuggers only).
#: dbgsrv and kdsrv take neither.
DEBUGGER_RESTRICTIONS: dict[str, tuple[str, ...]] = {
    "cdb": ("-noshell",),
    "ntsd": ("-noshell",),
    "windbg": ("-noshell",),
    "kd": ("-noshell", "-secure"),
}


def debugger_name(program: str) -> str:
    """``C:\\Debuggers\\cdb.exe`` -> ``cdb``: the program's name, lower case, no ``.exe``."""
    name = program.replace("\\", "/").rsplit("/", 1)[-1].lower()
    return name[: -len(".exe")] if name.endswith(".exe") else name


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration.

    Attributes:
        relay: ``[relay]``.
        tls: ``[tls]``.
        auth: ``[auth]``.
        metrics: ``[metrics]``.
        admin: ``[admin]``.
        identity: ``[identity]``.
        limits: ``[limits]``.
        state: ``[state]``.
        targets: ``[[targets]]`` in file order.
        source: The config file it was loaded from, or ``None`` when built by
            :func:`config.config_from_dict`.
    """

    relay: RelaySection = field(default_factory=RelaySection)
    tls: TLSSection
    auth: AuthSection
    identity: IdentitySection = field(default_factory=IdentitySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    admin: AdminSection = field(default_factory=AdminSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    state: StateSection = field(default_factory=StateSection)
    targets: tuple[TargetConfig, ...] = ()
    source: Path | None = field(default=None, metadata={FILE_KEYS: ()})

    def target(self, name: str) -> TargetConfig | None:
        """The target called ``name``, or ``None``."""
        for target in self.targets:
            if target.name == name:
                return target
        return None

    def run_as(self, target: TargetConfig) -> str:
        """The account ``target``'s managed server runs as."""
        return target.run_as or self.relay.run_as

    def requires_pq(self, target: TargetConfig) -> bool:
        """Whether tunnels to ``target`` must use post-quantum key exchange."""
        if target.require_pq is not None:
            return target.require_pq
        return self.tls.require_pq
