"""The data path: one tunnel pump and one TLS stream, each with its drivers.

* :mod:`relay.datapath.pump`: the pump as a state machine (sans-IO).
* :mod:`relay.datapath.tls`: one TLS connection over memory buffers, with the
  :class:`~relay.datapath.tls.Engine` interface each engine adapts to
  (:mod:`relay.tls` for the standard library, :mod:`relay.tls_openssl` for
  pyOpenSSL), and the hardening both share.
* :mod:`relay.datapath.stream`: the trio stream over that connection.
* :mod:`relay.datapath.trio_driver`: the pump's trio driver, :func:`run_pump`.
* :mod:`relay.datapath.sockets`: portable non-blocking socket calls.

The first two import neither trio nor any TLS engine.
"""

from .pump import Codec, PlainCodec, Pump, PumpResult, Tap, TLSCodec, Traffic
from .stream import TLSStream
from .tls import ALPN, PQ_GROUPS, TRUNCATED, Engine, TLSConnection, TLSError, TLSInfo, is_pq_group
from .trio_driver import RECEIVE_SIZE, run_pump

__all__ = [
    "ALPN",
    "PQ_GROUPS",
    "RECEIVE_SIZE",
    "TRUNCATED",
    "Codec",
    "Engine",
    "PlainCodec",
    "Pump",
    "PumpResult",
    "TLSCodec",
    "TLSConnection",
    "TLSError",
    "TLSInfo",
    "TLSStream",
    "Tap",
    "Traffic",
    "is_pq_group",
    "run_pump",
]
