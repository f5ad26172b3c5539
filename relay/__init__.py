"""dbgrelay's relay: the TLS data path, sessions, backends, connector and CLI.

The protocol pieces (:mod:`relay.preamble`, :mod:`relay.access`,
:mod:`relay.audit_chain`) are free of I/O; everything that awaits lives in
:mod:`relay.session`, :mod:`relay.server`, :mod:`relay.pump`,
:mod:`relay.backends` and :mod:`relay.connector`.  Import what you need from
those modules: this package imports none of them itself, so a process that
needs only part of it (``dbgrelay connect`` needs the connector, not the
metrics, token or audit code) does not load the rest.
"""
