"""Children of the supervisor die with it (SPEC §9): PR_SET_PDEATHSIG, then a getppid() check.

The kernel sends the signal when the parent *thread* exits; the supervisor is one thread
(supervisor.py forks from a single-threaded process). A credential change (setuid/setgid)
clears the setting, so a worker calls this after dropping privileges. The getppid() check
closes the window between fork() and prctl(): a supervisor that died in it is not noticed by
the kernel, but the child has been re-parented by then.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1

_libc = None


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask for *sig* when the parent dies; False when it is already gone (the caller exits).

    Where prctl is unavailable (not Linux) only the getppid() check is made."""
    global _libc
    if sys.platform.startswith("linux"):
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == parent_pid
