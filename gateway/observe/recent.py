"""Sessions and messages per listener over the last minute, summed across workers (`/status`,
SPEC §11).

Each worker counts into a small file of its own (`<metrics dir>/recent/<pid>.bin`, mapped
into memory: one write per count, no lock, nothing shared between writers); the metrics
endpoint, in another process, reads every file and sums the seconds of the last minute. What
a dead worker did in the last minute still counts: the metrics process merges its file into
`recent/merged.bin` (same layout, `merge_dead`), so the files do not pile up across reloads.

Layout: `GWR1`, the listener count (u32), each listener's name (64 bytes, UTF-8, NUL padded),
then per listener 60 slots of (second, sessions, messages) as u32, slot = second % 60.
"""
from __future__ import annotations

import glob
import mmap
import os
import struct
import time

MAGIC = b"GWR1"
WINDOW = 60                     # seconds, one slot each
_NAME = 64
_SLOT = struct.Struct("<III")   # second, sessions, messages
_HEADER = struct.Struct("<4sI")
SUBDIR = "recent"


class RecentCounts:
    """This process's counts; `session(i)` / `message(i)` for listener index *i*."""

    def __init__(self, path: str, names: list[str]):
        self.n = len(names)
        self._base = _HEADER.size + _NAME * self.n
        size = self._base + self.n * WINDOW * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        for i, name in enumerate(names):
            self._map[_HEADER.size + i * _NAME:_HEADER.size + (i + 1) * _NAME] = \
                name.encode()[:_NAME].ljust(_NAME, b"\0")
        _HEADER.pack_into(self._map, 0, MAGIC, self.n)      # last: the file is complete

    def session(self, index: int) -> None:
        self._count(index, 1)

    def message(self, index: int) -> None:
        self._count(index, 2)

    def _count(self, index: int, field: int) -> None:
        second = int(time.time())
        offset = self._base + (index * WINDOW + second % WINDOW) * _SLOT.size
        slot = list(_SLOT.unpack_from(self._map, offset))
        if slot[0] != second:
            slot = [second, 0, 0]
        slot[field] += 1
        _SLOT.pack_into(self._map, offset, *slot)

    @classmethod
    def for_process(cls, names: list[str]) -> RecentCounts | NullRecent:
        """This process's file in the metrics directory, or a no-op without metrics."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return NullRecent()
        path = os.path.join(directory, SUBDIR)
        os.makedirs(path, exist_ok=True)
        return cls(os.path.join(path, f"{os.getpid()}.bin"), names)


class NullRecent:
    """No metrics endpoint: nothing is counted."""

    def session(self, index: int) -> None:
        pass

    def message(self, index: int) -> None:
        pass


def _read(path: str, now: int) -> list[tuple[str, list[tuple[int, int, int]]]] | None:
    """[(listener, [(second, sessions, messages)] of the last WINDOW seconds)] of one file,
    or None when it cannot be read (being created, or gone)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        magic, n = _HEADER.unpack_from(data, 0)
    except (OSError, struct.error):
        return None
    if magic != MAGIC or len(data) < _HEADER.size + n * (_NAME + WINDOW * _SLOT.size):
        return None
    base = _HEADER.size + n * _NAME
    out = []
    for i in range(n):
        raw = data[_HEADER.size + i * _NAME:_HEADER.size + (i + 1) * _NAME]
        slots = []
        for j in range(WINDOW):
            slot = _SLOT.unpack_from(data, base + (i * WINDOW + j) * _SLOT.size)
            if 0 <= now - slot[0] < WINDOW:
                slots.append(slot)
        out.append((raw.rstrip(b"\0").decode("utf-8", "replace"), slots))
    return out


def _files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(directory), SUBDIR, "*.bin")))


def read_recent(directory: str, now: float | None = None) -> dict[str, dict[str, int]]:
    """{listener: {"sessions": n, "messages": m}} over the last WINDOW seconds, summed over
    every worker's file; listeners in the order of the files (the configuration's)."""
    now = int(time.time() if now is None else now)
    out: dict[str, dict[str, int]] = {}
    for path in _files(directory):
        for name, slots in _read(path, now) or ():
            counts = out.setdefault(name, {"sessions": 0, "messages": 0})
            for _second, sessions, messages in slots:
                counts["sessions"] += sessions
                counts["messages"] += messages
    return out


MERGED = "merged.bin"


def merge_dead(directory: str, is_alive, now: float | None = None) -> int:
    """Fold the files of workers that are gone (`is_alive(pid)` false) into MERGED, written
    whole under another name and renamed into place, then delete them; how many were.
    For the metrics process only (the one reader)."""
    dead = [p for p in _files(directory)
            if (stem := os.path.basename(p)[:-4]).isdigit() and not is_alive(int(stem))]
    if not dead:
        return 0
    now = int(time.time() if now is None else now)
    merged = os.path.join(directory, SUBDIR, MERGED)
    names: dict[str, dict[int, list[int]]] = {}
    for path in [merged, *dead]:
        for name, slots in _read(path, now) or ():
            seconds = names.setdefault(name, {})
            for second, sessions, messages in slots:
                counts = seconds.setdefault(second, [0, 0])
                counts[0] += sessions
                counts[1] += messages
    data = bytearray(_HEADER.size + len(names) * (_NAME + WINDOW * _SLOT.size))
    _HEADER.pack_into(data, 0, MAGIC, len(names))
    base = _HEADER.size + len(names) * _NAME
    for i, (name, seconds) in enumerate(names.items()):
        data[_HEADER.size + i * _NAME:_HEADER.size + (i + 1) * _NAME] = \
            name.encode()[:_NAME].ljust(_NAME, b"\0")
        for second, (sessions, messages) in seconds.items():
            _SLOT.pack_into(data, base + (i * WINDOW + second % WINDOW) * _SLOT.size,
                            second, min(sessions, 0xFFFFFFFF), min(messages, 0xFFFFFFFF))
    tmp = os.path.join(directory, SUBDIR, f".{MERGED}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, merged)
    for path in dead:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return len(dead)
