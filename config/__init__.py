"""dbgrelay's configuration: the TOML file, its validation and the model.

Load a file with :func:`load_config`, or validate an in-memory table with
:func:`config_from_dict`; both return a frozen :class:`Config` or raise one
:class:`ConfigError` listing every problem.  This package never imports trio,
``relay`` or ``auth``.
"""

from .addresses import parse_backend_url, parse_host_port, parse_listen_address
from .durations import format_duration, parse_duration
from .errors import ConfigError
from .load import config_from_dict, load_config
from .schema import (
    CERT_USER_RULES,
    TARGET_KINDS,
    Address,
    AdminSection,
    AuthSection,
    Backend,
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
    TargetKind,
    TcpBackend,
    TLSSection,
    UnixBackend,
    format_address,
)

__all__ = [
    "CERT_USER_RULES",
    "IdentitySection",
    "OidcIssuerConfig",
    "Address",
    "AdminSection",
    "AuthSection",
    "Backend",
    "Config",
    "ConfigError",
    "LimitsSection",
    "MetricsSection",
    "NpipeBackend",
    "PipeAddress",
    "RelaySection",
    "StateSection",
    "TARGET_KINDS",
    "TLSSection",
    "TargetConfig",
    "TargetKind",
    "TcpBackend",
    "UnixBackend",
    "config_from_dict",
    "format_address",
    "format_duration",
    "load_config",
    "parse_backend_url",
    "parse_duration",
    "parse_listen_address",
    "parse_host_port",
]
