"""Where a message waits for its milters (SPEC §4.7): memory, then an unlinked file.

`Spool` keeps up to `memory` octets in memory; beyond that everything moves to a file in
`spool_dir` that has no name from the moment it exists (``O_TMPFILE``, or created 0600 and
unlinked at once where the file system lacks it), so nothing is left on disk when the
process ends, however it ends (a crash, ``kill -9``). Writes and reads are plain system calls:
they go to the page cache, as a queue file's would.

`prepare_spool_dir()` creates the directory 0700 for the workers' user at start.
"""
from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import tempfile

READ_SIZE = 262144


class SpoolError(Exception):
    """The spool file could not be created or written (a full disk, a missing directory)."""


class Spool:
    def __init__(self, directory: str, memory: int):
        self.directory = directory
        self.memory = memory
        self.size = 0
        self._mem: bytearray | None = bytearray()
        self._fd: int | None = None

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._mem is not None:
            if self.size + len(data) <= self.memory:
                self._mem += data
                self.size += len(data)
                return
            self._fd = _unlinked_file(self.directory)
            held, self._mem = self._mem, None
            self._write(held)
        self._write(data)
        self.size += len(data)

    def _write(self, data) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            raise SpoolError(f"spool write: {exc.strerror or exc}") from None

    def chunks(self, size: int = READ_SIZE):
        """The content from the start, in pieces of at most *size* octets."""
        if self._mem is not None:
            mem = bytes(self._mem)
            for start in range(0, len(mem), size):
                yield mem[start:start + size]
            return
        offset = 0
        while offset < self.size:
            try:
                data = os.pread(self._fd, min(size, self.size - offset), offset)
            except OSError as exc:
                raise SpoolError(f"spool read: {exc.strerror or exc}") from None
            if not data:
                raise SpoolError("spool read: file shorter than written")
            offset += len(data)
            yield data

    def close(self) -> None:
        fd, self._fd = self._fd, None
        self._mem = bytearray()
        self.size = 0
        if fd is not None:
            os.close(fd)


def _unlinked_file(directory: str) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(directory, flags | tmpfile, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise SpoolError(f"spool file in {directory}: {exc.strerror or exc}") from None
    try:
        fd, path = tempfile.mkstemp(prefix="msg-", dir=directory)     # 0600
    except OSError as exc:
        raise SpoolError(f"spool file in {directory}: {exc.strerror or exc}") from None
    os.unlink(path)
    return fd


def prepare_spool_dir(path: str, user: str | None = None, group: str | None = None) -> None:
    """Create *path* (and its parents) 0700, owned by the workers' user when given and run
    as root; an existing directory is made 0700 and given to that user too."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != 0o700 and os.geteuid() in (0, st.st_uid):
        os.chmod(path, 0o700)            # before giving it away: root may lack CAP_FOWNER
    if os.geteuid() == 0 and (user or group):
        uid = pwd.getpwnam(user).pw_uid if user else -1
        gid = grp.getgrnam(group).gr_gid if group else (
            pwd.getpwnam(user).pw_gid if user else -1)
        if (uid, gid) != (st.st_uid if uid != -1 else -1, st.st_gid if gid != -1 else -1):
            os.chown(path, uid, gid)
