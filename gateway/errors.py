"""Exceptions shared across the gateway's layers."""


class GatewayError(Exception):
    """Base class of the gateway's own errors."""


class ConfigError(GatewayError):
    """A configuration error; `path` names the key (e.g. ``listeners[1].rules[3].recipient``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class TLSError(GatewayError):
    """A TLS handshake or record-layer failure; `reason` is a short human-readable cause."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class ProtocolError(GatewayError):
    """A peer broke the protocol (bad reply, response injection, oversized reply)."""


class ConfigErrors(ConfigError):
    """Several configuration errors found in one pass; `errors` holds each (a ConfigError).

    It is a ConfigError whose message lists them all; a single error is raised as itself
    (see gateway.config.table.raise_all)."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        listing = "; ".join(str(e) for e in self.errors)
        super().__init__("", f"{len(self.errors)} configuration errors: {listing}")
