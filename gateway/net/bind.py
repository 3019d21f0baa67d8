"""Listening sockets: the supervisor binds them once and keeps them (SPEC §9)."""
from __future__ import annotations

import socket


def bind_socket(listener, *, reuse_port: bool = False,
                port: int | None = None) -> socket.socket:
    """A listening stdlib socket for *listener* (a config.Listener: its host, port and
    backlog; *port* overrides the port)."""
    host = listener.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, listener.port if port is None else port))
        sock.listen(listener.backlog)
    except BaseException:
        sock.close()
        raise
    return sock
