"""What the supervisor and its workers agree on (SPEC §9): the exit code of a worker that
could not start, and the signal that retires a worker after a reload. A module of its own so
that neither imports the other for it."""
from __future__ import annotations

import signal

BOOT_ERROR = 3                 # a worker could not start (bad certificate, ...): do not loop
RETIRE_SIGNAL = signal.SIGUSR2      # supervisor → old worker after a reload
REOPEN_SIGNAL = signal.SIGUSR1      # operator → supervisor → workers: reopen the log files
