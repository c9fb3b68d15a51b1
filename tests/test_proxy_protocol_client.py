"""The PROXY protocol helpers produce the bytes of the spec's own layouts."""

from __future__ import annotations

import pytest
from proxy_protocol_client import V2_SIGNATURE, tlv, v1_header, v2_header


def test_v1_matches_the_spec_examples() -> None:
    assert (
        v1_header(("192.168.0.1", 56324), ("192.168.0.11", 443))
        == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert (
        v1_header(("2001:db8::1", 1), ("::1", 65535)) == b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"
    )


def test_v2_ipv4_ipv6_and_local() -> None:
    ipv4 = v2_header(("10.0.0.1", 8080), ("10.0.0.2", 443), tlvs=tlv(0x01, b"h2"))
    assert ipv4 == (
        V2_SIGNATURE
        + b"\x21\x11\x00\x11"
        + bytes([10, 0, 0, 1, 10, 0, 0, 2])
        + b"\x1f\x90\x01\xbb"
        + b"\x01\x00\x02h2"
    )
    ipv6 = v2_header(("::1", 1), ("::2", 2))
    assert ipv6[12:16] == b"\x21\x21\x00\x24"
    assert ipv6[16:] == bytes(15) + b"\x01" + bytes(15) + b"\x02" + b"\x00\x01\x00\x02"
    assert (
        v2_header(("10.0.0.1", 1), ("10.0.0.2", 2), local=True)
        == V2_SIGNATURE + b"\x20\x00\x00\x00"
    )


def test_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError, match="address family"):
        v1_header(("10.0.0.1", 1), ("::1", 2))
