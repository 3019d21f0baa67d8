"""Several certificates on one listener, chosen by the client's SNI (SPEC §3.4).

`SNISelector` maps a server name to the server context of the certificate entry whose
subjectAltName DNS names match it: an exact name first, then a ``*.`` wildcard (one label, as
in certificate matching); no SNI or no match: the first entry. The name comes from the
ClientHello bytes, read before the connection is built (gateway.tls.stream with the native
scanner), so OpenSSL needs no servername callback (§3.3).
"""
from __future__ import annotations

from typing import Iterable


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class SNISelector:
    """The server context for a client's SNI among a listener's certificate entries."""

    __slots__ = ("default", "_exact", "_wildcard")

    def __init__(self, entries: Iterable[tuple[object, Iterable[str]]]):
        """*entries*: (server context, its DNS names) per certificate entry, the one for no
        SNI first. A name several entries hold goes to the first of them."""
        self.default = None
        self._exact: dict[str, object] = {}
        self._wildcard: dict[str, object] = {}     # "example.com" for "*.example.com"
        for ctx, names in entries:
            if self.default is None:
                self.default = ctx
            for name in names:
                name = _norm(name)
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], ctx)
                elif name:
                    self._exact.setdefault(name, ctx)
        if self.default is None:
            raise ValueError("an SNI selector needs at least one certificate entry")

    def choose(self, server_name: str | None):
        """The context for *server_name* (None: the client sent no SNI)."""
        if not server_name:
            return self.default
        name = _norm(server_name)
        ctx = self._exact.get(name)
        if ctx is not None:
            return ctx
        _label, dot, parent = name.partition(".")
        if dot and parent:
            ctx = self._wildcard.get(parent)
            if ctx is not None:
                return ctx
        return self.default

    __call__ = choose
