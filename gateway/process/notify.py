"""systemd's readiness protocol (sd_notify, SPEC §9), without a library: one datagram of
``KEY=VALUE`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
address when it starts with ``@``). Without that variable (not under systemd, or a unit that
is not ``Type=notify``) nothing is sent. Sending never raises and never blocks: a lost
notification makes systemd wait for its timeout, a raised one would stop the gateway."""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One notification: ``send(READY=1, STATUS="serving")``; True when it was sent."""
        if self.address is None:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(text.encode("utf-8"), self.address)
        except OSError:
            return False
        return True

    def reloading(self, status: str) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC time systemd (253+, Type=notify-reload)
        expects beside it; older systemd ignores the extra field."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)
