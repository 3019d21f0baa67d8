"""Configuration (SPEC §12): TOML → validated, frozen dataclasses.

Every error raises gateway.errors.ConfigError naming the key path, for example
``listeners[1].rules[3].recipient`` or ``tls_profiles.partners.min_version`` (indices are
0-based). `parse_config` takes the already-decoded TOML (a dict) so tests and tools can build a
configuration without a file; `load_config` reads one. Non-fatal findings (e.g. ``esmtp = false``
on an ``optional`` listener) are returned in ``GatewayConfig.warnings``.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError  # noqa: F401  (re-exported)
from .tls.profiles import CIPHER_STRENGTH, PREDEFINED, TLS_VERSIONS, Profile, clone


@dataclass(frozen=True)
class Timeouts:
    tls_handshake: float = 30
    command: float = 300
    data: float = 180
    upstream_connect: float = 30
    upstream_reply: float = 300
    upstream_data_done: float = 540
    imap_login: float = 60
    imap_idle: float = 1800


@dataclass(frozen=True)
class Certificate:
    name: str
    cert: str            # path of the chain PEM
    key: str             # path of the key PEM


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    mode: str = "starttls"            # starttls | implicit
    tls: str = "preferred"            # none | preferred | allowed | required | verify
    server_name: str | None = None
    profile: str = "default"
    certificate: str | None = None    # name in GatewayConfig.certificates
    # idle connections kept per worker for later sessions (SMTP, §4.4; 0 = none)
    pool_size: int = 16
    pool_idle: float = 5.0            # seconds an idle pooled connection is kept
    pool_max_reuse: int = 100         # client sessions one connection serves at most


@dataclass(frozen=True)
class ClientRule:
    match: str                        # CIDR / IP, or a sender domain pattern
    client_tls: str | None = None     # none | optional | required | verify
    cipher_strength: str | None = None

    @property
    def is_network(self) -> bool:
        """True for a rule by client address (normalised CIDR), False for a sender domain."""
        return "/" in self.match


@dataclass(frozen=True)
class Rule:
    sender: str = "*"
    recipient: str = "*"
    sender_encryption: str = "optional"      # required | optional | none
    recipient_encryption: str = "preferred"  # required | preferred | allowed | none | verify
    enabled: bool = True


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: str                     # smtp | imap
    host: str
    port: int
    upstream: Upstream
    type: str = "public"              # public | private
    tls: str = "starttls"             # starttls | implicit | off
    client_tls: str = "optional"      # none | optional | required | verify (defaults per §2)
    certificate: str | None = None    # None → demo certificate when TLS is needed
    profile: str = "default"
    max_connections: int = 1000
    backlog: int = 50
    esmtp: bool = True
    max_message_size: int = 52428800
    bare_newline: str = "reject"      # reject | normalize
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()
    max_recipients: int = 1000
    received_header: bool = True
    forward_client: bool = False
    smtputf8: bool = True
    dsn: bool = False
    auth: str = "off"
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    timeouts: Timeouts = field(default_factory=Timeouts)
    client_rules: tuple[ClientRule, ...] = ()
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    hostname: str
    listeners: tuple[Listener, ...]
    workers: int = 0
    user: str | None = None
    group: str | None = None
    metrics: str = "127.0.0.1:9108"
    log_format: str = "logfmt"
    tracking_log: str | None = None
    shutdown_grace: float = 30
    worker_timeout: float = 30            # heartbeat age after which a worker is replaced (§9)
    alert_recipients: tuple[str, ...] = ()   # alert e-mail (§8); empty: none is sent
    alert_sender: str | None = None          # default postmaster@<hostname>
    alert_interval: float = 3600             # at most one e-mail per domain and reason
    certificates: dict[str, Certificate] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)   # predefined + operator
    warnings: tuple[str, ...] = ()        # non-fatal findings, for `gateway check` and the log
    single_process: bool = False          # `gateway run --single-process`: no forked workers
    source: str | None = None             # the file it was loaded from (for reload), if any


# ---------------------------------------------------------------------------------------------
# Vocabulary

PROTOCOLS = ("smtp", "imap")
LISTENER_TYPES = ("public", "private")
LISTENER_TLS = ("starttls", "implicit", "off")
CLIENT_LEVELS = ("none", "optional", "required", "verify")
UPSTREAM_LEVELS = ("none", "preferred", "allowed", "required", "verify")
UPSTREAM_MODES = ("starttls", "implicit")
SENDER_ENCRYPTION = ("required", "optional", "none")
RECIPIENT_ENCRYPTION = ("required", "preferred", "allowed", "none", "verify")
BARE_NEWLINE = ("reject", "normalize")
AUTH_MODES = ("off", "passthrough")
LOG_FORMATS = ("logfmt", "json")
CIPHER_STRENGTHS = tuple(CIPHER_STRENGTH)

MAX_PATTERN_LENGTH = 200

_CLIENT_RANK = {level: i for i, level in enumerate(CLIENT_LEVELS)}

_TOP_KEYS = ("gateway", "certificates", "tls_profiles", "listeners")
_GATEWAY_KEYS = ("hostname", "workers", "user", "group", "metrics", "log_format",
                 "tracking_log", "shutdown_grace", "alert_recipients", "alert_sender",
                 "alert_interval", "worker_timeout")
_CERT_KEYS = ("cert", "key")
_PROFILE_KEYS = ("clone", "min_version", "max_version", "cipher_strength", "ciphers",
                 "ciphersuites", "groups", "ca_file", "ca_path", "verify_depth",
                 "session_resumption")
_LISTENER_KEYS = ("name", "protocol", "type", "bind", "tls", "client_tls", "certificate",
                  "profile", "max_connections", "backlog", "esmtp", "max_message_size",
                  "bare_newline", "proxy_protocol", "trusted_proxies", "max_recipients",
                  "received_header", "forward_client", "smtputf8", "dsn", "auth",
                  "auth_mechanisms", "timeouts", "upstream", "client_rules", "rules")
_TIMEOUT_KEYS = tuple(f.name for f in fields(Timeouts))
_UPSTREAM_KEYS = ("address", "mode", "tls", "server_name", "profile", "certificate",
                  "pool_size", "pool_idle", "pool_max_reuse")
_CLIENT_RULE_KEYS = ("match", "client_tls", "cipher_strength")
_RULE_KEYS = ("enabled", "sender", "recipient", "sender_encryption", "recipient_encryption")

_HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
                          r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?\Z")
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_SASL_RE = re.compile(r"[A-Z0-9_-]{1,20}\Z")
_ADDRESS_RE = re.compile(r"[^\s@<>]{1,64}@[A-Za-z0-9_.-]{1,253}\Z")
_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Key paths and typed access


def _key(path: str, key: str) -> str:
    part = key if _NAME_RE.match(key) and "." not in key else json.dumps(key)
    return f"{path}.{part}" if path else part


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "array", dict: "table"}
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return kind
    text = json.dumps(value) if isinstance(value, (str, bool, int, float)) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _choices(allowed) -> str:
    return ", ".join(f'"{a}"' for a in allowed)


class _Table:
    """One TOML table with its key path; rejects unknown keys on construction."""

    def __init__(self, data: Any, path: str, allowed: tuple[str, ...], what: str = "a table"):
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected {what}, got {_describe(data)}")
        for k in data:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                extra = f'; did you mean "{hint[0]}"?' if hint else \
                    f" (known keys: {', '.join(allowed)})"
                raise ConfigError(_key(path, k), f'unknown key "{k}"{extra}')
        self.data = data
        self.path = path

    def p(self, key: str) -> str:
        return _key(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise ConfigError(self.p(key), "is required")
            return default
        return self.data[key]

    def str(self, key: str, default: Any = _MISSING, *, choices=None,
            empty_ok: bool = False) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if not isinstance(value, str):
            raise ConfigError(self.p(key), f"expected a string, got {_describe(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(self.p(key),
                              f'must be one of {_choices(choices)} (got "{value}")')
        if not value and not empty_ok:
            raise ConfigError(self.p(key), "must not be empty")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if not isinstance(value, bool):
            raise ConfigError(self.p(key), f"expected true or false, got {_describe(value)}")
        return value

    def int(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.p(key), f"expected an integer, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.p(key), f"must be at least {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise ConfigError(self.p(key), f"must be at most {maximum} (got {value})")
        return value

    def seconds(self, key: str, default: Any = _MISSING, *, zero_ok: bool = False) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(self.p(key),
                              f"expected a number of seconds, got {_describe(value)}")
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(self.p(key), f"must be a positive number of seconds (got {value})")
        return float(value)

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if not isinstance(value, list):
            raise ConfigError(self.p(key), f"expected an array of strings, got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.p(key)}[{i}]",
                                  f"expected a string, got {_describe(item)}")
        return value

    def table(self, key: str, allowed: tuple[str, ...]) -> _Table | None:
        if key not in self.data:
            return None
        return _Table(self.data[key], self.p(key), allowed)

    def tables(self, key: str, allowed: tuple[str, ...]) -> list[_Table]:
        if key not in self.data:
            return []
        value = self.data[key]
        if not isinstance(value, list):
            raise ConfigError(self.p(key),
                              f"expected an array of tables ([[{self.p(key)}]]), "
                              f"got {_describe(value)}")
        return [_Table(item, f"{self.p(key)}[{i}]", allowed) for i, item in enumerate(value)]


# ---------------------------------------------------------------------------------------------
# Value parsers


def parse_hostport(text: Any, path: str, *, port_zero_ok: bool = False) -> tuple[str, int]:
    """``host:port`` with an IPv4 address, a host name or ``[IPv6]``; returns (host, port).

    The IPv6 host is returned without brackets.
    """
    if not isinstance(text, str):
        raise ConfigError(path, f"expected a \"host:port\" string, got {_describe(text)}")
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
        elif not _HOSTNAME_RE.match(host):
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


def _is_ip(host: str) -> bool:
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
        raise ConfigError(path, f"expected a domain pattern string, got {_describe(value)}")
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


def _looks_like_ip(text: str) -> bool:
    return "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text) is not None


def parse_network(value: Any, path: str) -> str:
    """An IPv4/IPv6 address or CIDR, normalised to CIDR text (``192.0.2.0/24``)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected an IP address or CIDR, got {_describe(value)}")
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


# ---------------------------------------------------------------------------------------------
# Sections


def _parse_gateway(t: _Table | None) -> dict:
    if t is None:
        return {"hostname": socket.getfqdn()}
    out: dict[str, Any] = {}
    hostname = t.str("hostname", None)
    if hostname is None:
        hostname = socket.getfqdn()
    elif not _HOSTNAME_RE.match(hostname):
        raise ConfigError(t.p("hostname"), f'"{hostname}" is not a valid host name')
    out["hostname"] = hostname
    out["workers"] = t.int("workers", 0, minimum=0)
    out["user"] = t.str("user", None)
    out["group"] = t.str("group", None)
    metrics = t.str("metrics", "127.0.0.1:9108", empty_ok=True)
    if metrics:
        parse_hostport(metrics, t.p("metrics"), port_zero_ok=True)
    out["metrics"] = metrics
    out["log_format"] = t.str("log_format", "logfmt", choices=LOG_FORMATS)
    out["tracking_log"] = t.str("tracking_log", None)
    out["shutdown_grace"] = t.seconds("shutdown_grace", 30.0, zero_ok=True)
    out["worker_timeout"] = t.seconds("worker_timeout", 30.0)
    recipients = t.str_list("alert_recipients", [])
    for i, addr in enumerate(recipients):
        if not _ADDRESS_RE.match(addr):
            raise ConfigError(f"{t.p('alert_recipients')}[{i}]",
                              f'"{addr}" is not an e-mail address (local@domain)')
    out["alert_recipients"] = tuple(recipients)
    sender = t.str("alert_sender", None)
    if sender is not None and not _ADDRESS_RE.match(sender):
        raise ConfigError(t.p("alert_sender"), f'"{sender}" is not an e-mail address')
    out["alert_sender"] = sender
    out["alert_interval"] = t.seconds("alert_interval", 3600.0)
    return out


def _parse_certificates(top: _Table) -> dict[str, Certificate]:
    if not top.has("certificates"):
        return {}
    section = top.data["certificates"]
    if not isinstance(section, dict):
        raise ConfigError("certificates", f"expected a table of certificates "
                                          f"([certificates.NAME]), got {_describe(section)}")
    result = {}
    for name, value in section.items():
        t = _Table(value, _key("certificates", name), _CERT_KEYS,
                   what="a table with cert and key")
        result[name] = Certificate(name=name, cert=t.str("cert"), key=t.str("key"))
    return result


def _check_openssl(path: str, key: str, value: str) -> None:
    """Reject cipher strings, TLS 1.3 suites and group lists OpenSSL cannot apply."""
    try:
        from OpenSSL import SSL
        from OpenSSL._util import lib
    except Exception:  # pragma: no cover - pyOpenSSL is a dependency
        return
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        if key == "ciphers":
            ctx.set_cipher_list(value.encode())
        elif key == "ciphersuites":
            ctx.set_tls13_ciphersuites(value.encode())
        elif key == "groups":
            setter = getattr(lib, "SSL_CTX_set1_curves_list", None)
            if setter is not None and setter(ctx._context, value.encode()) != 1:
                raise ValueError("unknown group")
    except Exception:
        raise ConfigError(_key(path, key),
                          f'OpenSSL cannot apply {key} = "{value}"') from None


def _parse_profiles(top: _Table) -> dict[str, Profile]:
    profiles = dict(PREDEFINED)
    if not top.has("tls_profiles"):
        return profiles
    section = top.data["tls_profiles"]
    if not isinstance(section, dict):
        raise ConfigError("tls_profiles", f"expected a table of profiles "
                                          f"([tls_profiles.NAME]), got {_describe(section)}")
    tables: dict[str, _Table] = {}
    for name, value in section.items():
        path = _key("tls_profiles", name)
        if name in PREDEFINED:
            raise ConfigError(path, f'the predefined profile "{name}" is read-only; clone it: '
                                    f'[tls_profiles.my_{name}] with clone = "{name}"')
        t = _Table(value, path, _PROFILE_KEYS)
        if not t.has("clone"):
            raise ConfigError(path, 'a profile must start with clone = "<name>" '
                                    f"(predefined: {_choices(PREDEFINED)})")
        if next(iter(t.data)) != "clone":
            raise ConfigError(t.p("clone"), f'must be the first key of [{path}]')
        t.str("clone")
        tables[name] = t

    resolving: list[str] = []

    def resolve(name: str) -> Profile:
        if name in profiles:
            return profiles[name]
        t = tables[name]
        base_name = t.data["clone"]
        if base_name not in profiles and base_name not in tables:
            known = sorted(set(profiles) | set(tables))
            raise ConfigError(t.p("clone"), f'unknown profile "{base_name}" '
                                            f"(known: {_choices(known)})")
        if base_name in resolving or base_name == name:
            raise ConfigError(t.p("clone"),
                              "profiles clone each other in a cycle: "
                              + " -> ".join(resolving + [name, base_name]))
        resolving.append(name)
        base = resolve(base_name)
        resolving.pop()
        overrides: dict[str, Any] = {}
        for key in ("min_version", "max_version"):
            if t.has(key):
                overrides[key] = t.str(key, choices=TLS_VERSIONS)
        if t.has("ciphers") and t.has("cipher_strength"):
            raise ConfigError(t.p("cipher_strength"),
                              "set either cipher_strength or ciphers, not both")
        if t.has("cipher_strength"):
            overrides["cipher_strength"] = t.str("cipher_strength", choices=CIPHER_STRENGTHS)
        if t.has("ciphers"):
            overrides["ciphers"] = t.str("ciphers")
            overrides["cipher_strength"] = None
            _check_openssl(t.path, "ciphers", overrides["ciphers"])
        for key in ("ciphersuites", "groups"):
            if t.has(key):
                overrides[key] = t.str(key)
                _check_openssl(t.path, key, overrides[key])
        for key in ("ca_file", "ca_path"):
            if t.has(key):
                overrides[key] = t.str(key)
        if t.has("verify_depth"):
            overrides["verify_depth"] = t.int("verify_depth", minimum=0, maximum=100)
        if t.has("session_resumption"):
            overrides["session_resumption"] = t.bool("session_resumption")
        profile = clone(base, name, **overrides)
        lo, hi = (TLS_VERSIONS.index(profile.min_version),
                  TLS_VERSIONS.index(profile.max_version))
        if lo > hi:
            key = "min_version" if t.has("min_version") else "max_version"
            raise ConfigError(t.p(key), f"min_version {profile.min_version} is above "
                                        f"max_version {profile.max_version}")
        profiles[name] = profile
        return profile

    for name in tables:
        resolve(name)
    return profiles


def _ref(t: _Table, key: str, known: dict, what: str, default: Any) -> Any:
    name = t.str(key, default)
    if name is not None and name not in known:
        listing = _choices(sorted(known)) if known else "none defined"
        raise ConfigError(t.p(key), f'unknown {what} "{name}" (known: {listing})')
    return name


def _has_ca(profile: Profile) -> bool:
    return bool(profile.ca_file or profile.ca_path)


def _parse_upstream(t: _Table, certificates, profiles) -> Upstream:
    host, port = parse_hostport(t.raw("address"), t.p("address"))
    mode = t.str("mode", "starttls", choices=UPSTREAM_MODES)
    level = t.str("tls", "preferred", choices=UPSTREAM_LEVELS)
    server_name = t.str("server_name", None)
    if server_name is not None and not _HOSTNAME_RE.match(server_name):
        raise ConfigError(t.p("server_name"), f'"{server_name}" is not a valid host name')
    profile = _ref(t, "profile", profiles, "TLS profile", "default")
    certificate = _ref(t, "certificate", certificates, "certificate", None)
    if mode == "implicit" and level == "none":
        raise ConfigError(t.p("tls"), 'mode = "implicit" always uses TLS; '
                                      'tls = "none" contradicts it')
    if level == "verify" and server_name is None and _is_ip(host):
        raise ConfigError(t.p("tls"), f'"verify" to the IP address {host} needs server_name '
                                      "(the name to verify the certificate against)")
    pool_size = t.int("pool_size", 16, minimum=0, maximum=10000)
    pool_idle = t.seconds("pool_idle", 5.0)
    pool_max_reuse = t.int("pool_max_reuse", 100, minimum=1)
    return Upstream(host=host, port=port, mode=mode, tls=level, server_name=server_name,
                    profile=profile, certificate=certificate, pool_size=pool_size,
                    pool_idle=pool_idle, pool_max_reuse=pool_max_reuse)


def _parse_listener(t: _Table, index: int, certificates, profiles,
                    warnings: list[str]) -> Listener:
    name = t.str("name")
    if not _NAME_RE.match(name):
        raise ConfigError(t.p("name"), f'"{name}" may contain only letters, digits, '
                                       '".", "_" and "-"')
    protocol = t.str("protocol", "smtp", choices=PROTOCOLS)
    ltype = t.str("type", "public", choices=LISTENER_TYPES)
    host, port = parse_hostport(t.raw("bind"), t.p("bind"), port_zero_ok=True)
    mode = t.str("tls", "starttls", choices=LISTENER_TLS)
    certificate = _ref(t, "certificate", certificates, "certificate", None)
    profile_name = _ref(t, "profile", profiles, "TLS profile", "default")
    profile = profiles[profile_name]

    level = t.str("client_tls", None, choices=CLIENT_LEVELS)
    if mode == "implicit":
        if level == "none":
            raise ConfigError(t.p("client_tls"), 'cannot be "none" on a tls = "implicit" '
                                                 "listener (every session is TLS)")
        level = "required" if level in (None, "optional") else level
    elif mode == "off":
        if level in ("required", "verify"):
            raise ConfigError(t.p("client_tls"), f'cannot be "{level}" on a tls = "off" '
                                                 "listener (it never offers TLS)")
        level = level or "none"
    else:
        level = level or "optional"
    if level == "verify" and not _has_ca(profile):
        raise ConfigError(t.p("client_tls"), f'"verify" needs a profile with ca_file or '
                                             f'ca_path; profile "{profile_name}" has neither')

    esmtp = t.bool("esmtp", True)
    if protocol == "smtp" and mode == "starttls" and not esmtp:
        if level in ("required", "verify"):
            raise ConfigError(t.p("esmtp"), f'esmtp = false offers no STARTTLS, so '
                                            f'client_tls = "{level}" could never be met')
        if level == "optional":
            warnings.append(f"{t.path}: esmtp = false disables STARTTLS")

    auth = t.str("auth", "off", choices=AUTH_MODES)
    if auth == "passthrough" and level == "none":
        raise ConfigError(t.p("auth"), 'auth = "passthrough" needs TLS; this listener\'s '
                                       'client_tls is "none"')
    mechanisms = t.str_list("auth_mechanisms", ["PLAIN", "LOGIN"])
    mechs = []
    for i, mech in enumerate(mechanisms):
        if not _SASL_RE.match(mech.upper()):
            raise ConfigError(f"{t.p('auth_mechanisms')}[{i}]",
                              f'"{mech}" is not a SASL mechanism name')
        mechs.append(mech.upper())
    if auth == "passthrough" and not mechs:
        raise ConfigError(t.p("auth_mechanisms"), "must name at least one mechanism")

    proxy_protocol = t.bool("proxy_protocol", False)
    trusted = tuple(parse_network(v, f"{t.p('trusted_proxies')}[{i}]")
                    for i, v in enumerate(t.str_list("trusted_proxies", [])))
    if proxy_protocol and not trusted:
        raise ConfigError(t.p("trusted_proxies"), "proxy_protocol = true needs the addresses "
                                                  "of the proxies in trusted_proxies")

    timeouts_t = t.table("timeouts", _TIMEOUT_KEYS)
    timeouts = Timeouts()
    if timeouts_t is not None:
        timeouts = Timeouts(**{k: timeouts_t.seconds(k, getattr(timeouts, k))
                               for k in _TIMEOUT_KEYS})

    if not t.has("upstream"):
        raise ConfigError(t.p("upstream"), "is required ([listeners.upstream] with address)")
    upstream = _parse_upstream(t.table("upstream", _UPSTREAM_KEYS), certificates, profiles)

    client_rules = []
    for i, rt in enumerate(t.tables("client_rules", _CLIENT_RULE_KEYS)):
        client_rules.append(_parse_client_rule(rt, mode, level, protocol, profile,
                                               profile_name))

    rule_tables = t.tables("rules", _RULE_KEYS)
    if rule_tables and protocol != "smtp":
        raise ConfigError(t.p("rules"), "encryption rules apply to SMTP listeners only")
    rules = []
    for rt in rule_tables:
        rules.append(_parse_rule(rt, upstream))

    if certificate is None and (mode == "implicit" or (mode == "starttls" and level != "none")):
        warnings.append(f"{t.path}: no certificate; a self-signed demonstration certificate "
                        "will be generated (insecure)")

    return Listener(
        name=name, protocol=protocol, host=host, port=port, upstream=upstream, type=ltype,
        tls=mode, client_tls=level, certificate=certificate, profile=profile_name,
        max_connections=t.int("max_connections", 1000, minimum=1),
        backlog=t.int("backlog", 50, minimum=1),
        esmtp=esmtp,
        max_message_size=t.int("max_message_size", 52428800, minimum=1),
        bare_newline=t.str("bare_newline", "reject", choices=BARE_NEWLINE),
        proxy_protocol=proxy_protocol, trusted_proxies=trusted,
        max_recipients=t.int("max_recipients", 1000, minimum=1),
        received_header=t.bool("received_header", True),
        forward_client=t.bool("forward_client", False),
        smtputf8=t.bool("smtputf8", True),
        dsn=t.bool("dsn", False),
        auth=auth, auth_mechanisms=tuple(mechs), timeouts=timeouts,
        client_rules=tuple(client_rules), rules=tuple(rules),
    )


def _parse_client_rule(t: _Table, mode: str, listener_level: str, protocol: str,
                       profile: Profile, profile_name: str) -> ClientRule:
    raw = t.str("match")
    by_network = _looks_like_ip(raw.strip())
    match = parse_network(raw, t.p("match")) if by_network \
        else parse_domain_pattern(raw, t.p("match"))
    level = t.str("client_tls", None, choices=CLIENT_LEVELS)
    strength = t.str("cipher_strength", None, choices=CIPHER_STRENGTHS)
    if level is None and strength is None:
        raise ConfigError(t.path, "a client rule must set client_tls or cipher_strength")
    if not by_network:
        if protocol != "smtp":
            raise ConfigError(t.p("match"), "sender-domain rules apply to SMTP listeners only")
        if listener_level == "none":
            raise ConfigError(t.p("match"), "a sender-domain rule cannot apply on a listener "
                                            'whose client_tls is "none" (no TLS is offered)')
        if level == "none":
            raise ConfigError(t.p("client_tls"), 'a sender-domain rule can only tighten; '
                                                 '"none" is not allowed')
    if mode == "implicit":
        if level == "none":
            raise ConfigError(t.p("client_tls"), 'cannot be "none" on a tls = "implicit" '
                                                 "listener")
        if level == "optional":
            level = "required"
    elif mode == "off":
        if level in ("required", "verify"):
            raise ConfigError(t.p("client_tls"), f'cannot be "{level}" on a tls = "off" '
                                                 "listener")
        if strength is not None:
            raise ConfigError(t.p("cipher_strength"), 'has no effect on a tls = "off" listener')
    if level == "verify" and not _has_ca(profile):
        raise ConfigError(t.p("client_tls"), f'"verify" needs a profile with ca_file or '
                                             f'ca_path; profile "{profile_name}" has neither')
    return ClientRule(match=match, client_tls=level, cipher_strength=strength)


def _parse_rule(t: _Table, upstream: Upstream) -> Rule:
    rule = Rule(
        enabled=t.bool("enabled", True),
        sender=parse_domain_pattern(t.raw("sender", "*"), t.p("sender")),
        recipient=parse_domain_pattern(t.raw("recipient", "*"), t.p("recipient")),
        sender_encryption=t.str("sender_encryption", "optional", choices=SENDER_ENCRYPTION),
        recipient_encryption=t.str("recipient_encryption", upstream.tls,
                                   choices=RECIPIENT_ENCRYPTION),
    )
    if rule.recipient_encryption == "verify" and upstream.server_name is None \
            and _is_ip(upstream.host):
        raise ConfigError(t.p("recipient_encryption"),
                          f'"verify" to the upstream IP address {upstream.host} needs '
                          "upstream.server_name")
    if rule.recipient_encryption == "none" and upstream.mode == "implicit":
        raise ConfigError(t.p("recipient_encryption"),
                          '"none" is impossible: the upstream mode is "implicit" (always TLS)')
    return rule


# ---------------------------------------------------------------------------------------------
# Entry points


def parse_config(data: dict, *, source: str | None = None) -> GatewayConfig:
    """Validate decoded TOML and build the configuration. Raises ConfigError."""
    top = _Table(data, "", _TOP_KEYS)
    gateway = _parse_gateway(top.table("gateway", _GATEWAY_KEYS))
    certificates = _parse_certificates(top)
    profiles = _parse_profiles(top)
    warnings: list[str] = []

    listener_tables = top.tables("listeners", _LISTENER_KEYS)
    if not listener_tables:
        raise ConfigError("listeners", "at least one listener is required ([[listeners]])")
    listeners: list[Listener] = []
    names: dict[str, int] = {}
    binds: dict[tuple[str, int], int] = {}
    for i, t in enumerate(listener_tables):
        listener = _parse_listener(t, i, certificates, profiles, warnings)
        if listener.name in names:
            raise ConfigError(t.p("name"), f'duplicate listener name "{listener.name}" '
                                           f"(also listeners[{names[listener.name]}])")
        names[listener.name] = i
        addr = (listener.host, listener.port)
        if listener.port and addr in binds:
            other = listeners[binds[addr]].name
            raise ConfigError(t.p("bind"), f"{format_hostport(*addr)} is already bound by "
                                           f'listeners[{binds[addr]}] ("{other}")')
        binds[addr] = i
        listeners.append(listener)

    return GatewayConfig(listeners=tuple(listeners), certificates=certificates,
                         profiles=profiles, warnings=tuple(warnings), source=source, **gateway)


def load_config(path: str | os.PathLike) -> GatewayConfig:
    """Read and validate a TOML file. Raises ConfigError (with line info on a syntax error)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(name, f"cannot read the file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, f"TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, f"the file is not valid UTF-8 ({exc.reason} at byte "
                                f"{exc.start})") from None
    return parse_config(data, source=str(Path(name).resolve()))


def check_files(config: GatewayConfig) -> list[str]:
    """Checks `gateway check` makes beyond syntax: certificate/key/CA files readable, the key
    matching its certificate, `user`/`group` existing. Returns the problems found."""
    problems: list[str] = []

    def readable(path_key: str, filename: str) -> bool:
        try:
            with open(filename, "rb") as f:
                head = f.read(1 << 16)
        except OSError as exc:
            problems.append(f"{path_key}: cannot read {filename}: {exc.strerror or exc}")
            return False
        if b"-----BEGIN" not in head:
            problems.append(f"{path_key}: {filename} holds no PEM data")
            return False
        return True

    for name, cert in config.certificates.items():
        base = _key("certificates", name)
        ok = readable(f"{base}.cert", cert.cert)
        ok = readable(f"{base}.key", cert.key) and ok
        if ok:
            try:
                from OpenSSL import SSL
                ctx = SSL.Context(SSL.TLS_METHOD)
                ctx.use_certificate_chain_file(cert.cert)
                ctx.use_privatekey_file(cert.key)
                ctx.check_privatekey()
            except ImportError:  # pragma: no cover
                pass
            except Exception as exc:
                problems.append(f"{base}: the certificate and key cannot be used together "
                                f"({exc})")
    for name, profile in config.profiles.items():
        if profile.predefined:
            continue
        base = _key("tls_profiles", name)
        if profile.ca_file:
            readable(f"{base}.ca_file", profile.ca_file)
        if profile.ca_path and not os.path.isdir(profile.ca_path):
            problems.append(f"{base}.ca_path: {profile.ca_path} is not a directory")
    if config.user is not None:
        import pwd
        try:
            pwd.getpwnam(config.user)
        except KeyError:
            problems.append(f'gateway.user: no such user "{config.user}"')
    if config.group is not None:
        import grp
        try:
            grp.getgrnam(config.group)
        except KeyError:
            problems.append(f'gateway.group: no such group "{config.group}"')
    if config.tracking_log:
        directory = os.path.dirname(os.path.abspath(config.tracking_log))
        if not os.path.isdir(directory):
            problems.append(f"gateway.tracking_log: directory {directory} does not exist")
    return problems


def demo_config(sink_host: str = "127.0.0.1", sink_port: int = 2526) -> GatewayConfig:
    """The embedded configuration of `gateway run --demo` (SPEC §12)."""
    upstream = Upstream(host=sink_host, port=sink_port, mode="starttls", tls="none")
    listeners = (
        Listener(name="demo-smtp", protocol="smtp", host="127.0.0.1", port=2525,
                 upstream=upstream, type="public", tls="starttls", client_tls="optional"),
        Listener(name="demo-smtps", protocol="smtp", host="127.0.0.1", port=4465,
                 upstream=upstream, type="public", tls="implicit", client_tls="required"),
    )
    warnings = tuple(f"listeners[{i}]: no certificate; a self-signed demonstration "
                     "certificate will be generated (insecure)" for i in range(len(listeners)))
    return GatewayConfig(hostname="localhost", listeners=listeners, metrics="127.0.0.1:9108",
                         profiles=dict(PREDEFINED), warnings=warnings)
