"""The ways from the client to the backend: direct, a stunnel pair, dbgrelay.

A path is deployed for one workload and torn down after it, so every workload
starts with fresh relay processes and their peak RSS belongs to that workload.
:meth:`deploy` takes the backend port of every target the workload needs and
returns the port the client connects to for each.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .certs import CertFiles
from .procs import BenchError, Child, Supervisor, free_port

__all__ = [
    "BarePath",
    "Deployment",
    "DirectPath",
    "StunnelPath",
    "DbgrelayPath",
    "DbgrelaySetup",
]


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployed path.

    Attributes:
        ports: Client-facing port per target name.
        relay: The relay-side processes (empty for the direct path).
        tls_port: The server side's TLS port (the first target's), for the
            handshake workload; ``None`` on the direct path.
        tls_engine: The TLS library the path's own client side uses:
            ``"stdlib"`` (Python's ``ssl``, on the system OpenSSL, like
            stunnel) or ``"pyopenssl"``.
    """

    ports: dict[str, int]
    relay: tuple[Child, ...] = ()
    tls_port: int | None = None
    tls_engine: str = "stdlib"


class DirectPath:
    """The client talks to the backend itself: the floor every relay adds to."""

    name = "direct"

    def deploy(self, sup: Supervisor, targets: dict[str, int], *, pinned: bool) -> Deployment:
        return Deployment(ports=dict(targets))

    def teardown(self, sup: Supervisor, deployment: Deployment) -> None:
        pass


class StunnelPath:
    """stunnel in client mode -> TLS -> stunnel in server mode -> backend.

    Both ends are pinned to TLS 1.3 and one ciphersuite, verify like
    ``dbgrelay connect`` does (chain plus the 127.0.0.1 address), run in the
    foreground and set TCP_NODELAY on both legs.

    Args:
        stunnel: The stunnel binary.
        certs: The certificate shared with dbgrelay.
        ciphersuite: The TLS 1.3 ciphersuite both ends allow.
        workdir: Folder for configs and logs.
    """

    name = "stunnel"

    def __init__(self, stunnel: str, certs: CertFiles, ciphersuite: str, workdir: Path) -> None:
        self.stunnel = stunnel
        self.certs = certs
        self.ciphersuite = ciphersuite
        self.workdir = workdir
        self._count = 0

    def _common(self) -> str:
        return (
            "foreground = yes\n"
            "syslog = no\n"
            "pid =\n"
            "sslVersionMin = TLSv1.3\n"
            "sslVersionMax = TLSv1.3\n"
            f"ciphersuites = {self.ciphersuite}\n"
            "socket = l:TCP_NODELAY=1\n"
            "socket = r:TCP_NODELAY=1\n"
        )

    def deploy(self, sup: Supervisor, targets: dict[str, int], *, pinned: bool) -> Deployment:
        self._count += 1
        folder = self.workdir / f"stunnel-{self._count}"
        folder.mkdir()
        server_ports = {name: free_port() for name in targets}
        server_conf = [self._common()]
        for name, backend in targets.items():
            server_conf.append(
                f"[{name}]\naccept = 127.0.0.1:{server_ports[name]}\n"
                f"connect = 127.0.0.1:{backend}\n"
                f"cert = {self.certs.cert}\nkey = {self.certs.key}\n"
            )
        (folder / "server.conf").write_text("".join(server_conf))
        server = sup.start(
            "stunnel-server", [self.stunnel, str(folder / "server.conf")], pinned=pinned
        )
        relay = [server]
        try:
            for port in server_ports.values():
                sup.wait_listening(server, port)
            client_ports = {name: free_port() for name in targets}
            client_conf = [self._common()]
            for name in targets:
                client_conf.append(
                    f"[{name}]\nclient = yes\naccept = 127.0.0.1:{client_ports[name]}\n"
                    f"connect = 127.0.0.1:{server_ports[name]}\n"
                    f"CAfile = {self.certs.ca}\nverifyChain = yes\ncheckIP = 127.0.0.1\n"
                )
            (folder / "client.conf").write_text("".join(client_conf))
            client = sup.start(
                "stunnel-client", [self.stunnel, str(folder / "client.conf")], pinned=pinned
            )
            relay.append(client)
            for port in client_ports.values():
                sup.wait_listening(client, port)
        except BaseException:
            for child in relay:
                sup.stop(child)
            raise
        return Deployment(
            ports=client_ports, relay=tuple(relay), tls_port=next(iter(server_ports.values()))
        )

    def teardown(self, sup: Supervisor, deployment: Deployment) -> None:
        for child in deployment.relay:
            sup.stop(child)


class BarePath:
    """A bare TLS relay pair on trio (:mod:`bench.bare_pair`): the floor under dbgrelay.

    The relay's TLS stream and trio pump, and nothing else: no request, token,
    audit, log line, metric or data-plane thread.
    """

    name = "trio-bare"

    def __init__(self, python: str, certs: CertFiles) -> None:
        self.python = python
        self.certs = certs

    def deploy(self, sup: Supervisor, targets: dict[str, int], *, pinned: bool) -> Deployment:
        files = [str(self.certs.ca), str(self.certs.cert), str(self.certs.key)]
        relay: list[Child] = []
        ports: dict[str, int] = {}
        tls_port = None
        try:
            for name, backend in targets.items():
                relay_port, ports[name] = free_port(), free_port()
                tls_port = tls_port or relay_port
                for role, listen, upstream in (
                    ("relay", relay_port, backend),
                    ("connector", ports[name], relay_port),
                ):
                    argv = [self.python, "-m", "bench.bare_pair", role, str(listen), str(upstream)]
                    child = sup.start(f"trio-bare-{role}-{name}", [*argv, *files], pinned=pinned)
                    relay.append(child)
                    sup.wait_listening(child, listen)
        except BaseException:
            for child in relay:
                sup.stop(child)
            raise
        return Deployment(ports=ports, relay=tuple(relay), tls_port=tls_port)

    def teardown(self, sup: Supervisor, deployment: Deployment) -> None:
        for child in deployment.relay:
            sup.stop(child)


@dataclass(frozen=True, slots=True)
class DbgrelaySetup:
    """Keys and a token made once per run with dbgrelay's own CLI.

    Attributes:
        command: How to run dbgrelay.
        certs: The certificate shared with stunnel.
        keys: Folder from ``dbgrelay keys init``.
        token_file: A token for user ``bench`` and every target.
        connect_engine_flag: Whether ``dbgrelay connect`` accepts ``--tls-engine``.
        data_plane: The relay's ``relay.data_plane`` and the connector's
            ``--data-plane`` (bench's ``--data-plane``); when ``None`` both
            are left out, so each runs its default and older revisions run too.
    """

    command: tuple[str, ...]
    certs: CertFiles
    keys: Path
    token_file: Path
    connect_engine_flag: bool = field(default=False)
    data_plane: str | None = field(default=None)

    @classmethod
    def create(cls, command: tuple[str, ...], certs: CertFiles, workdir: Path) -> DbgrelaySetup:
        """Run ``keys init`` and ``token issue``.

        Raises:
            BenchError: the CLI is missing or refused; the message has its first line.
        """
        keys = workdir / "keys"
        _cli(command, "keys", "init", "--out", str(keys))
        token = _cli(
            command,
            "token", "issue", "--key", str(keys / "signing.key"),
            "--user", "bench", "--target", "*", "--ttl", "2h",
        ).strip()  # fmt: skip
        if not token:
            raise BenchError("dbgrelay token issue printed no token", reason="dbgrelay_cli")
        token_file = workdir / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        help_text = _cli(command, "connect", "--help")
        return cls(
            command=command,
            certs=certs,
            keys=keys,
            token_file=token_file,
            connect_engine_flag="--tls-engine" in help_text,
        )

    def write_config(
        self,
        folder: Path,
        *,
        engine: str,
        port: int,
        targets: dict[str, int],
        dsn: str | None = None,
    ) -> Path:
        """Write a ``dbgrelay serve`` config for ``targets`` and return its path.

        With ``dsn``, revocations live in that PostgreSQL database (``[state]``).
        """
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            "[relay]",
            f'listen = ["127.0.0.1:{port}"]',
            'state_dir = "state"',
            "max_sessions = 2000",
            *([f'data_plane = "{self.data_plane}"'] if self.data_plane is not None else []),
            "[tls]",
            f'cert = "{self.certs.cert}"',
            f'key = "{self.certs.key}"',
            'min_version = "1.3"',
            f'engine = "{engine}"',
            "[auth]",
            f'jwks = "{self.keys / "jwks.json"}"',
            "[metrics]",
            'listen = ""',
            # Every connection comes from 127.0.0.1 with one user's token: the
            # per-source and per-user defaults would throttle the workloads.
            "[limits]",
            "max_unauthenticated = 4000",
            "max_unauthenticated_per_source = 4000",
            "handshake_rate = 100000",
            "handshake_burst = 100000",
            "max_sessions_per_user = 4000",
        ]
        if dsn is not None:
            dsn_file = folder / "dsn"
            dsn_file.write_text(dsn + "\n")
            dsn_file.chmod(0o600)
            lines += ["[state]", 'backend = "postgres"', f'dsn_file = "{dsn_file}"']
        for name, backend in targets.items():
            lines += [
                "[[targets]]",
                f'name = "{name}"',
                'kind = "tcp"',
                f'backend = "tcp://127.0.0.1:{backend}"',
                'idle_timeout = "1h"',
            ]
        config = folder / "config.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def engine_refusal(self, engine: str, folder: Path) -> str | None:
        """Why ``dbgrelay check-config`` refuses ``engine``, or ``None`` if it accepts it."""
        config = self.write_config(folder, engine=engine, port=free_port(), targets={"echo": 9})
        try:
            _cli(self.command, "check-config", "--config", str(config))
        except BenchError as exc:
            return str(exc)
        return None


def _cli(command: tuple[str, ...], *args: str) -> str:
    try:
        done = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"dbgrelay {args[0]} failed: {exc}", reason="dbgrelay_cli") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise BenchError(f"dbgrelay {' '.join(args[:2])}: {detail}", reason="dbgrelay_cli")
    return done.stdout


#: Fields of ``dbgrelay serve``'s JSON log lines that say what TLS negotiated.
_TLS_FIELDS = ("tls_version", "tls_cipher", "cipher", "tls_group")


class DbgrelayPath:
    """``dbgrelay connect`` -> TLS -> ``dbgrelay serve`` -> backend, with one TLS engine.

    Args:
        setup: Keys, token and certificate.
        engine: ``"stdlib"`` or ``"pyopenssl"``.
        workdir: Folder for configs, state and logs.
        dsn: Keep revocations in this PostgreSQL database (the shared-state
            backend) instead of SQLite; the path is then ``dbgrelay-postgres``.
        workers: Run ``serve --workers N``; the path is then ``dbgrelay-workersN``.
    """

    def __init__(
        self,
        setup: DbgrelaySetup,
        engine: str,
        workdir: Path,
        *,
        dsn: str | None = None,
        workers: int = 1,
    ) -> None:
        self.setup = setup
        self.engine = engine
        self.workdir = workdir
        self.dsn = dsn
        self.workers = workers
        self.name = f"dbgrelay-{engine}"
        if dsn is not None:
            self.name = "dbgrelay-postgres"
        elif workers > 1:
            self.name = f"dbgrelay-workers{workers}"
        #: What the relay logged about its handshakes: field name -> values seen.
        self.tls_seen: dict[str, set[str]] = {}
        self._count = 0

    def deploy(self, sup: Supervisor, targets: dict[str, int], *, pinned: bool) -> Deployment:
        self._count += 1
        folder = self.workdir / f"{self.name}-{self._count}"
        port = free_port()
        config = self.setup.write_config(
            folder, engine=self.engine, port=port, targets=targets, dsn=self.dsn
        )
        command = list(self.setup.command)
        if self.dsn is not None:
            _cli(self.setup.command, "state", "migrate", "--config", str(config))
        # Explicit: serve's default is one worker per CPU.
        serve_argv = [*command, "serve", "--config", str(config), "--workers", str(self.workers)]
        serve = sup.start("dbgrelay-serve", serve_argv, pinned=pinned)
        relay = [serve]
        ports: dict[str, int] = {}
        try:
            sup.wait_listening(serve, port)
            for name in targets:
                ports[name] = free_port()
                argv = [
                    *command, "connect",
                    "--relay", f"127.0.0.1:{port}",
                    "--ca", str(self.setup.certs.ca),
                    "--target", name,
                    "--token-file", str(self.setup.token_file),
                    "--listen", f"127.0.0.1:{ports[name]}",
                ]  # fmt: skip
                if self.setup.connect_engine_flag:
                    argv += ["--tls-engine", self.engine]
                if self.setup.data_plane is not None:
                    argv += ["--data-plane", self.setup.data_plane]
                connect = sup.start(f"dbgrelay-connect-{name}", argv, pinned=pinned)
                relay.append(connect)
                sup.wait_listening(connect, ports[name])
        except BaseException:
            for child in relay:
                sup.stop(child)
            raise
        return Deployment(ports=ports, relay=tuple(relay), tls_port=port, tls_engine=self.engine)

    def teardown(self, sup: Supervisor, deployment: Deployment) -> None:
        for child in deployment.relay:
            sup.stop(child)
        serve = deployment.relay[0]
        if serve.log is None or not serve.log.exists():
            return
        for line in serve.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            for name in _TLS_FIELDS:
                if isinstance(event.get(name), str):
                    self.tls_seen.setdefault(name, set()).add(event[name])
