"""Value parsers shared by the sections: ``host:port``, host names, domain patterns, IP
networks. Each takes the key path to name in its ConfigError."""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from ..errors import ConfigError
from .table import describe

MAX_PATTERN_LENGTH = 200

HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
                         r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?\Z")
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def parse_hostport(text: Any, path: str, *, port_zero_ok: bool = False) -> tuple[str, int]:
    """``host:port`` with an IPv4 address, a host name or ``[IPv6]``; returns (host, port).

    The IPv6 host is returned without brackets.
    """
    if not isinstance(text, str):
        raise ConfigError(path, f"expected a \"host:port\" string, got {describe(text)}")
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", text)
        if not m:
            raise ConfigError(path, f'expected "[IPv6]:port", got "{text}"')
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(path, f'"{host}" is not an IPv6 address') from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(path, f'expected "host:port", got "{text}"')
        if ":" in host:
            raise ConfigError(path, f'an IPv6 address must be written in brackets, '
                                    f'like "[{host}]:{port_text}"')
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ConfigError(path, f'"{host}" is not a valid IPv4 address') from None
        elif not HOSTNAME_RE.match(host):
            raise ConfigError(path, f'"{host}" is not a valid host name or address')
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(path, f'"{port_text}" is not a port number')
    port = int(port_text)
    low = 0 if port_zero_ok else 1
    if not low <= port <= 65535:
        raise ConfigError(path, f"port must be between {low} and 65535 (got {port})")
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _a_label(domain: str) -> str:
    try:
        import idna
        return idna.encode(domain, uts46=True).decode("ascii")
    except ImportError:  # pragma: no cover - idna ships with the dependencies
        return domain.encode("idna").decode("ascii")


def parse_domain_pattern(value: Any, path: str) -> str:
    """A rule pattern: ``*``, ``example.com`` or ``*.example.com``; returned lower-cased,
    without a trailing dot, internationalised names as A-labels."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a domain pattern string, got {describe(value)}")
    if len(value) > MAX_PATTERN_LENGTH:
        raise ConfigError(path, f"pattern is longer than {MAX_PATTERN_LENGTH} characters "
                                f"({len(value)})")
    text = value.strip().lower()
    if text == "*":
        return text
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ConfigError(path, "pattern must not be empty (use \"*\" for any domain)")
    if "@" in text:
        raise ConfigError(path, f'"{value}" is an address; a pattern names a domain '
                                '("example.com" or "*.example.com")')
    prefix = ""
    if text.startswith("*."):
        prefix, text = "*.", text[2:]
    if "*" in text:
        raise ConfigError(path, f'bad pattern "{value}": "*" is allowed only alone or as a '
                                'leading "*." (e.g. "*.example.com")')
    if not text.isascii():
        try:
            text = _a_label(text)
        except Exception as exc:  # idna raises several error classes
            raise ConfigError(path, f'"{value}" is not a valid domain name ({exc})') from None
    for label in text.split("."):
        if not _LABEL_RE.match(label):
            raise ConfigError(path, f'"{value}" is not a valid domain pattern '
                                    f'(bad label "{label}")')
    result = prefix + text
    if len(result) > MAX_PATTERN_LENGTH:
        raise ConfigError(path, f"pattern is longer than {MAX_PATTERN_LENGTH} characters "
                                "once converted to A-labels")
    return result


def looks_like_ip(text: str) -> bool:
    return "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text) is not None


def parse_network(value: Any, path: str) -> str:
    """An IPv4/IPv6 address or CIDR, normalised to CIDR text (``192.0.2.0/24``)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected an IP address or CIDR, got {describe(value)}")
    text = value.strip()
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(path, f'"{value}" is not an IP address or CIDR') from None
    raise ConfigError(path, f'"{value}" has host bits set; did you mean "{loose}"?')
