"""TLS for the gateway: profiles (pure data), OpenSSL contexts, certificates, a trio stream.

    from gateway.tls import server_context, client_context, TLSStream
"""
from .context import client_context, server_context
from .profiles import PREDEFINED, Profile, clone, validate_profile
from .stream import TLSInfo, TLSStream

__all__ = ["PREDEFINED", "Profile", "TLSInfo", "TLSStream", "client_context", "clone",
           "server_context", "validate_profile"]
