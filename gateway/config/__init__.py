"""Configuration (SPEC §12): TOML → validated, frozen dataclasses.

Every error raises gateway.errors.ConfigError naming the key path, for example
``listeners[1].rules[3].recipient`` or ``tls_profiles.partners.min_version`` (indices are
0-based); several errors in one file raise ConfigErrors (a ConfigError) listing them all. `parse_config` takes the already-decoded TOML (a dict) so tests and tools can build a
configuration without a file; `load_config` reads one. Non-fatal findings (e.g. ``esmtp = false``
on an ``optional`` listener) are returned in ``GatewayConfig.warnings``.

The package: `model` (the dataclasses), `table` (TOML tables with key paths, unknown keys),
`values` (host:port, host names, domain patterns, networks), `profiles` (the
``[tls_profiles]`` section and its OpenSSL probe), `parse` (the other sections and the entry
points), `files` (`check_files`, what `gateway check` verifies on disk).
"""
from ..errors import ConfigError, ConfigErrors
from .files import check_files
from .model import (Certificate, ClientRule, GatewayConfig, Listener, Milter, Rule, Timeouts,
                    Upstream)
from .parse import (AUTH_MODES, BARE_NEWLINE, CLIENT_LEVELS, LISTENER_TLS, LISTENER_TYPES,
                    LOG_FORMATS, PROTOCOLS, RECIPIENT_ENCRYPTION, SENDER_ENCRYPTION,
                    UPSTREAM_LEVELS, UPSTREAM_MODES, demo_config, load_config, parse_config)
from .profiles import CIPHER_STRENGTHS
from .values import (MAX_PATTERN_LENGTH, format_hostport, parse_domain_pattern,
                     parse_hostport, parse_network)

__all__ = [
    "AUTH_MODES", "BARE_NEWLINE", "CIPHER_STRENGTHS", "CLIENT_LEVELS", "Certificate",
    "ClientRule", "ConfigError", "ConfigErrors", "GatewayConfig", "LISTENER_TLS",
    "LISTENER_TYPES", "LOG_FORMATS", "Listener", "MAX_PATTERN_LENGTH", "Milter", "PROTOCOLS",
    "RECIPIENT_ENCRYPTION",
    "Rule", "SENDER_ENCRYPTION", "Timeouts", "UPSTREAM_LEVELS", "UPSTREAM_MODES", "Upstream",
    "check_files", "demo_config", "format_hostport", "load_config", "parse_config",
    "parse_domain_pattern", "parse_hostport", "parse_network",
]

# The known keys of each table, reachable here as before (a test checks that the example file
# names every one of them).
from .parse import (_CERT_KEYS, _CLIENT_RULE_KEYS, _GATEWAY_KEYS,  # noqa: E402,F401
                    _LISTENER_KEYS, _MILTER_KEYS, _RULE_KEYS, _TIMEOUT_KEYS, _TOP_KEYS, _UPSTREAM_KEYS)
from .profiles import _PROFILE_KEYS  # noqa: E402,F401
