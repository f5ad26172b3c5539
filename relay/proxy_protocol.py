"""PROXY protocol version 2: the client address a TCP load balancer passes on.

Protocol code (layer 1): like :class:`relay.preamble.PreambleParser`, the
parser buffers what :meth:`ProxyHeaderParser.receive_data` gives it and
:meth:`~ProxyHeaderParser.next_event` returns a :class:`ProxyHeader` or
:data:`NEED_DATA`.  It never wants more bytes than the header has
(:meth:`~ProxyHeaderParser.bytes_wanted`), so a driver that reads at most that
many never swallows the TLS ClientHello behind it.

Format (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt,
section 2.2): a 12-byte signature, a version/command byte, a
family/transport byte, a 16-bit big-endian length, then the addresses and
optional TLVs.  Only version 2 is accepted: version 1 is text a client could
type, and this relay has no use for it.  The whole header is capped at
:data:`MAX_HEADER` bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

from .errors import RemoteProtocolError
from .preamble import NEED_DATA

__all__ = ["MAX_HEADER", "NEED_DATA", "SIGNATURE", "ProxyHeader", "ProxyHeaderParser"]

#: The 12 bytes every version 2 header starts with.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: The largest header accepted, TLVs included.  Addresses take at most 216
#: bytes (AF_UNIX); the rest leaves room for what load balancers add
#: (AWS: VPC endpoint id; ALPN, authority/SNI, CRC32C, unique id).
MAX_HEADER = 1024

_FIXED = 16
_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX
_FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason="proxy_invalid", status=400)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY v2 header.

    Attributes:
        command: ``"PROXY"`` (relayed connection) or ``"LOCAL"`` (the load
            balancer's own connection, such as a health check: use the
            socket's addresses).
        family: ``"INET"``, ``"INET6"``, ``"UNIX"`` or ``"UNSPEC"``.
        source: The client: ``(ip, port)`` for INET/INET6, a path for UNIX,
            ``None`` for LOCAL or UNSPEC.
        destination: The address the client connected to, same forms.
        size: Bytes the header took on the wire.
    """

    command: Literal["PROXY", "LOCAL"]
    family: str
    source: tuple[str, int] | str | None
    destination: tuple[str, int] | str | None
    size: int


class ProxyHeaderParser:
    """Parse one PROXY v2 header from the start of a connection.

    Args:
        max_header: Hard cap on the header's size in bytes.
    """

    def __init__(self, max_header: int = MAX_HEADER) -> None:
        self.max_header = max_header
        self._buffer = bytearray()
        self._total: int | None = None
        self._done = False

    def bytes_wanted(self) -> int:
        """How many bytes the header still needs (never more than it has)."""
        if self._total is None:
            return _FIXED - len(self._buffer)
        return self._total - len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection.

        Args:
            data: Bytes; ``b""`` means the peer closed.

        Raises:
            RemoteProtocolError: ``proxy_invalid`` when the bytes cannot
                start a PROXY v2 header, exceed :meth:`bytes_wanted`, or
                the connection ended inside the header.
        """
        if self._done:
            raise _invalid("data after the PROXY header reached the parser")
        if not data:
            raise _invalid(
                f"the connection closed inside the PROXY header after {len(self._buffer)} bytes"
            )
        if len(data) > self.bytes_wanted():
            raise _invalid("more bytes than the PROXY header needs were given to the parser")
        self._buffer += data
        self._check_prefix()

    def _check_prefix(self) -> None:
        head = bytes(self._buffer[: len(SIGNATURE)])
        if SIGNATURE.startswith(head):
            return
        if b"PROXY ".startswith(head[:6]) or head.startswith(b"PROXY"):
            raise _invalid(
                "got a PROXY protocol version 1 (text) header; configure the load balancer "
                "to send version 2"
            )
        if head[:1] == b"\x16":
            raise _invalid(
                "got a TLS ClientHello where the PROXY v2 header belongs; the load balancer "
                "does not send PROXY protocol, or this client bypasses it"
            )
        raise _invalid("the connection does not start with a PROXY protocol v2 header")

    def next_event(self) -> ProxyHeader | type[NEED_DATA]:
        """Return the header once complete, else :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: ``proxy_invalid``: wrong version, command,
                family or transport, a length beyond the cap or too short
                for the addresses, or malformed TLVs.
        """
        if len(self._buffer) < _FIXED:
            return NEED_DATA
        if self._total is None:
            self._total = self._parse_fixed()
        if len(self._buffer) < self._total:
            return NEED_DATA
        header = self._parse_body()
        self._done = True
        return header

    def _parse_fixed(self) -> int:
        ver_cmd, fam, length = struct.unpack_from("!BBH", self._buffer, 12)
        if ver_cmd >> 4 != 2:
            raise _invalid(f"PROXY header version {ver_cmd >> 4}; only version 2 is accepted")
        if ver_cmd & 0xF not in (0x0, 0x1):
            raise _invalid(f"unknown PROXY command {ver_cmd & 0xF}")
        family, transport = fam >> 4, fam & 0xF
        if family not in _FAMILIES:
            raise _invalid(f"unknown PROXY address family {family}")
        if transport not in (0x0, 0x1):
            raise _invalid(
                f"PROXY transport {transport} is not a stream; this relay serves TCP only"
            )
        if _FIXED + length > self.max_header:
            raise _invalid(
                f"PROXY header of {_FIXED + length} bytes exceeds the {self.max_header}-byte limit"
            )
        needed = _ADDRESS_SIZES.get(family, 0)
        if ver_cmd & 0xF == 0x1 and length < needed:
            raise _invalid(
                f"PROXY header length {length} is too short for {_FAMILIES[family]} addresses "
                f"({needed} bytes)"
            )
        return _FIXED + length

    def _parse_body(self) -> ProxyHeader:
        buf = bytes(self._buffer)
        command: Literal["PROXY", "LOCAL"] = "PROXY" if buf[12] & 0xF == 0x1 else "LOCAL"
        family_code = buf[13] >> 4
        family = _FAMILIES[family_code]
        body = buf[_FIXED:]
        source = destination = None
        used = 0
        if command == "PROXY":
            used = _ADDRESS_SIZES.get(family_code, 0)
            if family_code == 0x1:
                src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
                source = (str(ipaddress.IPv4Address(src)), sport)
                destination = (str(ipaddress.IPv4Address(dst)), dport)
            elif family_code == 0x2:
                src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
                source = (str(ipaddress.IPv6Address(src)), sport)
                destination = (str(ipaddress.IPv6Address(dst)), dport)
            elif family_code == 0x3:
                source = _unix_path(body[:108])
                destination = _unix_path(body[108:216])
        else:
            # LOCAL: the receiver ignores the address block (section 2.2).
            used = len(body)
        _check_tlvs(body[used:])
        if command == "PROXY" and family_code == 0x0:
            family = "UNSPEC"
        return ProxyHeader(
            command=command,
            family=family,
            source=source,
            destination=destination,
            size=len(buf),
        )


def _unix_path(raw: bytes) -> str:
    path = raw.split(b"\0", 1)[0]
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("the PROXY header's Unix socket path is not UTF-8") from None


def _check_tlvs(data: bytes) -> None:
    """TLVs are skipped, but their framing must add up exactly."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise _invalid("the PROXY header ends inside a TLV")
        (length,) = struct.unpack_from("!H", data, offset + 1)
        offset += 3 + length
        if offset > len(data):
            raise _invalid("a TLV runs past the end of the PROXY header")
