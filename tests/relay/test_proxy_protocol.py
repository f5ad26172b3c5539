"""The PROXY v2 parser, fed literal bytes (split at every boundary, garbage, v1...)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from relay.errors import RemoteProtocolError
from relay.proxy_protocol import MAX_HEADER, NEED_DATA, SIGNATURE, ProxyHeader, ProxyHeaderParser


def header(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


def inet(src="203.0.113.9", dst="10.0.0.5", sport=51000, dport=7443) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def inet6(src="2001:db8::9", dst="2001:db8::5", sport=51000, dport=7443) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def unix(src=b"/run/client.sock", dst=b"/run/relay.sock") -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


PROXY_V4 = header(0x21, 0x11, inet())
PROXY_V6 = header(0x21, 0x21, inet6())
PROXY_UNIX = header(0x21, 0x31, unix())
LOCAL = header(0x20, 0x00, b"")
WITH_TLVS = header(0x21, 0x11, inet() + tlv(0x04, b"") + tlv(0xEA, b"\x01vpce-0123456789abcdef"))


def feed(data: bytes, chunks: list[int] | None = None) -> ProxyHeader:
    """Feed ``data`` the way a driver does: never more than ``bytes_wanted``."""
    parser = ProxyHeaderParser()
    offset = 0
    while (event := parser.next_event()) is NEED_DATA:
        want = parser.bytes_wanted()
        assert want > 0
        take = min(want, chunks.pop(0) if chunks else want)
        parser.receive_data(data[offset : offset + take])
        offset += take
    assert offset == len(data), "the parser must stop exactly at the end of the header"
    return event


def test_ipv4_proxy_header():
    assert feed(PROXY_V4) == ProxyHeader(
        command="PROXY",
        family="INET",
        source=("203.0.113.9", 51000),
        destination=("10.0.0.5", 7443),
        size=28,
    )


def test_ipv6_proxy_header():
    event = feed(PROXY_V6)
    assert (event.family, event.source, event.destination, event.size) == (
        "INET6",
        ("2001:db8::9", 51000),
        ("2001:db8::5", 7443),
        52,
    )


def test_unix_proxy_header_gives_paths():
    event = feed(PROXY_UNIX)
    assert (event.family, event.source, event.destination) == (
        "UNIX",
        "/run/client.sock",
        "/run/relay.sock",
    )


def test_local_command_carries_no_client_address():
    event = feed(LOCAL)
    assert (event.command, event.source, event.destination, event.size) == ("LOCAL", None, None, 16)
    # LOCAL with an address block (some balancers send one): ignored.
    assert feed(header(0x20, 0x11, inet())).source is None


def test_proxy_with_unspec_family_has_no_address():
    event = feed(header(0x21, 0x00, b""))
    assert (event.command, event.family, event.source) == ("PROXY", "UNSPEC", None)


def test_tlvs_are_skipped():
    assert feed(WITH_TLVS).source == ("203.0.113.9", 51000)


@pytest.mark.parametrize("data", [PROXY_V4, PROXY_V6, PROXY_UNIX, LOCAL, WITH_TLVS])
def test_every_split_point_gives_the_same_header(data):
    whole = feed(data)
    for cut in range(1, len(data)):
        assert feed(data, [cut, len(data)]) == whole
    assert feed(data, [1] * len(data)) == whole


def test_the_parser_never_asks_for_bytes_past_the_header():
    parser = ProxyHeaderParser()
    assert parser.bytes_wanted() == 16
    parser.receive_data(PROXY_V4[:16])
    assert parser.next_event() is NEED_DATA
    assert parser.bytes_wanted() == 12
    with pytest.raises(RemoteProtocolError, match="more bytes than the PROXY header needs"):
        parser.receive_data(PROXY_V4[16:] + b"\x16\x03\x01")


def refused(data: bytes, match: str) -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(RemoteProtocolError, match=match) as info:
        offset = 0
        while parser.next_event() is NEED_DATA:
            chunk = data[offset : offset + parser.bytes_wanted()]
            offset += len(chunk)
            parser.receive_data(chunk)
    assert info.value.reason == "proxy_invalid"


def test_v1_text_header_is_refused_with_advice():
    refused(b"PROXY TCP4 203.0.113.9 10.0.0.5 51000 7443\r\n", "version 1")


def test_tls_client_hello_instead_of_a_header_is_named():
    refused(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40, "ClientHello")


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\r\n\r\n\x00\r\nQUIX\n" + b"\0" * 8, b"\0" * 16]
)
def test_garbage_is_refused_as_soon_as_it_differs_from_the_signature(garbage):
    refused(garbage, "does not start with a PROXY protocol v2 header")


def test_wrong_version_command_family_transport():
    refused(header(0x11, 0x11, inet()), "version 1; only version 2")
    refused(header(0x22, 0x11, inet()), "unknown PROXY command 2")
    refused(header(0x21, 0x41, inet()), "unknown PROXY address family 4")
    refused(header(0x21, 0x12, inet()), "transport 2 is not a stream")


def test_length_too_short_for_the_addresses():
    refused(header(0x21, 0x11, inet()[:8]), "too short for INET")
    refused(header(0x21, 0x21, inet()), "too short for INET6")


def test_oversized_header_is_refused_from_its_length_field_alone():
    parser = ProxyHeaderParser()
    parser.receive_data(SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 0xFFFF))
    with pytest.raises(RemoteProtocolError, match=f"exceeds the {MAX_HEADER}-byte limit"):
        parser.next_event()
    # Exactly at the limit is fine.
    padding = tlv(0x04, b"\0" * (MAX_HEADER - 28 - 3))
    assert feed(header(0x21, 0x11, inet() + padding)).size == MAX_HEADER


def test_malformed_tlvs_are_refused():
    refused(header(0x21, 0x11, inet() + b"\x04\x00"), "ends inside a TLV")
    refused(header(0x21, 0x11, inet() + b"\x04\x00\x09abc"), "runs past the end")


def test_eof_inside_the_header():
    parser = ProxyHeaderParser()
    parser.receive_data(PROXY_V4[:16])
    assert parser.next_event() is NEED_DATA
    parser.receive_data(PROXY_V4[16:20])
    with pytest.raises(RemoteProtocolError, match="closed inside the PROXY header after 20 bytes"):
        parser.receive_data(b"")


def test_unix_path_that_is_not_utf8():
    refused(header(0x21, 0x31, unix(src=b"/run/\xff")), "not UTF-8")
