"""The typed configuration: frozen dataclasses the parser builds and the gateway reads.

Levels and grades are the types of `gateway.levels`; a level given as its word (by a
test or a tool building a configuration by hand) becomes the member on construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..levels import CipherGrade, ClientLevel, SenderEncryption, UpstreamLevel
from .protocols import Protocol
from ..tls.profiles import Profile


def _as_levels(obj, **kinds) -> None:
    """Turn the named fields of the frozen *obj* given as words into members of their kind."""
    for name, kind in kinds.items():
        value = getattr(obj, name)
        if value is not None and not isinstance(value, kind):
            object.__setattr__(obj, name, kind(value))


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
    data_min_rate: float = 1024       # bytes/s DATA keeps up after `data` seconds (0 = off)


@dataclass(frozen=True)
class Certificate:
    name: str
    cert: str            # path of the chain PEM
    key: str             # path of the key PEM
    rsa_cert: str | None = None   # an RSA pair beside an ECDSA cert/key (SPEC §3.4)
    rsa_key: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """(chain PEM path, key PEM path) of each pair, the cert/key one first."""
        out = [(self.cert, self.key)]
        if self.rsa_cert is not None and self.rsa_key is not None:
            out.append((self.rsa_cert, self.rsa_key))
        return out


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    mode: str = "starttls"            # starttls | implicit
    tls: UpstreamLevel = UpstreamLevel.PREFERRED
    server_name: str | None = None
    profile: str = "default"
    certificate: str | None = None    # name in GatewayConfig.certificates
    # idle connections kept per worker for later sessions (SMTP, §4.4; 0 = none)
    pool_size: int = 16
    pool_idle: float = 5.0            # seconds an idle pooled connection is kept
    pool_max_reuse: int = 100         # client sessions one connection serves at most
    plaintext_auth: bool = False      # AUTH may cross a plaintext upstream leg (§4.6)

    def __post_init__(self):
        _as_levels(self, tls=UpstreamLevel)


@dataclass(frozen=True)
class ClientRule:
    match: str                        # CIDR / IP, or a sender domain pattern
    client_tls: ClientLevel | None = None
    cipher_strength: CipherGrade | None = None

    def __post_init__(self):
        _as_levels(self, client_tls=ClientLevel, cipher_strength=CipherGrade)

    @property
    def is_network(self) -> bool:
        """True for a rule by client address (normalised CIDR), False for a sender domain."""
        return "/" in self.match


@dataclass(frozen=True)
class Rule:
    sender: str = "*"
    recipient: str = "*"
    sender_encryption: SenderEncryption = SenderEncryption.OPTIONAL
    recipient_encryption: UpstreamLevel = UpstreamLevel.PREFERRED
    enabled: bool = True

    def __post_init__(self):
        _as_levels(self, sender_encryption=SenderEncryption,
                   recipient_encryption=UpstreamLevel)


@dataclass(frozen=True)
class Milter:
    """One content filter of a listener (SPEC §4.7), spoken to over the milter protocol."""
    name: str
    address: str                      # inet:HOST:PORT | unix:/path
    default_action: str = "tempfail"  # tempfail | accept | reject: when it fails
    connect_timeout: float = 30
    command_timeout: float = 30
    content_timeout: float = 300


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: Protocol                # smtp | imap: ask its capabilities, not its name
    host: str
    port: int
    upstream: Upstream
    type: str = "public"              # public | private
    tls: str = "starttls"             # starttls | implicit | off
    client_tls: ClientLevel = ClientLevel.OPTIONAL   # the default depends on tls (§2)
    certificate: str | None = None    # None → demo certificate when TLS is needed
    certificates: tuple[str, ...] = ()   # several, chosen by SNI (§3.4); instead of certificate
    profile: str = "default"
    max_connections: int = 1000
    max_connections_per_ip: int = 50  # one client address across workers; 0: no limit (§2)
    per_ip_ipv6_prefix: int = 64      # IPv6 clients count per network of this prefix length
    backlog: int = 50
    esmtp: bool = True
    max_message_size: int = 52428800
    bare_newline: str = "reject"      # reject | normalize
    proxy_protocol: bool = False
    trusted_proxies: tuple[str, ...] = ()
    max_recipients: int = 1000
    received_header: bool = True
    forward_client: bool = False
    pregreet_wait: float = 0.0        # seconds between "220-" and the final "220 " (§4.1)
    smtputf8: bool = True
    dsn: bool = False
    auth: str = "off"
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    timeouts: Timeouts = field(default_factory=Timeouts)
    client_rules: tuple[ClientRule, ...] = ()
    rules: tuple[Rule, ...] = ()
    milters: tuple[Milter, ...] = ()  # content filters, in order (SMTP only, §4.7)

    def __post_init__(self):
        _as_levels(self, client_tls=ClientLevel, protocol=Protocol)

    @property
    def offers_client_tls(self) -> bool:
        """Does the listener's level, or a client rule's, offer TLS to a client?"""
        return self.client_tls.offers_tls or any(
            r.client_tls is not None and r.client_tls.offers_tls for r in self.client_rules)

    @property
    def verifies_clients(self) -> bool:
        """Needs client verify: does the listener's level, or a client rule's, ask for a
        client certificate that verifies (so the server context requests one)?"""
        return self.client_tls.verifies or any(
            r.client_tls is not None and r.client_tls.verifies for r in self.client_rules)

    @property
    def verifies_upstream(self) -> bool:
        """Needs upstream verify: does the upstream's level, or a rule's recipient
        encryption, ask for an upstream certificate that verifies?"""
        return self.upstream.tls.verifies or any(
            r.recipient_encryption.verifies for r in self.rules)

    @property
    def certificate_names(self) -> tuple[str, ...]:
        """The certificate entries the listener serves, the one for no SNI first; () for the
        demonstration certificate."""
        if self.certificates:
            return self.certificates
        return (self.certificate,) if self.certificate is not None else ()


@dataclass(frozen=True)
class GatewayConfig:
    hostname: str
    listeners: tuple[Listener, ...]
    workers: int = 0
    user: str | None = None
    group: str | None = None
    metrics: str = "127.0.0.1:9108"
    log_format: str = "logfmt"
    log_file: str = ""                # "" stderr; a path; "syslog" or "syslog:/socket" (§9)
    pid_file: str = ""                # written after binding, removed at exit (§9)
    tracking_log: str | None = None
    shutdown_grace: float = 30
    reload_grace: float = 3600        # relayed IMAP sessions kept by a retired generation (§9)
    worker_timeout: float = 30        # heartbeat age after which a worker is replaced (§9)
    alert_recipients: tuple[str, ...] = ()   # alert e-mail (§8); empty: none is sent
    alert_sender: str | None = None          # default postmaster@<hostname>
    alert_interval: float = 3600             # at most one e-mail per domain and reason
    spool_dir: str = "/var/lib/gateway/spool"   # messages held for milters beyond memory
    state_dir: str = "/var/lib/gateway"      # state.sqlite: what workers share (alerts, §8)
    milter_memory: int = 1048576             # octets of one message held in memory (§4.7)
    certificates: dict[str, Certificate] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)   # predefined + operator
    warnings: tuple[str, ...] = ()        # non-fatal findings, for `gateway check` and the log
    single_process: bool = False          # `gateway run --single-process`: no forked workers
    source: str | None = None             # the file it was loaded from (for reload), if any
