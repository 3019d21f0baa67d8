"""One instance per address (SPEC §9).

Every worker slot has its own SO_REUSEPORT socket, and the kernel lets any other process of
the same user join such a group: a second `gateway run` would silently share the traffic with
the first. So the supervisor, before binding its group, probes each address with a bind
without SO_REUSEPORT (`probe`: it fails against any listening socket, SO_REUSEPORT or not),
and after listen() looks in /proc/net/tcp and tcp6 for a LISTEN socket on the address whose
inode is not one of its own (`foreign_listener`: closes the race between probe and bind).
"""
from __future__ import annotations

import os
import socket
import sys

ALREADY_SERVED = "already served by another process"
_LISTEN = "0A"


def probe(host: str, port: int) -> None:
    """Bind (SO_REUSEADDR, so TIME_WAIT leftovers do not count; no SO_REUSEPORT) and close.
    Raises OSError: EADDRINUSE when a socket listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))


def _decode(hex_addr: str, family: int) -> tuple[str, int]:
    """'0100007F:0019' (each 32-bit word in host byte order) -> ('127.0.0.1', 25)."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw), int(port, 16)


def listening(family: int, proc_root: str = "/proc") -> list[tuple[str, int, int]]:
    """(address, port, inode) of every LISTEN TCP socket of *family* in this network
    namespace; [] when /proc cannot be read."""
    name = "tcp6" if family == socket.AF_INET6 else "tcp"
    try:
        with open(os.path.join(proc_root, "net", name)) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        try:
            host, port = _decode(fields[1], family)
            out.append((host, port, int(fields[9])))
        except ValueError:
            continue
    return out


def foreign_listener(sockets: list[socket.socket], proc_root: str = "/proc") -> bool:
    """Does another socket listen on the address these (one SO_REUSEPORT group) are bound
    to? The same port on the same address, or a wildcard on either side."""
    first = sockets[0]
    family = first.family
    host, port = first.getsockname()[:2]
    ours = {os.fstat(s.fileno()).st_ino for s in sockets}
    wildcard = {"0.0.0.0", "::"}
    for other_host, other_port, inode in listening(family, proc_root):
        if other_port != port or inode in ours:
            continue
        if other_host == host or other_host in wildcard or host in wildcard:
            return True
    return False
