"""HAProxy PROXY protocol v1 (text) and v2 (binary) headers, sans-IO (SPEC §9).

`parse_proxy_header(buf)` looks at the first bytes of a connection: None while more bytes are
needed, `(ProxyInfo, consumed)` once the header is complete, ProxyHeaderError as soon as the bytes
cannot be one. The caller keeps `buf[consumed:]` as protocol bytes.

v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN[ ...]\\r\\n``, at most
107 bytes including the CRLF. v2: a 12-byte signature, version/command, family/transport, a
16-bit length, then the address block and optional TLVs (ignored here); the whole header is
capped at MAX_HEADER bytes.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ProxyHeaderError", "ProxyInfo", "parse_proxy_header", "is_trusted",
           "build_v1", "build_v2", "V1_PREFIX", "V2_SIGNATURE", "V1_MAX", "MAX_HEADER"]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107                                   # the longest v1 line, CRLF included
MAX_HEADER = 4096                              # cap on a v2 header, TLVs included
_V2_FIXED = 16                                 # signature + ver/cmd + fam + length

_FAMILY_UNSPEC, _FAMILY_INET, _FAMILY_INET6, _FAMILY_UNIX = 0, 1, 2, 3
_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM = 0, 1, 2
_ADDR_LEN = {_FAMILY_INET: 12, _FAMILY_INET6: 36, _FAMILY_UNIX: 216}
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True)
class ProxyInfo:
    version: int                               # 1 or 2
    command: str                               # "PROXY" | "LOCAL"
    source: tuple[str, int] | None             # None for LOCAL / UNKNOWN / AF_UNSPEC
    dest: tuple[str, int] | None


def parse_proxy_header(buf: bytes) -> tuple[ProxyInfo, int] | None:
    """Parse the header at the start of `buf`: None if incomplete, else (info, consumed)."""
    buf = bytes(buf)
    if not buf:
        return None
    if buf[:1] == V2_SIGNATURE[:1]:
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyHeaderError("bad PROXY v2 signature")
        return None if len(buf) <= len(V2_SIGNATURE) else _parse_v2(buf)
    n = min(len(buf), len(V1_PREFIX))
    if buf[:n] != V1_PREFIX[:n]:
        raise ProxyHeaderError("not a PROXY protocol header")
    return None if len(buf) < len(V1_PREFIX) else _parse_v1(buf)


# --- v1 -------------------------------------------------------------------------------------

def _v1_port(text: bytes) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"bad v1 port {text[:8]!r}")
    return int(text)


def _v1_addr(text: bytes, version: int) -> str:
    try:
        s = text.decode("ascii")
        if "%" in s:                           # no IPv6 zone ids on the wire
            raise ValueError(s)
        ip = ipaddress.ip_address(s)
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"bad v1 address {text[:40]!r}") from None
    if ip.version != version:
        raise ProxyHeaderError(f"v1 address {text[:40]!r} does not match TCP{version}")
    return str(ip)


def _parse_v1(buf: bytes) -> tuple[ProxyInfo, int] | None:
    window = buf[:V1_MAX]
    end = window.find(b"\r\n")
    if end < 0:
        cr = window.find(b"\r")
        if b"\n" in window or (0 <= cr < len(window) - 1):
            raise ProxyHeaderError("v1 header not ended by CRLF")
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        return None
    line = window[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1 header not ended by CRLF")
    parts = line.split(b" ")
    if parts[1] == b"UNKNOWN":                 # the rest of the line is to be ignored
        return ProxyInfo(1, "PROXY", None, None), end + 2
    if parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"bad v1 protocol {parts[1][:16]!r}")
    if len(parts) != 6:
        raise ProxyHeaderError(f"v1 header has {len(parts)} fields, expected 6")
    version = 4 if parts[1] == b"TCP4" else 6
    src, dst = _v1_addr(parts[2], version), _v1_addr(parts[3], version)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyInfo(1, "PROXY", (src, sport), (dst, dport)), end + 2


# --- v2 -------------------------------------------------------------------------------------

def _parse_v2(buf: bytes) -> tuple[ProxyInfo, int] | None:
    # each field is checked as soon as its byte arrives, so garbage is refused early
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY v2 version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"bad PROXY v2 command {command}")
    if len(buf) < 14:
        return None
    fam = buf[13]
    family, transport = fam >> 4, fam & 0x0F
    if family > _FAMILY_UNIX or transport > _TRANSPORT_DGRAM:
        raise ProxyHeaderError(f"unknown PROXY v2 family/transport 0x{fam:02x}")
    if command == 1 and family == _FAMILY_UNIX:
        raise ProxyHeaderError("PROXY v2 AF_UNIX addresses are not supported")
    if command == 1 and family != _FAMILY_UNSPEC and transport != _TRANSPORT_STREAM:
        raise ProxyHeaderError("PROXY v2 transport is not TCP (UDP/unspecified refused)")
    if len(buf) < _V2_FIXED:
        return None
    (length,) = struct.unpack_from("!H", buf, 14)
    total = _V2_FIXED + length
    if total > MAX_HEADER:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes exceeds {MAX_HEADER}")
    if command == 0:                           # LOCAL: health check, addresses are ignored
        return (None if len(buf) < total else (ProxyInfo(2, "LOCAL", None, None), total))
    if family == _FAMILY_UNSPEC:
        return (None if len(buf) < total else (ProxyInfo(2, "PROXY", None, None), total))
    need = _ADDR_LEN[family]
    if length < need:
        raise ProxyHeaderError(f"PROXY v2 length {length} too short for the address block "
                               f"({need})")
    if len(buf) < total:
        return None
    body = buf[_V2_FIXED:_V2_FIXED + need]
    if family == _FAMILY_INET:
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
    else:
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
    sport, dport = struct.unpack_from("!HH", body, need - 4)
    return ProxyInfo(2, "PROXY", (str(src), sport), (str(dst), dport)), total


# --- trust ------------------------------------------------------------------------------------

def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    s = str(addr).strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    s = s.split("%", 1)[0]                     # drop an IPv6 zone id
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def is_trusted(addr: str, networks: Iterable[str]) -> bool:
    """Whether `addr` lies in one of the CIDR `networks` (IPv4-mapped IPv6 counts as IPv4)."""
    ip = _ip(addr)
    if ip is None:
        return False
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    if isinstance(networks, (str, bytes)):
        networks = [networks]
    for n in networks:
        net = ipaddress.ip_network(n.decode() if isinstance(n, bytes) else n, strict=False)
        if any(c.version == net.version and c in net for c in candidates):
            return True
    return False


# --- builders (act as a load balancer in tests) ---------------------------------------------

def _addr_pair(src, dst):
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError("source and destination must be the same address family")
    for port in (src[1], dst[1]):
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port {port} out of range")
    return s, d


def build_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None) -> bytes:
    """A v1 text header; `src`/`dst` None gives ``PROXY UNKNOWN``."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = _addr_pair(src, dst)
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {int(src[1])} {int(dst[1])}\r\n".encode("ascii")


def build_v2(src: tuple[str, int] | None, dst: tuple[str, int] | None,
             command: str = "PROXY", tlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """A v2 binary header. LOCAL (or `src`/`dst` None) carries no address block (AF_UNSPEC).

    `tlvs` are (type, value) pairs appended after the address block."""
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command must be PROXY or LOCAL, not {command!r}")
    tail = b"".join(struct.pack("!BH", t, len(v)) + bytes(v) for t, v in tlvs)
    if command == "LOCAL" or src is None or dst is None:
        fam, body = 0x00, b""
    else:
        s, d = _addr_pair(src, dst)
        fam = 0x11 if s.version == 4 else 0x21
        body = s.packed + d.packed + struct.pack("!HH", int(src[1]), int(dst[1]))
    ver_cmd = 0x20 | (1 if command == "PROXY" else 0)
    body += tail
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body
