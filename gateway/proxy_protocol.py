"""HAProxy PROXY protocol v1 (text) and v2 (binary) headers, sans-IO (SPEC §9).

`parse_proxy_header(buf)` looks at the first bytes of a connection: None while more bytes are
needed, `(ProxyInfo, consumed)` once the header is complete, ProxyHeaderError when it cannot be
one. The caller keeps `buf[consumed:]` as protocol bytes.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
MAX_HEADER = 4096


class ProxyHeaderError(Exception):
    pass


@dataclass(frozen=True)
class ProxyInfo:
    version: int
    command: str                               # PROXY | LOCAL
    source: tuple[str, int] | None
    dest: tuple[str, int] | None


def parse_proxy_header(buf: bytes):
    buf = bytes(buf)
    if not buf:
        return None
    if V2_SIGNATURE.startswith(buf[:len(V2_SIGNATURE)]):
        return None if len(buf) < 16 else _parse_v2(buf)
    if V1_PREFIX.startswith(buf[:len(V1_PREFIX)]):
        return None if len(buf) < len(V1_PREFIX) else _parse_v1(buf)
    raise ProxyHeaderError("not a PROXY protocol header")


def _port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {text[:8]!r}")
    return int(text)


def _parse_v1(buf: bytes):
    end = buf.find(b"\r\n", 0, V1_MAX + 1)
    if end < 0:
        if len(buf) >= V1_MAX or b"\n" in buf[:V1_MAX]:
            raise ProxyHeaderError("v1 header too long or not ended by CRLF")
        return None
    parts = buf[:end].split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        return ProxyInfo(1, "PROXY", None, None), end + 2
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    version = 4 if parts[1] == b"TCP4" else 6
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("bad v1 address") from None
    if src.version != version or dst.version != version:
        raise ProxyHeaderError("v1 address family mismatch")
    return (ProxyInfo(1, "PROXY", (str(src), _port(parts[4])), (str(dst), _port(parts[5]))),
            end + 2)


def _parse_v2(buf: bytes):
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack("!H", buf[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError("bad v2 command")
    if 16 + length > MAX_HEADER:
        raise ProxyHeaderError("v2 header too long")
    if len(buf) < 16 + length:
        return None
    body = buf[16:16 + length]
    total = 16 + length
    if command == 0:
        return ProxyInfo(2, "LOCAL", None, None), total
    family, transport = fam >> 4, fam & 0x0F
    if family == 0:
        return ProxyInfo(2, "PROXY", None, None), total
    if transport != 1:
        raise ProxyHeaderError("only TCP is supported")
    if family == 1:
        if length < 12:
            raise ProxyHeaderError("v2 IPv4 address block too short")
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 2:
        if length < 36:
            raise ProxyHeaderError("v2 IPv6 address block too short")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    else:
        raise ProxyHeaderError("unsupported v2 address family")
    return ProxyInfo(2, "PROXY", (str(src), sport), (str(dst), dport)), total


def is_trusted(addr: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def build_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    proto = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def build_v2(src: tuple[str, int], dst: tuple[str, int], command: str = "PROXY") -> bytes:
    if command == "LOCAL":
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body
