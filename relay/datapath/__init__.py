"""The data path: one tunnel pump and one TLS stream, each with its drivers.

Protocol code, free of I/O and of trio (re-exported here):

* :mod:`relay.datapath.pump`: the pump as a state machine.
* :mod:`relay.datapath.tls`: one TLS connection over memory buffers, with the
  :class:`~relay.datapath.tls.Engine` interface each engine adapts to
  (:mod:`relay.tls` for the standard library, :mod:`relay.tls_openssl` for
  pyOpenSSL), and the hardening both share.

I/O code, imported from its own module:

* :mod:`relay.datapath.stream`: the trio stream over that connection.
* :mod:`relay.datapath.trio_driver`: the pump's trio driver, ``run_pump``.
* :mod:`relay.datapath.thread_driver`: the pump's data-plane thread.
* :mod:`relay.datapath.sockets`: portable non-blocking socket calls.
"""

from .pump import Codec, PlainCodec, Pump, PumpResult, Tap, Traffic
from .tls import ALPN, PQ_GROUPS, TRUNCATED, Engine, TLSConnection, TLSError, TLSInfo, is_pq_group

__all__ = [
    "ALPN",
    "PQ_GROUPS",
    "TRUNCATED",
    "Codec",
    "Engine",
    "PlainCodec",
    "Pump",
    "PumpResult",
    "TLSConnection",
    "TLSError",
    "TLSInfo",
    "Tap",
    "Traffic",
    "is_pq_group",
]
