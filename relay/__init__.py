"""dbgrelay's relay: the TLS data path, sessions, backends, connector and CLI.

The protocol pieces (:mod:`relay.preamble`, :mod:`relay.access`,
:mod:`relay.audit_chain`) are free of I/O; everything that awaits lives in
:mod:`relay.session`, :mod:`relay.server`, :mod:`relay.pump`,
:mod:`relay.backends` and :mod:`relay.connector`.
"""

from .access import Grant, authorize
from .audit import (
    AuditWriteError,
    AuditWriter,
    ByteRecorder,
    VerifyReport,
    render_timeline,
    verify_file,
)
from .backends import BackendError, ManagedServer, open_backend
from .connector import (
    ConnectFailed,
    ConnectorSettings,
    RelayRefused,
    debugger_command,
    open_tunnel,
    preflight,
    serve_connector,
)
from .errors import LocalProtocolError, RelayError, RemoteProtocolError
from .metrics import Metrics, NilMetrics
from .preamble import NEED_DATA, PreambleParser, ResponseParser, TunnelRequested, TunnelResponse
from .pump import PumpResult, Traffic, run_pump
from .server import Relay, serve_relay
from .session import Session, handle_connection
from .tls import ServerTLS, TLSInfo, make_client_engine, make_server_engine

__all__ = [
    "AuditWriteError",
    "AuditWriter",
    "BackendError",
    "ByteRecorder",
    "ConnectFailed",
    "ConnectorSettings",
    "Grant",
    "LocalProtocolError",
    "ManagedServer",
    "Metrics",
    "NEED_DATA",
    "NilMetrics",
    "PreambleParser",
    "PumpResult",
    "Relay",
    "RelayError",
    "RelayRefused",
    "RemoteProtocolError",
    "ResponseParser",
    "ServerTLS",
    "Session",
    "TLSInfo",
    "Traffic",
    "TunnelRequested",
    "TunnelResponse",
    "VerifyReport",
    "authorize",
    "debugger_command",
    "handle_connection",
    "make_client_engine",
    "make_server_engine",
    "open_backend",
    "open_tunnel",
    "preflight",
    "render_timeline",
    "run_pump",
    "serve_connector",
    "serve_relay",
    "verify_file",
]
