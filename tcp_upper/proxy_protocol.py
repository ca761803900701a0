"""The PROXY protocol header, versions 1 and 2, parsed without any I/O.

A proxy in front of the server (HAProxy ``send-proxy``/``send-proxy-v2``, nginx
``proxy_protocol``) writes one header before the client's bytes, naming the client's real address.
Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt.

:func:`parse` takes the bytes received so far and returns ``None`` ("need more"), a
:class:`ProxyHeader`, or raises :class:`ProxyProtocolError`. It never raises anything else, and
it decides on a bounded prefix: a version 1 line longer than :data:`V1_MAX_BYTES`, or a version 2
block longer than :data:`V2_MAX_PAYLOAD` (the spec allows 64 KiB of TLVs; nothing we expect sends
more than a few dozen bytes), is refused as soon as that is known.

Who may send a header is policy, kept next to it: :func:`parse_networks` and :func:`is_trusted`
(``--trusted-proxies``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

from .errors import TcpUpperError

#: Version 1: "PROXY" ... CRLF, at most 107 bytes including the CRLF (spec section 2.1).
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107
#: Version 2: a 12-byte signature, then version/command, family/protocol and a 2-byte length.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16
#: Largest version 2 address block plus TLVs accepted; beyond it the header is "oversized".
V2_MAX_PAYLOAD = 4096

LOCAL, PROXY = "LOCAL", "PROXY"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Who may send a header by default: this machine only (HAProxy next to the servers).
DEFAULT_TRUSTED_PROXIES: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

#: v2 family nibble -> (socket family, size of its address block).
_V2_FAMILIES = {0x0: (socket.AF_UNSPEC, 0), 0x1: (socket.AF_INET, 12),
                0x2: (socket.AF_INET6, 36), 0x3: (socket.AF_UNIX, 216)}
_V2_STREAM = 0x1


class ProxyProtocolError(TcpUpperError, ValueError):
    """The bytes are not a valid PROXY protocol header (the message says why)."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header.

    *source* and *destination* are ``(host, port)`` for TCP over IPv4/IPv6, ``None`` when the
    header carries no usable address (v2 ``LOCAL``, v1 ``UNKNOWN``, v2 ``AF_UNSPEC``/``AF_UNIX``):
    the connection's own endpoints then apply. *length* is the header's size in bytes and
    *leftover* what followed it in the bytes given to :func:`parse` (the client's first bytes).
    """

    version: int
    command: str
    family: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int
    leftover: bytes = b""

    @property
    def local(self) -> bool:
        """True for a v2 ``LOCAL`` connection: the proxy itself speaking, e.g. a health check."""
        return self.command == LOCAL


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of *data*, or ``None`` if more bytes are needed.

    Raises :class:`ProxyProtocolError` as soon as *data* cannot start a valid header.
    """
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyProtocolError("no empieza por una cabecera PROXY")


def _check_prefix(data: bytes, prefix: bytes) -> bool:
    """True when *data* holds all of *prefix*; False while it is a shorter piece of it."""
    if data[:len(prefix)] != prefix[:len(data)]:
        raise ProxyProtocolError("no empieza por una cabecera PROXY")
    return len(data) >= len(prefix)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not _check_prefix(data, V1_PREFIX):
        return None
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES or b"\n" in data[:V1_MAX_BYTES - 1]:
            raise ProxyProtocolError(f"línea PROXY v1 sin CRLF en {V1_MAX_BYTES} bytes")
        return None
    try:
        line = data[len(V1_PREFIX):end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("línea PROXY v1 con bytes no ASCII") from None
    length = end + 2
    fields = line.split(" ")
    if fields[0] == "UNKNOWN":  # the receiver must ignore the rest of the line
        return ProxyHeader(1, PROXY, socket.AF_UNSPEC, None, None, length, data[length:])
    if len(fields) != 5 or fields[0] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"línea PROXY v1 mal formada: {line[:40]!r}")
    version = 4 if fields[0] == "TCP4" else 6
    source_ip, destination_ip = (_v1_address(text, version) for text in fields[1:3])
    source_port, destination_port = (_v1_port(text) for text in fields[3:5])
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return ProxyHeader(1, PROXY, family, (source_ip, source_port),
                       (destination_ip, destination_port), length, data[length:])


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.version != version:
        raise ProxyProtocolError(f"dirección IPv{version} no válida en PROXY v1: {text[:40]!r}")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ProxyProtocolError(f"puerto no válido en PROXY v1: {text[:10]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not _check_prefix(data, V2_SIGNATURE) or len(data) < V2_FIXED_BYTES:
        return None
    version_command, family_protocol, payload = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2 or version_command & 0xF not in (0x0, 0x1):
        raise ProxyProtocolError(f"PROXY v2: versión/orden desconocida 0x{version_command:02x}")
    family_code, protocol = family_protocol >> 4, family_protocol & 0xF
    if family_code not in _V2_FAMILIES or protocol > 2:
        raise ProxyProtocolError(f"PROXY v2: familia desconocida 0x{family_protocol:02x}")
    if payload > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"PROXY v2: cabecera demasiado grande ({payload} bytes)")
    length = V2_FIXED_BYTES + payload
    if len(data) < length:
        return None
    command = LOCAL if version_command & 0xF == 0 else PROXY
    family, block = _V2_FAMILIES[family_code]
    leftover = data[length:]
    if command == LOCAL:  # the proxy's own connection: the address block is to be ignored
        return ProxyHeader(2, LOCAL, family, None, None, length, leftover)
    if payload < block:
        raise ProxyProtocolError(f"PROXY v2: {payload} bytes no caben una dirección de {block}")
    if family not in (socket.AF_INET, socket.AF_INET6):
        return ProxyHeader(2, PROXY, family, None, None, length, leftover)
    if protocol != _V2_STREAM:
        raise ProxyProtocolError("PROXY v2: solo se admite TCP (STREAM)")
    size = 4 if family == socket.AF_INET else 16
    addresses = data[V2_FIXED_BYTES:V2_FIXED_BYTES + 2 * size]
    source_ip, destination_ip = (socket.inet_ntop(family, addresses[i:i + size])
                                 for i in (0, size))
    source_port, destination_port = struct.unpack_from("!HH", data, V2_FIXED_BYTES + 2 * size)
    return ProxyHeader(2, PROXY, family, (source_ip, source_port),
                       (destination_ip, destination_port), length, leftover)


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDR texts -> networks; ValueError names the bad one (a bare address is a /32 or /128)."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item.strip()!r} no es una red CIDR (p. ej. 10.0.0.0/24)") from None
    return tuple(networks)


def is_trusted(host: str, networks: Iterable[Network]) -> bool:
    """True when *host* (a peer's address) lies in one of *networks*; IPv4-mapped IPv6 counts
    as the IPv4 address it carries (what an IPv6 socket reports for an IPv4 peer)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
