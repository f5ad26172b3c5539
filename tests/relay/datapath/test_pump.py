"""The pump state machine, driven by hand: no sockets, no trio, time as a number.

Every path of the forwarding logic is walked here byte by byte: partial
writes, backpressure both ways, EOF on either side with and without a
half-close, and on a TLS side (both engines) records cut at every byte,
``close_notify`` in the same read as data, a forged record and a cut
without ``close_notify``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.datapath.pump import (
    BACKEND,
    CLIENT,
    READ,
    SEND,
    SEND_EOF,
    PlainCodec,
    Pump,
    PumpResult,
    Traffic,
)
from relay.datapath.tls import TRUNCATED
from relay.datapath.trio_driver import RECEIVE_SIZE

from .conftest import connected_pair


def plain_pump(*, half_close: bool = True, **kw) -> tuple[Pump, list[tuple[str, bytes]]]:
    taps: list[tuple[str, bytes]] = []
    pump = Pump(
        PlainCodec(can_half_close=False),
        PlainCodec(can_half_close=half_close),
        Traffic(),
        now=0.0,
        tap=lambda direction, data: taps.append((direction, bytes(data))),
        **kw,
    )
    return pump, taps


def deliver(pump: Pump, side: int, now: float = 0.0) -> bytes:
    """Write everything the pump has for ``side``, one byte at a time."""
    got = bytearray()
    while out := pump.to_send(side):
        got += bytes(out[:1])
        pump.sent(side, 1, now)
    return bytes(got)


# -- plaintext on both sides --------------------------------------------------------


def test_bytes_fed_one_at_a_time_arrive_counted_and_tapped():
    pump, taps = plain_pump()
    for byte in b"stepi":
        assert pump.wants_read(CLIENT)
        pump.received(CLIENT, bytes([byte]), 1.0)
        assert not pump.wants_read(CLIENT)  # one chunk in flight at a time
        assert deliver(pump, BACKEND) == bytes([byte])
    for byte in b"ok":
        pump.received(BACKEND, bytes([byte]), 1.0)
        assert deliver(pump, CLIENT) == bytes([byte])
    assert (pump.traffic.to_backend, pump.traffic.to_client) == (5, 2)
    assert b"".join(d for direction, d in taps if direction == "c2b") == b"stepi"
    assert b"".join(d for direction, d in taps if direction == "b2c") == b"ok"
    assert pump.result is None and not pump.done


def test_a_partial_write_keeps_the_rest_and_counts_only_once_whole():
    pump, taps = plain_pump()
    pump.received(CLIENT, b"0123456789", 0.0)
    pump.sent(BACKEND, 3, 0.0)
    assert bytes(pump.to_send(BACKEND)) == b"3456789"
    assert pump.traffic.to_backend == 0 and taps == []
    pump.sent(BACKEND, 7, 0.0)
    assert pump.to_send(BACKEND) == b""
    assert pump.traffic.to_backend == 10 and taps == [("c2b", b"0123456789")]


def test_backpressure_holds_each_direction_on_its_own():
    pump, _ = plain_pump()
    pump.received(CLIENT, b"request", 0.0)
    # The backend has not taken the request: the client is not read again,
    # but the backend still is, and its answer still goes out.
    assert not pump.wants_read(CLIENT) and pump.wants_read(BACKEND)
    pump.received(BACKEND, b"event", 0.0)
    assert not pump.wants_read(BACKEND) and not pump.wants_read(CLIENT)
    assert deliver(pump, CLIENT) == b"event"
    assert pump.wants_read(BACKEND) and not pump.wants_read(CLIENT)
    assert deliver(pump, BACKEND) == b"request"
    assert pump.wants_read(CLIENT)


def test_client_eof_half_closes_the_backend_which_may_answer_until_close_timeout():
    pump, _ = plain_pump(close_timeout=5.0)
    pump.received(CLIENT, b"detach", 10.0)
    assert deliver(pump, BACKEND, 10.0) == b"detach"
    pump.received(CLIENT, b"", 11.0)
    assert pump.result == PumpResult("client_closed")
    assert pump.wants_eof(BACKEND) and not pump.wants_read(CLIENT)
    assert pump.close_deadline == 16.0
    pump.eof_sent(BACKEND)
    assert not pump.wants_eof(BACKEND)
    pump.received(BACKEND, b"OK", 12.0)
    assert deliver(pump, CLIENT, 12.0) == b"OK"
    assert pump.traffic.to_client == 2
    pump.expire(15.9)
    assert not pump.done
    pump.expire(16.0)
    assert pump.done and pump.result == PumpResult("client_closed")


def test_wants_says_in_one_call_what_the_three_questions_say():
    # The data-plane thread arms its sockets from wants() whenever a tunnel is
    # not settled; it must agree with wants_read / to_send / wants_eof at every step.
    def agree(pump: Pump) -> list[int]:
        bits = []
        for side in (CLIENT, BACKEND):
            expected = (READ if pump.wants_read(side) else 0) | (
                SEND if pump.to_send(side) else SEND_EOF if pump.wants_eof(side) else 0
            )
            assert pump.wants(side) == expected
            bits.append(expected)
        return bits

    pump, _ = plain_pump(close_timeout=5.0)
    assert agree(pump) == [READ, READ]
    pump.received(CLIENT, b"detach", 0.0)
    assert agree(pump) == [0, READ | SEND]  # backpressure: the client waits
    pump.sent(BACKEND, 3, 0.0)
    assert agree(pump) == [0, READ | SEND]  # a partial write
    pump.sent(BACKEND, 3, 0.0)
    assert agree(pump) == [READ, READ]
    pump.received(BACKEND, b"OK", 0.0)
    pump.received(CLIENT, b"", 0.0)  # EOF while the answer is in flight
    assert agree(pump) == [SEND, SEND_EOF]
    pump.eof_sent(BACKEND)
    assert agree(pump) == [SEND, 0]
    assert deliver(pump, CLIENT) == b"OK"
    assert agree(pump) == [0, READ]
    pump.received(BACKEND, b"", 0.0)
    assert pump.done and agree(pump) == [0, 0]


def test_client_eof_ends_the_tunnel_when_the_backend_cannot_half_close():
    pump, _ = plain_pump(half_close=False)
    pump.received(CLIENT, b"", 0.0)
    assert pump.done and pump.result == PumpResult("client_closed")
    assert not pump.wants_eof(BACKEND)


def test_backend_eof_ends_the_tunnel_after_its_last_bytes_are_written():
    pump, _ = plain_pump()
    pump.received(BACKEND, b"last words", 0.0)
    with pytest.raises(RuntimeError):
        pump.received(BACKEND, b"", 0.0)  # a driver reads only when asked
    assert deliver(pump, CLIENT) == b"last words"
    assert not pump.done and pump.wants_read(BACKEND)
    pump.received(BACKEND, b"", 0.0)
    assert pump.done and pump.result == PumpResult("backend_closed")
    assert pump.to_send(CLIENT) == b"" and not pump.wants_read(CLIENT)


@pytest.mark.parametrize(("side", "reason"), [(CLIENT, "client_error"), (BACKEND, "backend_error")])
def test_a_failed_transport_ends_the_tunnel_and_the_first_reason_stays(side, reason):
    pump, _ = plain_pump()
    pump.failed(side, "connection reset")
    pump.failed(1 - side, "later")
    assert pump.done and pump.result == PumpResult(reason, "connection reset")
    assert not pump.wants_read(CLIENT) and not pump.wants_read(BACKEND)


def test_the_idle_deadline_moves_with_every_delivered_chunk():
    pump, _ = plain_pump(idle_timeout=300.0)
    assert pump.idle_deadline == 300.0
    pump.received(CLIENT, b"x", 100.0)
    assert pump.idle_deadline == 300.0  # read, not yet delivered
    deliver(pump, BACKEND, 120.0)
    assert pump.idle_deadline == 420.0
    assert not pump.idle(419.9) and pump.idle(420.0)


def test_an_exception_from_the_tap_comes_out_of_the_call_that_delivered():
    def tap(direction: str, data: bytes) -> None:
        raise OSError("disk full")

    pump = Pump(PlainCodec(), PlainCodec(), Traffic(), now=0.0, tap=tap)
    pump.received(CLIENT, b"x", 0.0)
    with pytest.raises(OSError, match="disk full"):
        pump.sent(BACKEND, 1, 0.0)


# -- a TLS side, both engines -------------------------------------------------------


def tls_pump(contexts, **kw) -> tuple:
    """The relay's shape: TLS from the developer (``user``), plaintext to the backend."""
    user, relay = connected_pair(contexts)
    pump = Pump(relay, PlainCodec(), Traffic(), now=0.0, **kw)
    return user, relay, pump


def ciphertext(user, data: bytes) -> bytes:
    user.write(data)
    out = bytes(user.outgoing())
    user.sent(len(out))
    return out


def test_records_cut_at_every_byte_arrive_whole(contexts):
    user, _, pump = tls_pump(contexts)
    wire = ciphertext(user, b"first") + ciphertext(user, b"second")
    got = bytearray()
    for i in range(len(wire)):
        assert pump.wants_read(CLIENT)
        pump.received(CLIENT, wire[i : i + 1], 0.0)
        got += deliver(pump, BACKEND)
    assert bytes(got) == b"firstsecond"
    assert pump.traffic.to_backend == 11 and pump.result is None


def test_the_answer_is_encrypted_for_the_client(contexts):
    user, _, pump = tls_pump(contexts)
    pump.received(BACKEND, b"$T05#b9", 0.0)
    wire = bytes(pump.to_send(CLIENT))
    assert b"$T05" not in wire
    # Partial writes of ciphertext: the pump keeps the rest.
    pump.sent(CLIENT, 3, 0.0)
    rest = bytes(pump.to_send(CLIENT))
    assert rest == wire[3:] and pump.traffic.to_client == 0
    pump.sent(CLIENT, len(rest), 0.0)
    assert pump.traffic.to_client == 7
    user.receive(wire)
    assert user.read(100) == b"$T05#b9"


def test_more_records_than_one_chunk_leave_in_several_each_after_the_last(contexts):
    user, relay, pump = tls_pump(contexts)
    data = bytes(range(256)) * 1024  # 256 KiB: more than one decode takes
    wire = ciphertext(user, data)
    # received() answers what to_send() would: the first chunk's plaintext.
    out = pump.received(CLIENT, wire, 0.0)
    assert bytes(out) == bytes(pump.to_send(BACKEND))
    assert 0 < len(out) < len(data) and relay.more
    chunks = []
    while out:
        assert not pump.wants_read(CLIENT)  # backpressure: TLS holds the rest
        chunks.append(bytes(out))
        # sent() answers what is left: here, the next chunk, decoded only now.
        out = pump.sent(BACKEND, len(out), 0.0)
        assert bytes(out) == bytes(pump.to_send(BACKEND))
    assert b"".join(chunks) == data and len(chunks) > 1
    assert pump.traffic.to_backend == len(data) and pump.wants_read(CLIENT)
    assert not relay.more


def _loopback_segment() -> int:
    """The data one loopback TCP segment holds here (65,483 bytes with Linux's defaults).

    The IP packet is the interface's MTU but at most 65,535 bytes; less IP and
    TCP headers and TCP's timestamp option.
    """
    mtu = int(Path("/sys/class/net/lo/mtu").read_text())
    return min(mtu, 65535) - 20 - 20 - 12


def test_no_write_either_way_is_larger_than_one_loopback_segment(contexts):
    # A write just over one segment left a second one of 53 or 141 bytes,
    # which costs a receiver far more buffer than it carries: see
    # PLAINTEXT_LIMIT.  Both directions, from full reads.
    mss = _loopback_segment()
    user, relay, pump = tls_pump(contexts)
    # The first answer carries the session tickets TLS 1.3 held back.
    assert pump.sent(CLIENT, len(pump.received(BACKEND, b"$OK#9a", 0.0)), 0.0) == b""
    out = pump.received(BACKEND, bytes(RECEIVE_SIZE), 0.0)
    assert len(out) <= mss
    assert pump.sent(CLIENT, len(out), 0.0) == b""
    data = bytes(range(256)) * 1024
    wire = ciphertext(user, data)
    sizes = []
    for start in range(0, len(wire), RECEIVE_SIZE):
        out = pump.received(CLIENT, wire[start : start + RECEIVE_SIZE], 0.0)
        while out:
            sizes.append(len(out))
            out = pump.sent(BACKEND, len(out), 0.0)
    assert sum(sizes) == len(data) and max(sizes) <= mss, sizes


def test_sent_answers_the_rest_of_a_short_write(contexts):
    user, relay, pump = tls_pump(contexts)
    out = pump.received(BACKEND, b"$OK#9a", 0.0)
    wire = bytes(out)
    assert wire == bytes(pump.to_send(CLIENT)) and b"$OK" not in wire
    assert bytes(pump.sent(CLIENT, 5, 0.0)) == wire[5:]
    assert pump.sent(CLIENT, len(wire) - 5, 0.0) == b""
    assert pump.traffic.to_client == 6


def test_close_notify_in_the_same_read_as_data_is_seen_at_once(contexts):
    user, _, pump = tls_pump(contexts)
    wire = ciphertext(user, b"detach")
    user.close()
    wire += bytes(user.outgoing())
    pump.received(CLIENT, wire, 0.0)
    # The data goes first; the close follows without another read.
    assert pump.result is None and not pump.wants_read(CLIENT)
    assert deliver(pump, BACKEND) == b"detach"
    assert pump.result == PumpResult("client_closed")
    assert pump.wants_eof(BACKEND)


def test_a_forged_record_behind_good_ones_is_a_client_error_after_them(contexts):
    user, _, pump = tls_pump(contexts)
    good = ciphertext(user, b"good")
    forged = bytearray(ciphertext(user, b"evil"))
    forged[-1] ^= 0x01  # flips a bit of the authentication tag
    pump.received(CLIENT, good + bytes(forged), 0.0)
    assert pump.result is None
    assert deliver(pump, BACKEND) == b"good"
    assert pump.done and pump.result is not None
    assert pump.result.reason == "client_error"
    assert pump.traffic.to_backend == 4


def test_a_forged_record_alone_is_a_client_error_at_once(contexts):
    user, _, pump = tls_pump(contexts)
    forged = bytearray(ciphertext(user, b"evil"))
    forged[-1] ^= 0x01
    pump.received(CLIENT, bytes(forged), 0.0)
    assert pump.done and pump.result is not None and pump.result.reason == "client_error"
    assert pump.to_send(BACKEND) == b""


def test_a_cut_without_close_notify_is_a_client_error_on_both_engines(contexts):
    user, _, pump = tls_pump(contexts)
    pump.received(CLIENT, ciphertext(user, b"half a command"), 0.0)
    assert deliver(pump, BACKEND) == b"half a command"
    pump.received(CLIENT, b"", 0.0)
    assert pump.done and pump.result == PumpResult("client_error", TRUNCATED)
    assert not pump.wants_eof(BACKEND)


def test_records_buffered_before_the_pump_starts_are_forwarded_at_once(contexts):
    user, relay = connected_pair(contexts)
    # Records that came in behind the tunnel request, read but not decrypted.
    relay.receive(ciphertext(user, b"early"))
    pump = Pump(relay, PlainCodec(), Traffic(), now=0.0)
    assert deliver(pump, BACKEND) == b"early"


def test_tls_on_the_backend_side_as_in_the_connector(contexts):
    user, relay = connected_pair(contexts)
    # The connector: plaintext from the local debugger, TLS to the relay.
    pump = Pump(PlainCodec(), user, Traffic(), now=0.0)
    pump.received(CLIENT, b"qSupported", 0.0)
    wire = bytes(pump.to_send(BACKEND))
    pump.sent(BACKEND, len(wire), 0.0)
    relay.receive(wire)
    assert relay.read(100) == b"qSupported"
    relay.close()
    pump.received(BACKEND, bytes(relay.outgoing()), 0.0)
    assert pump.done and pump.result == PumpResult("backend_closed")
    # The local debugger's EOF cannot be passed on as a half-close over TLS.
    pump2 = Pump(PlainCodec(), connected_pair(contexts)[0], Traffic(), now=0.0)
    pump2.received(CLIENT, b"", 0.0)
    assert pump2.done and pump2.result == PumpResult("client_closed")


def test_the_protocol_layer_imports_neither_trio_nor_a_tls_engine():
    code = (
        "import sys, relay.datapath.pump, relay.datapath.tls; "
        "print(sorted(m for m in ('trio', 'ssl', 'OpenSSL') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
