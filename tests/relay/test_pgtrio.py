"""The PostgreSQL helpers of :mod:`relay.pgtrio` that need no database."""

from __future__ import annotations

import os
import socket

import pytest

from auth.revocation_pg import written_to_while_idle
from relay.pgtrio import text_array

resource = pytest.importorskip("resource")

#: A descriptor number above what select() takes on Linux (FD_SETSIZE 1024).
HIGH_FD = 1500


@pytest.fixture
def high_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.skip(f"the open-file limit is {hard}: no descriptor {HIGH_FD} to test with")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 1), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_idle_connection_is_checked_on_a_descriptor_above_1023(high_fd_limit):
    # A relay holding a thousand tunnels opens its next database connection up there.
    ours, server = socket.socketpair()
    with ours, server:
        fd = os.dup2(ours.fileno(), HIGH_FD)
        try:
            assert not written_to_while_idle(fd)
            server.send(b"E")  # what a server sends before it closes the connection
            assert written_to_while_idle(fd)
        finally:
            os.close(fd)


def test_text_arrays_quote_and_escape_every_element():
    assert text_array([]) == "{}"
    assert text_array(['a"b', "c\\d", "{e,f}"]) == '{"a\\"b","c\\\\d","{e,f}"}'
