"""PROXY protocol headers as a TCP balancer sends them, for tests of listeners that expect one.

``v1_header`` builds the text form, ``v2_header`` the binary one, per HAProxy's
proxy-protocol.txt; the address family (IPv4 or IPv6) follows the addresses given.
"""

from __future__ import annotations

import ipaddress
import struct

Address = tuple[str, int]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_VERSION = 0x20
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_TCP_OVER_IPV4 = 0x11
_TCP_OVER_IPV6 = 0x21
_UNSPEC = 0x00


def _ips(
    src: Address, dst: Address
) -> (
    tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
    | tuple[ipaddress.IPv6Address, ipaddress.IPv6Address]
):
    source = ipaddress.ip_address(src[0])
    destination = ipaddress.ip_address(dst[0])
    if isinstance(source, ipaddress.IPv4Address) and isinstance(destination, ipaddress.IPv4Address):
        return source, destination
    if isinstance(source, ipaddress.IPv6Address) and isinstance(destination, ipaddress.IPv6Address):
        return source, destination
    raise ValueError(f"source {src[0]} and destination {dst[0]} are not of one address family")


def v1_header(src: Address, dst: Address) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n``."""
    source, destination = _ips(src, dst)
    protocol = "TCP4" if source.version == 4 else "TCP6"
    return f"PROXY {protocol} {source} {destination} {src[1]} {dst[1]}\r\n".encode("ascii")


def v2_header(src: Address, dst: Address, *, local: bool = False, tlvs: bytes = b"") -> bytes:
    """The binary header: PROXY command with the addresses, or LOCAL (a balancer's health check,
    no addresses) when ``local``; ``tlvs`` (already encoded) follow the address block."""
    if local:
        command, family, addresses = _V2_LOCAL, _UNSPEC, b""
    else:
        source, destination = _ips(src, dst)
        family = _TCP_OVER_IPV4 if source.version == 4 else _TCP_OVER_IPV6
        command = _V2_PROXY
        addresses = source.packed + destination.packed + struct.pack("!HH", src[1], dst[1])
    payload = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | command, family, len(payload)) + payload


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV (type, 16-bit length, value), to pass in ``v2_header(tlvs=...)``."""
    return struct.pack("!BH", kind, len(value)) + value
