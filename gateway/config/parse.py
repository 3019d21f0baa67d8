"""Composition (SPEC §12): the sections of the file, their cross-checks, and the entry points
`parse_config`, `load_config` and `demo_config`."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from types import SimpleNamespace
import tomllib
from dataclasses import MISSING as dataclass_missing
from dataclasses import fields
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..levels import CipherGrade, ClientLevel, SenderEncryption, UpstreamLevel
from ..tls.grades import narrow
from ..tls.profiles import PREDEFINED, Profile
from .model import (Certificate, ClientRule, GatewayConfig, Listener, Milter, Rule, Timeouts,
                    Upstream)
from .profiles import parse_profiles
from .protocols import PROTOCOLS, Protocol
from .table import NAME_RE, Collector, Table, describe, key_path, quoted
from .values import (HOSTNAME_RE, format_hostport, is_ip, looks_like_ip, parse_domain_pattern,
                     parse_hostport, parse_network)


# ---------------------------------------------------------------------------------------------
# Vocabulary

LISTENER_TYPES = ("public", "private")
LISTENER_TLS = ("starttls", "implicit", "off")
CLIENT_LEVELS = tuple(ClientLevel)
UPSTREAM_LEVELS = tuple(UpstreamLevel)
UPSTREAM_MODES = ("starttls", "implicit")
SENDER_ENCRYPTION = tuple(SenderEncryption)
# in the order its error message lists them
RECIPIENT_ENCRYPTION = (UpstreamLevel.REQUIRED, UpstreamLevel.PREFERRED, UpstreamLevel.ALLOWED,
                        UpstreamLevel.NONE, UpstreamLevel.VERIFY)
BARE_NEWLINE = ("reject", "normalize")
AUTH_MODES = ("off", "passthrough", "required")
LOG_FORMATS = ("logfmt", "json")

_TOP_KEYS = ("gateway", "certificates", "tls_profiles", "listeners")
_GATEWAY_KEYS = ("hostname", "workers", "user", "group", "metrics", "log_format",
                 "tracking_log", "shutdown_grace", "reload_grace", "alert_recipients",
                 "alert_sender", "alert_interval", "spool_dir", "state_dir", "milter_memory",
                 "worker_timeout", "log_file", "pid_file")
_CERT_KEYS = ("cert", "key", "rsa_cert", "rsa_key")
_LISTENER_KEYS = ("name", "protocol", "type", "bind", "tls", "client_tls", "certificate",
                  "certificates", "profile", "max_connections", "backlog", "esmtp", "max_message_size",
                  "bare_newline", "proxy_protocol", "trusted_proxies", "max_recipients",
                  "received_header", "forward_client", "smtputf8", "dsn", "auth",
                  "auth_mechanisms", "timeouts", "upstream", "client_rules", "rules",
                  "pregreet_wait", "milters", "max_connections_per_ip",
                  "per_ip_ipv6_prefix")
_TIMEOUT_KEYS = tuple(f.name for f in fields(Timeouts))
_UPSTREAM_KEYS = ("address", "mode", "tls", "server_name", "profile", "certificate",
                  "pool_size", "pool_idle", "pool_max_reuse", "plaintext_auth")
_CLIENT_RULE_KEYS = ("match", "client_tls", "cipher_strength")
_RULE_KEYS = ("enabled", "sender", "recipient", "sender_encryption", "recipient_encryption")
_MILTER_KEYS = ("name", "address", "default_action", "connect_timeout", "command_timeout",
                "content_timeout")
MILTER_DEFAULT_ACTIONS = ("tempfail", "accept", "reject")

_SASL_RE = re.compile(r"[A-Z0-9_-]{1,20}\Z")
# mechanisms relayed line by line: no security layer or channel binding (SPEC §4.6)
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "XOAUTH2",
                   "OAUTHBEARER")
_ADDRESS_RE = re.compile(r"[^\s@<>]{1,64}@[A-Za-z0-9_.-]{1,253}\Z")


# ---------------------------------------------------------------------------------------------
# Sections


def _parse_gateway(t: Table | None, errors: Collector) -> dict:
    """[gateway]: each key read on its own (an error is recorded in *errors* and the default
    stands in for it), so every wrong key of the section is reported at once."""
    if t is None:
        return {"hostname": socket.getfqdn()}
    v = errors.value
    out: dict[str, Any] = {}

    def hostname() -> str:
        name = t.str("hostname", None)
        if name is None:
            return socket.getfqdn()
        if not HOSTNAME_RE.match(name):
            raise ConfigError(t.p("hostname"), f'"{name}" is not a valid host name')
        return name

    def metrics() -> str:
        value = t.str("metrics", "127.0.0.1:9108", empty_ok=True)
        if value:
            parse_hostport(value, t.p("metrics"), port_zero_ok=True)
        return value

    def alert_recipients() -> tuple[str, ...]:
        recipients = t.str_list("alert_recipients", [])
        for i, addr in enumerate(recipients):
            if not _ADDRESS_RE.match(addr):
                raise ConfigError(f"{t.p('alert_recipients')}[{i}]",
                                  f'"{addr}" is not an e-mail address (local@domain)')
        return tuple(recipients)

    def alert_sender() -> str | None:
        sender = t.str("alert_sender", None)
        if sender is not None and not _ADDRESS_RE.match(sender):
            raise ConfigError(t.p("alert_sender"), f'"{sender}" is not an e-mail address')
        return sender

    def absolute(key: str, default: str) -> str:
        path = t.str(key, default)
        if not path.startswith("/"):
            raise ConfigError(t.p(key), f'"{path}" must be an absolute path')
        return path

    def log_file() -> str:
        value = t.str("log_file", "", empty_ok=True)
        if value and value != "syslog":
            path = value[len("syslog:"):] if value.startswith("syslog:") else value
            if not path.startswith("/"):
                raise ConfigError(t.p("log_file"), f'"{value}" must be "", "syslog", '
                                                   f'"syslog:/path/of/socket" or an absolute '
                                                   f'path')
        return value

    def pid_file() -> str:
        value = t.str("pid_file", "", empty_ok=True)
        if value and not value.startswith("/"):
            raise ConfigError(t.p("pid_file"), f'"{value}" must be an absolute path')
        return value

    out["hostname"] = v(hostname, fallback="localhost")
    out["workers"] = v(t.int, "workers", 0, minimum=0, fallback=0)
    out["user"] = v(t.str, "user", None)
    out["group"] = v(t.str, "group", None)
    out["metrics"] = v(metrics, fallback="")
    out["log_format"] = v(t.str, "log_format", "logfmt", choices=LOG_FORMATS, fallback="logfmt")
    out["log_file"] = v(log_file, fallback="")
    out["pid_file"] = v(pid_file, fallback="")
    out["tracking_log"] = v(t.str, "tracking_log", None)
    out["shutdown_grace"] = v(t.seconds, "shutdown_grace", 30.0, zero_ok=True, fallback=30.0)
    out["reload_grace"] = v(t.seconds, "reload_grace", 3600.0, zero_ok=True, fallback=3600.0)
    out["worker_timeout"] = v(t.seconds, "worker_timeout", 30.0, fallback=30.0)
    out["alert_recipients"] = v(alert_recipients, fallback=())
    out["alert_sender"] = v(alert_sender)
    out["alert_interval"] = v(t.seconds, "alert_interval", 3600.0, fallback=3600.0)
    out["spool_dir"] = v(absolute, "spool_dir", "/var/lib/gateway/spool",
                         fallback="/var/lib/gateway/spool")
    out["state_dir"] = v(absolute, "state_dir", "/var/lib/gateway",
                         fallback="/var/lib/gateway")
    out["milter_memory"] = v(t.int, "milter_memory", 1048576, minimum=0, fallback=1048576)
    return out


def _parse_certificates(top: Table, errors: Collector) -> dict[str, Certificate]:
    """Every entry; one in error is recorded in *errors* and stands as a placeholder, so the
    listeners naming it are checked without a second error."""
    if not top.has("certificates"):
        return {}
    section = top.data["certificates"]
    if not isinstance(section, dict):
        raise ConfigError("certificates", f"expected a table of certificates "
                                          f"([certificates.NAME]), got {describe(section)}")
    result = {}
    for name, value in section.items():
        cert = errors.attempt(_parse_certificate, name, value)
        result[name] = cert or Certificate(name=name, cert="", key="")
    return result


def _parse_certificate(name: str, value: Any) -> Certificate:
    t = Table(value, key_path("certificates", name), _CERT_KEYS,
              what="a table with cert and key")
    cert, key = t.str("cert"), t.str("key")
    rsa_cert, rsa_key = t.str("rsa_cert", None), t.str("rsa_key", None)
    if (rsa_cert is None) != (rsa_key is None):
        missing = "rsa_key" if rsa_key is None else "rsa_cert"
        raise ConfigError(t.p(missing), "is required with "
                                        + ("rsa_cert" if missing == "rsa_key" else "rsa_key")
                                        + " (the RSA pair beside the ECDSA cert/key)")
    return Certificate(name=name, cert=cert, key=key, rsa_cert=rsa_cert, rsa_key=rsa_key)


def _ref(t: Table, key: str, known: dict, what: str, default: Any) -> Any:
    name = t.str(key, default)
    if name is not None and name not in known:
        listing = quoted(sorted(known)) if known else "none defined"
        raise ConfigError(t.p(key), f'unknown {what} "{name}" (known: {listing})')
    return name


def _same_host(bind_host: str, upstream_host: str) -> bool:
    """Does a connection to *upstream_host* reach a socket bound to *bind_host* (on the same
    port)? The same address; on a wildcard bind, any address of this machine we can tell
    without DNS (loopback, "localhost", the wildcard); on a loopback bind, "localhost" and the
    wildcard (a connection to 0.0.0.0 goes to the loopback)."""
    def kind(host: str) -> str | None:
        if host.lower().rstrip(".") == "localhost":
            return "localhost"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        return "any" if ip.is_unspecified else "loopback" if ip.is_loopback else None

    if bind_host.lower() == upstream_host.lower():
        return True
    bind, up = kind(bind_host), kind(upstream_host)
    if bind == "any":
        return up is not None
    if bind == "loopback":
        return up in ("any", "localhost")
    return False


def _has_ca(profile: Profile) -> bool:
    return bool(profile.ca_file or profile.ca_path)


def _parse_upstream(t: Table, certificates, profiles, errors: Collector) -> Upstream:
    """[listeners.upstream]: each key on its own (errors recorded in *errors*, a harmless
    default standing in), then the checks between keys on what could be read."""
    v = errors.value
    host, port = v(lambda: parse_hostport(t.raw("address"), t.p("address")),
                   fallback=("", 0))
    mode = v(t.str, "mode", "starttls", choices=UPSTREAM_MODES, fallback="starttls")
    level = v(t.choice, "tls", UpstreamLevel, UpstreamLevel.PREFERRED,
              fallback=UpstreamLevel.PREFERRED)

    def server_name_of() -> str | None:
        name = t.str("server_name", None)
        if name is not None and not HOSTNAME_RE.match(name):
            raise ConfigError(t.p("server_name"), f'"{name}" is not a valid host name')
        return name

    server_name = v(server_name_of)
    profile = v(_ref, t, "profile", profiles, "TLS profile", "default", fallback="default")
    certificate = v(_ref, t, "certificate", certificates, "certificate", None)
    if mode == "implicit" and level is UpstreamLevel.NONE:
        errors.errors.append(ConfigError(t.p("tls"), 'mode = "implicit" always uses TLS; '
                                                     'tls = "none" contradicts it'))
    if level is UpstreamLevel.VERIFY and server_name is None and host and is_ip(host):
        errors.errors.append(ConfigError(
            t.p("tls"), f'"verify" to the IP address {host} needs server_name '
                        "(the name to verify the certificate against)"))
    return Upstream(host=host, port=port, mode=mode, tls=level, server_name=server_name,
                    profile=profile, certificate=certificate,
                    pool_size=v(t.int, "pool_size", 16, minimum=0, maximum=10000, fallback=16),
                    pool_idle=v(t.seconds, "pool_idle", 5.0, fallback=5.0),
                    pool_max_reuse=v(t.int, "pool_max_reuse", 100, minimum=1, fallback=100),
                    plaintext_auth=v(t.bool, "plaintext_auth", False, fallback=False))


def _client_level(t: Table, mode: str, profile: Profile | None,
                  profile_name: str) -> ClientLevel:
    """client_tls with its listener's TLS mode (§2): the default and what is impossible."""
    level = t.choice("client_tls", ClientLevel, None)
    if mode == "implicit":
        if level is ClientLevel.NONE:
            raise ConfigError(t.p("client_tls"), 'cannot be "none" on a tls = "implicit" '
                                                 "listener (every session is TLS)")
        if level in (None, ClientLevel.OPTIONAL):
            level = ClientLevel.REQUIRED
    elif mode == "off":
        if level is not None and level.requires_tls:
            raise ConfigError(t.p("client_tls"), f'cannot be "{level}" on a tls = "off" '
                                                 "listener (it never offers TLS)")
        level = level or ClientLevel.NONE
    else:
        level = level or ClientLevel.OPTIONAL
    if level is ClientLevel.VERIFY and profile is not None and not _has_ca(profile):
        raise ConfigError(t.p("client_tls"), f'"verify" needs a profile with ca_file or '
                                             f'ca_path; profile "{profile_name}" has neither')
    return level


def _auth_mechanisms(t: Table, auth: str) -> tuple[str, ...]:
    mechanisms = t.str_list("auth_mechanisms", ["PLAIN", "LOGIN"])
    mechs = []
    for i, mech in enumerate(mechanisms):
        if not _SASL_RE.match(mech.upper()):
            raise ConfigError(f"{t.p('auth_mechanisms')}[{i}]",
                              f'"{mech}" is not a SASL mechanism name')
        if mech.upper() not in AUTH_MECHANISMS:
            raise ConfigError(f"{t.p('auth_mechanisms')}[{i}]",
                              f'"{mech}" cannot be relayed (it needs a security layer or '
                              f'channel binding); use {quoted(AUTH_MECHANISMS)}')
        mechs.append(mech.upper())
    if auth != "off" and not mechs:
        raise ConfigError(t.p("auth_mechanisms"), "must name at least one mechanism")
    return tuple(mechs)


def _timeouts(t: Table, errors: Collector) -> Timeouts:
    timeouts_t = errors.value(t.table, "timeouts", _TIMEOUT_KEYS, errors)
    timeouts = Timeouts()
    if timeouts_t is None:
        return timeouts
    return Timeouts(**{
        k: errors.value(timeouts_t.int, k, 1024, minimum=0, fallback=1024)
        if k == "data_min_rate" else
        errors.value(timeouts_t.seconds, k, getattr(timeouts, k), fallback=getattr(timeouts, k))
        for k in _TIMEOUT_KEYS})


def _parse_listener(t: Table, index: int, certificates, profiles,
                    warnings: list[str]) -> Listener:
    """One [[listeners]] table. Every key is read on its own and every check between keys
    runs on what could be read (a wrong value stands in as a harmless default), so all of a
    listener's errors are reported at once (SPEC §12); then they are raised together.
    The groups of keys are read in turn, each into `errors`: what the listener is and
    where it binds, then what the later groups check against it."""
    errors = Collector()
    f = _listener_identity(t, index, certificates, profiles, errors)
    protocol, mode, level = f["protocol"], f["tls"], f["client_tls"]
    profile = profiles.get(f["profile"]) if f["profile"] is not None else None
    f["esmtp"] = _listener_esmtp(t, protocol, mode, level, errors, warnings)
    f["auth"], f["auth_mechanisms"] = _listener_auth(t, protocol, level, errors)
    f["proxy_protocol"], f["trusted_proxies"] = _listener_proxy(t, errors)
    f["timeouts"] = _timeouts(t, errors)
    f["upstream"] = _listener_upstream(t, f["host"], f["port"], f["auth"], certificates,
                                       profiles, errors, warnings)
    f.update(_listener_rules(t, protocol, mode, level, profile, f["profile"], f["upstream"],
                             errors))
    if f["certificate"] is None and not f["certificates"] and (
            mode == "implicit" or (mode == "starttls" and level.offers_tls)):
        warnings.append(f"{t.path}: no certificate; a self-signed demonstration certificate "
                        "will be generated (insecure)")
    f.update(_listener_limits(t, errors))
    errors.raise_all()
    return Listener(**f)


def _listener_identity(t: Table, index: int, certificates, profiles,
                       errors: Collector) -> dict:
    """name, protocol, type and bind; the client side's TLS: tls mode, certificate(s),
    profile and client_tls (checked against the profile)."""
    v = errors.value

    def name_of() -> str:
        name = t.str("name")
        if not NAME_RE.match(name):
            raise ConfigError(t.p("name"), f'"{name}" may contain only letters, digits, '
                                           '".", "_" and "-"')
        return name

    name = v(name_of, fallback=f"listeners[{index}]")
    protocol = Protocol(v(t.str, "protocol", "smtp", choices=PROTOCOLS, fallback="smtp"))
    ltype = v(t.str, "type", "public", choices=LISTENER_TYPES, fallback="public")
    host, port = v(lambda: parse_hostport(t.raw("bind"), t.p("bind"), port_zero_ok=True),
                   fallback=("", 0))
    mode = v(t.str, "tls", "starttls", choices=LISTENER_TLS, fallback="starttls")
    certificate = v(_ref, t, "certificate", certificates, "certificate", None)
    several = v(_certificate_list, t, certificates, fallback=())
    profile_name = v(_ref, t, "profile", profiles, "TLS profile", "default")
    profile = profiles.get(profile_name) if profile_name is not None else None
    level = v(_client_level, t, mode, profile, profile_name,
              fallback=ClientLevel.REQUIRED if mode == "implicit" else ClientLevel.OPTIONAL)
    return dict(name=name, protocol=protocol, type=ltype, host=host, port=port, tls=mode,
                certificate=certificate, certificates=several, profile=profile_name,
                client_tls=level)


def _listener_esmtp(t: Table, protocol: Protocol, mode: str, level: ClientLevel,
                    errors: Collector, warnings: list[str]) -> bool:
    """`esmtp`: false takes STARTTLS away, so a client_tls that needs TLS is an error."""
    esmtp = errors.value(t.bool, "esmtp", True, fallback=True)
    if protocol.esmtp_switch and mode == "starttls" and not esmtp:
        if level.requires_tls:
            errors.errors.append(ConfigError(
                t.p("esmtp"), f'esmtp = false offers no STARTTLS, so client_tls = "{level}" '
                              f'could never be met'))
        if level is ClientLevel.OPTIONAL:
            warnings.append(f"{t.path}: esmtp = false disables STARTTLS")
    return esmtp


def _listener_auth(t: Table, protocol: Protocol, level: ClientLevel,
                   errors: Collector) -> tuple[str, tuple[str, ...]]:
    """`auth` and `auth_mechanisms`: SMTP only, and only where the client may have TLS."""
    auth = errors.value(t.str, "auth", "off", choices=AUTH_MODES, fallback="off")
    if auth != "off" and not level.offers_tls:
        errors.errors.append(ConfigError(t.p("auth"), f'auth = "{auth}" needs TLS; this '
                                                      'listener\'s client_tls is "none"'))
    if auth != "off" and not protocol.takes_auth:
        errors.errors.append(ConfigError(t.p("auth"), "applies to SMTP listeners only (IMAP "
                                                      "relays its LOGIN/AUTHENTICATE already)"))
    mechs = errors.value(_auth_mechanisms, t, auth, fallback=("PLAIN",))
    return auth, mechs


def _listener_proxy(t: Table, errors: Collector) -> tuple[bool, tuple | None]:
    """`proxy_protocol` and the `trusted_proxies` it needs."""
    proxy_protocol = errors.value(t.bool, "proxy_protocol", False, fallback=False)
    trusted = errors.value(
        lambda: tuple(parse_network(n, f"{t.p('trusted_proxies')}[{i}]")
                      for i, n in enumerate(t.str_list("trusted_proxies", []))),
        fallback=None)
    if proxy_protocol and trusted == ():
        errors.errors.append(ConfigError(
            t.p("trusted_proxies"), "proxy_protocol = true needs the addresses of the proxies "
                                    "in trusted_proxies"))
    return proxy_protocol, trusted


def _listener_upstream(t: Table, host: str, port: int, auth: str, certificates, profiles,
                       errors: Collector, warnings: list[str]):
    """[listeners.upstream] (required), checked against the listener: not its own bind
    address, and a TLS leg for relayed AUTH credentials unless plaintext_auth says so."""
    upstream = None
    if not t.has("upstream"):
        errors.errors.append(ConfigError(t.p("upstream"), "is required ([listeners.upstream] "
                                                          "with address)"))
    else:
        upstream_t = errors.value(t.table, "upstream", _UPSTREAM_KEYS, errors)
        if upstream_t is not None:
            upstream = _parse_upstream(upstream_t, certificates, profiles, errors)
    if upstream is not None and port and upstream.port == port \
            and _same_host(host, upstream.host):
        errors.errors.append(ConfigError(
            f"{t.p('upstream')}.address",
            f"{format_hostport(upstream.host, upstream.port)} is this listener's own bind "
            f"address {format_hostport(host, port)} (the gateway would relay to itself)"))
    if upstream is not None and auth != "off" and not upstream.tls.requires_tls:
        # credentials cross only a TLS leg, unless the operator says the link is safe
        if not upstream.plaintext_auth:
            errors.errors.append(ConfigError(
                f"{t.p('upstream')}.tls",
                f'auth = "{auth}" sends credentials upstream: tls must be "required" or '
                f'"verify" (or set upstream.plaintext_auth = true for a link protected '
                f'otherwise), not "{upstream.tls}"'))
        else:
            warnings.append(f"{t.path}: upstream.plaintext_auth = true: AUTH credentials may "
                            f"cross the upstream link in plaintext")
    return upstream


def _listener_rules(t: Table, protocol: Protocol, mode: str, level: ClientLevel, profile,
                    profile_name: str | None, upstream, errors: Collector) -> dict:
    """client_rules (narrowing the profile), encryption rules (SMTP only, read against the
    upstream), pregreet_wait and milters."""
    v = errors.value
    client_rules = []
    if profile is not None:               # rules narrow the profile: checked against it
        client_rules = [errors.attempt(_parse_client_rule, rt, mode, level, protocol, profile,
                                       profile_name)
                        for rt in v(t.tables, "client_rules", _CLIENT_RULE_KEYS, errors,
                                    fallback=[])]
    rule_tables = v(t.tables, "rules", _RULE_KEYS, errors, fallback=[])
    if t.data.get("rules") and not protocol.takes_rules:
        errors.errors.append(ConfigError(t.p("rules"), "encryption rules apply to SMTP "
                                                       "listeners only"))
    rules = [errors.attempt(_parse_rule, rt, upstream) for rt in rule_tables] \
        if upstream is not None else []
    pregreet_wait = v(_pregreet_wait, t, protocol, mode, fallback=0.0)
    milters = v(_parse_milters, t, protocol, fallback=())
    return dict(client_rules=tuple(client_rules), rules=tuple(rules),
                pregreet_wait=pregreet_wait, milters=tuple(milters))


def _listener_limits(t: Table, errors: Collector) -> dict:
    """The limits and switches of a session: connections, message size, recipients, the
    bare-newline policy, headers and extensions."""
    v = errors.value
    return dict(
        max_connections=v(t.int, "max_connections", 1000, minimum=1, fallback=1000),
        max_connections_per_ip=v(t.int, "max_connections_per_ip", 50, minimum=0, fallback=50),
        per_ip_ipv6_prefix=v(t.int, "per_ip_ipv6_prefix", 64, minimum=16, maximum=128,
                             fallback=64),
        backlog=v(t.int, "backlog", 50, minimum=1, fallback=50),
        max_message_size=v(t.int, "max_message_size", 52428800, minimum=1,
                           fallback=52428800),
        bare_newline=v(t.str, "bare_newline", "reject", choices=BARE_NEWLINE,
                       fallback="reject"),
        max_recipients=v(t.int, "max_recipients", 1000, minimum=1, fallback=1000),
        received_header=v(t.bool, "received_header", True, fallback=True),
        forward_client=v(t.bool, "forward_client", False, fallback=False),
        smtputf8=v(t.bool, "smtputf8", True, fallback=True),
        dsn=v(t.bool, "dsn", False, fallback=False),
    )


def _parse_milters(t: Table, protocol: Protocol) -> tuple[Milter, ...]:
    """`[[listeners.milters]]` in order (§4.7): SMTP only, names unique."""
    milter_tables = t.tables("milters", _MILTER_KEYS)
    if milter_tables and not protocol.takes_milters:
        raise ConfigError(t.p("milters"), "milters apply to SMTP listeners only")
    milters: list[Milter] = []
    for mt in milter_tables:
        milter = _parse_milter(mt)
        for j, other in enumerate(milters):
            if other.name == milter.name:
                raise ConfigError(mt.p("name"), f'duplicate milter name "{milter.name}" '
                                                f"(also {t.p('milters')}[{j}])")
        milters.append(milter)
    return tuple(milters)


def _certificate_list(t: Table, certificates) -> tuple[str, ...]:
    """`certificates = ["main", "org", ...]`: several, chosen by the client's SNI (§3.4)."""
    if not t.has("certificates"):
        return ()
    if t.has("certificate"):
        raise ConfigError(t.p("certificates"), "set either certificate or certificates, "
                                               "not both")
    names = t.str_list("certificates")
    if not names:
        raise ConfigError(t.p("certificates"), "must name at least one certificate")
    for i, name in enumerate(names):
        if name not in certificates:
            listing = quoted(sorted(certificates)) if certificates else "none defined"
            raise ConfigError(f"{t.p('certificates')}[{i}]",
                              f'unknown certificate "{name}" (known: {listing})')
        if name in names[:i]:
            raise ConfigError(f"{t.p('certificates')}[{i}]", f'"{name}" is listed twice')
    return tuple(names)


def _pregreet_wait(t: Table, protocol: Protocol, mode: str) -> float:
    """`pregreet_wait` (§4.1): only where the greeting is plaintext SMTP."""
    wait = t.seconds("pregreet_wait", 0.0, zero_ok=True)
    if wait and (not protocol.takes_pregreet or mode == "implicit"):
        raise ConfigError(t.p("pregreet_wait"), "applies to SMTP listeners that greet in "
                                                'plaintext (tls = "starttls" or "off")')
    return wait


def _parse_milter(t: Table) -> Milter:
    name = t.str("name")
    if not NAME_RE.match(name):
        raise ConfigError(t.p("name"), f'"{name}" may contain only letters, digits, '
                                       '".", "_" and "-"')
    address = t.str("address")
    kind, sep, rest = address.partition(":")
    if kind == "inet" and sep:
        parse_hostport(rest, t.p("address"))
    elif kind != "unix" or not sep or not rest.startswith("/"):
        raise ConfigError(t.p("address"), f'"{address}" is not a milter address '
                                          '(inet:HOST:PORT or unix:/path)')
    return Milter(
        name=name, address=address,
        default_action=t.str("default_action", "tempfail", choices=MILTER_DEFAULT_ACTIONS),
        connect_timeout=t.seconds("connect_timeout", 30.0),
        command_timeout=t.seconds("command_timeout", 30.0),
        content_timeout=t.seconds("content_timeout", 300.0))


def _parse_client_rule(t: Table, mode: str, listener_level: ClientLevel, protocol: Protocol,
                       profile: Profile, profile_name: str) -> ClientRule:
    raw = t.str("match")
    by_network = looks_like_ip(raw.strip())
    match = parse_network(raw, t.p("match")) if by_network \
        else parse_domain_pattern(raw, t.p("match"))
    level = t.choice("client_tls", ClientLevel, None)
    strength = t.choice("cipher_strength", CipherGrade, None)
    if level is None and strength is None:
        raise ConfigError(t.path, "a client rule must set client_tls or cipher_strength")
    if not by_network:
        if not protocol.knows_sender:
            raise ConfigError(t.p("match"), "sender-domain rules apply to SMTP listeners only")
        if not listener_level.offers_tls:
            raise ConfigError(t.p("match"), "a sender-domain rule cannot apply on a listener "
                                            'whose client_tls is "none" (no TLS is offered)')
        if level is ClientLevel.NONE:
            raise ConfigError(t.p("client_tls"), 'a sender-domain rule can only tighten; '
                                                 '"none" is not allowed')
    if mode == "implicit":
        if level is ClientLevel.NONE:
            raise ConfigError(t.p("client_tls"), 'cannot be "none" on a tls = "implicit" '
                                                 "listener")
        if level is ClientLevel.OPTIONAL:
            level = ClientLevel.REQUIRED
    elif mode == "off":
        if level is not None and level.requires_tls:
            raise ConfigError(t.p("client_tls"), f'cannot be "{level}" on a tls = "off" '
                                                 "listener")
        if strength is not None:
            raise ConfigError(t.p("cipher_strength"), 'has no effect on a tls = "off" listener')
    if level is ClientLevel.VERIFY and not _has_ca(profile):
        raise ConfigError(t.p("client_tls"), f'"verify" needs a profile with ca_file or '
                                             f'ca_path; profile "{profile_name}" has neither')
    if strength is not None and by_network:
        try:                                # the grade narrows the profile's list (§3.3)
            narrow(profile.ciphers, strength)
        except ValueError as exc:
            raise ConfigError(t.p("cipher_strength"),
                              f'profile "{profile_name}": {exc}') from None
    return ClientRule(match=match, client_tls=level, cipher_strength=strength)


def _parse_rule(t: Table, upstream: Upstream) -> Rule:
    rule = Rule(
        enabled=t.bool("enabled", True),
        sender=parse_domain_pattern(t.raw("sender", "*"), t.p("sender")),
        recipient=parse_domain_pattern(t.raw("recipient", "*"), t.p("recipient")),
        sender_encryption=t.choice("sender_encryption", SenderEncryption,
                                   SenderEncryption.OPTIONAL),
        recipient_encryption=t.choice("recipient_encryption", UpstreamLevel, upstream.tls,
                                      choices=RECIPIENT_ENCRYPTION),
    )
    if rule.recipient_encryption is UpstreamLevel.VERIFY and upstream.server_name is None \
            and is_ip(upstream.host):
        raise ConfigError(t.p("recipient_encryption"),
                          f'"verify" to the upstream IP address {upstream.host} needs '
                          "upstream.server_name")
    if rule.recipient_encryption is UpstreamLevel.NONE and upstream.mode == "implicit":
        raise ConfigError(t.p("recipient_encryption"),
                          '"none" is impossible: the upstream mode is "implicit" (always TLS)')
    return rule


# ---------------------------------------------------------------------------------------------
# Entry points


def parse_config(data: dict, *, source: str | None = None) -> GatewayConfig:
    """Validate decoded TOML and build the configuration. Raises ConfigError: the error, or
    ConfigErrors listing every error found when there are several (the sections, each
    profile, certificate, listener and rule are checked independently)."""
    errors = Collector()
    top = Table(data, "", _TOP_KEYS)
    gateway = errors.attempt(lambda: _parse_gateway(top.table("gateway", _GATEWAY_KEYS, errors),
                                                    errors))
    certificates = errors.attempt(_parse_certificates, top, errors)
    if certificates is None:              # the section is not a table of tables
        certificates = {}
    profiles = errors.attempt(parse_profiles, top, errors)
    if profiles is None:
        profiles = dict(PREDEFINED)
    warnings: list[str] = []

    listener_tables = errors.attempt(top.tables, "listeners", _LISTENER_KEYS, errors,
                                     read_on=True) or []
    if top.data.get("listeners", []) == []:
        errors.attempt(_no_listener)
    listeners: list[tuple[int, Listener]] = []
    names: dict[str, int] = {}
    binds: dict[tuple[str, int], int] = {}
    for t in listener_tables:
        i = t.index                       # its place in the file (a table in error is skipped)
        listener = errors.attempt(_parse_listener, t, i, certificates, profiles, warnings)
        if listener is None:
            continue
        if listener.name in names:
            errors.errors.append(ConfigError(
                t.p("name"), f'duplicate listener name "{listener.name}" '
                             f"(also listeners[{names[listener.name]}])"))
        names.setdefault(listener.name, i)
        addr = (listener.host, listener.port)
        if listener.port and addr in binds:
            other = next(lst.name for j, lst in listeners if j == binds[addr])
            errors.errors.append(ConfigError(
                t.p("bind"), f"{format_hostport(*addr)} is already bound by "
                             f'listeners[{binds[addr]}] ("{other}")'))
        binds.setdefault(addr, i)
        listeners.append((i, listener))
    try:
        errors.raise_all()
    except ConfigError as exc:
        # what could be read, for the file checks (SPEC §12: a wrong value does not hide a
        # missing certificate): check_files(exc.partial)
        known = {f.name: f.default for f in dataclass_fields(GatewayConfig)
                 if f.default is not dataclass_missing}
        known.update(gateway or {})
        known.update(certificates={n: c for n, c in certificates.items() if c.cert},
                     profiles=profiles, listeners=tuple(lst for _, lst in listeners))
        exc.partial = SimpleNamespace(**known)
        raise
    if gateway is None:                   # pragma: no cover - its error was raised above
        raise AssertionError("unreachable")

    return GatewayConfig(listeners=tuple(lst for _, lst in listeners), certificates=certificates,
                         profiles=profiles, warnings=tuple(warnings), source=source, **gateway)


def _no_listener() -> None:
    raise ConfigError("listeners", "at least one listener is required ([[listeners]])")


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


def demo_config(sink_host: str = "127.0.0.1", sink_port: int = 2526) -> GatewayConfig:
    """The embedded configuration of `gateway run --demo` (SPEC §12)."""
    upstream = Upstream(host=sink_host, port=sink_port, mode="starttls", tls=UpstreamLevel.NONE)
    listeners = (
        Listener(name="demo-smtp", protocol="smtp", host="127.0.0.1", port=2525,
                 upstream=upstream, type="public", tls="starttls",
                 client_tls=ClientLevel.OPTIONAL),
        Listener(name="demo-smtps", protocol="smtp", host="127.0.0.1", port=4465,
                 upstream=upstream, type="public", tls="implicit",
                 client_tls=ClientLevel.REQUIRED),
    )
    warnings = tuple(f"listeners[{i}]: no certificate; a self-signed demonstration "
                     "certificate will be generated (insecure)" for i in range(len(listeners)))
    return GatewayConfig(hostname="localhost", listeners=listeners, metrics="127.0.0.1:9108",
                         profiles=dict(PREDEFINED), warnings=warnings)
