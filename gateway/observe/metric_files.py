"""The files behind the metrics (SPEC §9, §11): the supervisor's directory, reading every
process's value files, and merging the files of dead processes.

**The directory.** `create_run_dir()` makes `$TMPDIR/gateway-metrics-XXXXXXXX/` for one
supervisor: a `lock` file it holds an exclusive flock on (inherited by its children, so the
lock lasts while any process of that instance lives), and `values/` (PROMETHEUS_MULTIPROC_DIR,
with `recent/` in it), handed to the workers' `user`/`group`. The supervisor removes it at
exit; a supervisor killed with `kill -9` cannot, so every start first removes the directories
whose lock nobody holds (`remove_leftovers`): another running instance's directory is locked
and never taken. The lock file is locked before it gets its name, so a directory being made
is never seen unlocked.

**Reading** (`collect`). Like prometheus-client's MultiProcessCollector, but a file that cannot
be read whole (one being created, one a killed process left empty, a corrupt one) is left out
instead of failing the scrape, and sums are exact (math.fsum): the total of a counter does not
depend on how its parts are split between files, which the merge relies on.

**Merging** (`compact`). Each process writes files of its own (`counter_<pid>.db`, ...), so
every reload and every dead worker used to add files, and a scrape read them all. The metrics
process, the only reader, folds the files of processes that are gone into one archive
(`values/merged.<n>/`: `counter_merged.db`, `histogram_merged.db`, `gauge_<mode>_merged.db`)
and deletes them: counters, histograms and sum gauges add up (rounded up when inexact, so no
total ever goes backwards), min/max gauges keep the min/max, mostrecent the newest; live
gauges of a dead process are dropped (as mark_process_dead does); `all` gauges are left as
they are. A new archive is written under a temporary name and renamed into place (it names
the processes it took in), then the old archive and the merged files go; a merge cut short
is finished or undone by the next one. The last minute's counts of dead workers
(gateway.observe.recent) merge into `recent/merged.bin` the same way.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import shutil
import stat
import tempfile
import time
from fractions import Fraction

from . import recent

ENV = "PROMETHEUS_MULTIPROC_DIR"
RUN_PREFIX = "gateway-metrics-"
LOCK = "lock"
VALUES = "values"
ARCHIVE = "merged."            # values/merged.<generation>/
_ARCHIVE_TMP = ".merged-"      # values/.merged-<generation>: one being written
_OWNER = "merged"              # the "pid" part of an archive file's name
_PIDS = "pids"                 # in an archive: the processes whose files it took in
UNLOCKED_GRACE = 60.0          # seconds: a directory without its lock file yet is being made

# A value file starts with a 4-byte "used" count and 4 bytes of padding (mmap_dict.py).
HEADER = 8


# --- the directory ---------------------------------------------------------------------------

class RunDir:
    """One supervisor's metrics directory: *path* (removed at exit), *values* (the
    prometheus multiprocess directory) and the descriptor holding the lock."""

    def __init__(self, path: str, values: str, lock_fd: int):
        self.path = path
        self.values = values
        self.lock_fd = lock_fd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def create_run_dir(uid: int = -1, gid: int = -1, parent: str | None = None) -> RunDir:
    """Remove the directories of dead instances from *parent* (default: the temporary
    directory), then make this one's, its values directory owned by *uid*/*gid* (-1: not
    changed). OSError when it cannot be made or handed over (nothing is left then)."""
    parent = tempfile.gettempdir() if parent is None else parent
    remove_leftovers(parent)
    path = tempfile.mkdtemp(prefix=RUN_PREFIX, dir=parent)          # 0700, ours
    fd = -1
    try:
        fd = os.open(os.path.join(path, ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(os.path.join(path, ".lock"), os.path.join(path, LOCK))   # locked already
        values = os.path.join(path, VALUES)
        os.mkdir(values, 0o700)
        os.mkdir(os.path.join(values, recent.SUBDIR), 0o700)
        os.chmod(values, 0o700)                                     # whatever the umask was
        os.chmod(os.path.join(values, recent.SUBDIR), 0o700)
        if uid != -1 or gid != -1:               # the workers and the metrics process write
            os.chown(values, uid, gid)
            os.chown(os.path.join(values, recent.SUBDIR), uid, gid)
            os.chmod(path, 0o711)                # they pass through, list nothing
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if fd >= 0:
            os.close(fd)
        raise
    return RunDir(path, values, fd)


def remove_leftovers(parent: str) -> list[str]:
    """Remove the `gateway-metrics-*` directories in *parent* that belong to this user and
    whose lock nobody holds (their supervisor was killed); the removed paths."""
    removed = []
    euid = os.geteuid()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RUN_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != euid:
            continue
        try:
            fd = os.open(os.path.join(entry.path, LOCK),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:       # being made (locked before named), or older
            if time.time() - st.st_mtime > UNLOCKED_GRACE:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue            # an instance (or a child of one) still runs
                raise
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def hand_over(uid: int, gid: int, pid: int | None = None) -> None:
    """Give *pid*'s (this process's) files in the values directory, made while it was root,
    to *uid*/*gid*: the metrics process, which runs as them, reads and merges them whatever
    the umask made their mode."""
    path = os.environ.get(ENV)
    if not path or (uid == -1 and gid == -1):
        return
    pid = os.getpid() if pid is None else pid
    for f in [*glob.glob(os.path.join(glob.escape(path), f"*_{pid}.db")),
              os.path.join(path, recent.SUBDIR, f"{pid}.bin")]:
        try:
            os.chown(f, uid, gid)
        except FileNotFoundError:
            pass


# --- reading ---------------------------------------------------------------------------------

def _kind(path: str) -> tuple[str, str, str] | None:
    """(type, gauge mode, owner) of a value file's name: counter_12.db -> ("counter", "",
    "12"), gauge_livesum_12.db -> ("gauge", "livesum", "12"); None for another name."""
    name = os.path.basename(path)
    if not name.endswith(".db"):
        return None
    parts = name[:-3].split("_")
    if parts[0] == "gauge":
        return ("gauge", parts[1], "_".join(parts[2:])) if len(parts) >= 3 else None
    return (parts[0], "", "_".join(parts[1:])) if len(parts) >= 2 else None


def read_values(path: str) -> list | None:
    """All (key, value, timestamp) of one value file, or None when it cannot be read whole.

    A file is created empty and only then sized and given its header (MmapedDict.__init__):
    a read in that window gets 0 bytes and prometheus_client raises struct.error; a process
    killed in that window leaves such a file for good. A file can also vanish
    (mark_process_dead, a merge) or be corrupt ('Read beyond file size detected'). Each of
    these costs that one file (which holds nothing yet in the usual case)."""
    from prometheus_client.mmap_dict import MmapedDict
    try:
        if os.path.getsize(path) < HEADER:
            return None
        return [(k, v, ts) for k, v, ts, _ in MmapedDict.read_all_values_from_file(path)]
    except Exception:                       # FileNotFoundError, struct.error, RuntimeError, ...
        return None


def _parsed(path: str, cache: dict) -> list | None:
    """(metric, sample, labels, help, value, timestamp) of every entry, or None when the file
    cannot be read whole or a key is not what prometheus_client writes."""
    values = read_values(path)
    if values is None:
        return None
    out = []
    try:
        for key, value, ts in values:
            parsed = cache.get(key)
            if parsed is None:
                metric, sample, labels, help_text = json.loads(key)
                parsed = cache[key] = (metric, sample, tuple(sorted(labels.items())), help_text)
            out.append((*parsed, value, ts))
    except Exception:                       # a torn or corrupt key: the file is unusable
        return None
    return out


def _keys_usable(values: list) -> bool:
    """Would _parsed() take every key of *values*? (else no scrape counts the file)"""
    try:
        for key, _value, _ts in values:
            _metric, _sample, labels, _help = json.loads(key)
            tuple(sorted(labels.items()))
    except Exception:
        return False
    return True


def current_archive(path: str) -> str | None:
    """The newest complete archive directory in *path*, or None."""
    best = None
    try:
        names = os.listdir(path)
    except OSError:
        return None
    for name in names:
        if name.startswith(ARCHIVE) and name[len(ARCHIVE):].isdigit():
            gen = int(name[len(ARCHIVE):])
            if best is None or gen > best[0]:
                best = (gen, name)
    return None if best is None else os.path.join(path, best[1])


def value_files(path: str) -> list[str]:
    """Every process's value files in *path*, then the archive's."""
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.db")))
    archive = current_archive(path)
    if archive is not None:
        files += sorted(glob.glob(os.path.join(glob.escape(archive), "*.db")))
    return files


def exact_sum(values) -> float:
    """The correctly rounded sum of *values*, whatever their order."""
    return math.fsum(values)


def _sum_up(values) -> float:
    """The sum of *values* rounded up, never below the exact sum: what an archive keeps, so
    that adding the rest to it never gives less than before the merge."""
    total = math.fsum(values)
    if math.isfinite(total) and all(math.isfinite(v) for v in values):
        if Fraction(total) < sum(map(Fraction, values)):
            total = math.nextafter(total, math.inf)
    return total


def collect(path: str):
    """The metric families of every readable value file in *path* and its archive, merged as
    prometheus-client's MultiProcessCollector merges them (accumulated histograms), with
    exact sums."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample
    from prometheus_client.utils import floatToGoString

    cache: dict = {}
    families: dict[str, list] = {}        # metric -> [type, help, gauge mode, {sample: values}]
    for f in value_files(path):
        kind = _kind(f)
        if kind is None:
            continue
        typ, mode, owner = kind
        entries = _parsed(f, cache)
        if entries is None:
            continue
        for metric, sample, labels, help_text, value, ts in entries:
            family = families.get(metric)
            if family is None:
                family = families[metric] = [typ, help_text, mode, {}]
            if typ == "gauge":
                family[2] = mode
                if mode in ("all", "liveall"):
                    labels = labels + (("pid", owner),)
            family[3].setdefault((sample, labels), []).append((value, ts))
    out = []
    for metric, (typ, help_text, mode, samples) in families.items():
        family = Metric(metric, help_text, typ)
        if typ == "histogram":
            buckets: dict[tuple, dict[float, float]] = {}
            for (sample, labels), values in samples.items():
                le = next((v for k, v in labels if k == "le"), None)
                if le is None:
                    family.samples.append(Sample(sample, dict(labels),
                                                 exact_sum(v for v, _ in values)))
                else:
                    without = tuple(kv for kv in labels if kv[0] != "le")
                    per = buckets.setdefault(without, {})
                    bound = float(le)
                    per[bound] = exact_sum([per.get(bound, 0.0), *(v for v, _ in values)])
            for labels, per in buckets.items():
                acc = 0.0
                for bound, value in sorted(per.items()):
                    acc += value
                    family.samples.append(Sample(
                        metric + "_bucket", dict(labels + (("le", floatToGoString(bound)),)),
                        acc))
                family.samples.append(Sample(metric + "_count", dict(labels), acc))
        else:
            for (sample, labels), values in samples.items():
                if typ != "gauge" or mode in ("sum", "livesum", "all", "liveall"):
                    value = exact_sum(v for v, _ in values)
                elif mode in ("min", "livemin"):
                    value = min(v for v, _ in values)
                elif mode in ("max", "livemax"):
                    value = max(v for v, _ in values)
                else:                                       # mostrecent, livemostrecent
                    value = max(values, key=lambda vt: vt[1])[0]
                family.samples.append(Sample(sample, dict(labels), value))
        out.append(family)
    return out


# --- merging ---------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """Does process *pid* exist (a zombie, or one of another user, does)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fate(typ: str, mode: str) -> str:
    """What becomes of a dead process's file of this kind: "merge", "drop" or "keep"."""
    if typ == "gauge":
        if mode in ("all", "liveall"):
            return "keep"               # one series per process: nothing to merge into
        if mode.startswith("live"):
            return "drop"               # a live gauge goes with its process
    return "merge"


def _archive_name(typ: str, mode: str) -> str:
    return f"{typ}_{mode}_{_OWNER}.db" if typ == "gauge" else f"{typ}_{_OWNER}.db"


def _combine(typ: str, mode: str, values: list[tuple[float, float]]) -> tuple[float, float]:
    ts = max(t for _, t in values)
    if typ != "gauge" or mode == "sum":
        return _sum_up([v for v, _ in values]), ts
    if mode == "min":
        return min(v for v, _ in values), ts
    if mode == "max":
        return max(v for v, _ in values), ts
    return max(values, key=lambda vt: vt[1])                       # mostrecent


def _dead_files(path: str, is_alive) -> dict[int, list[tuple[str, str, str]]]:
    """{pid: [(file, type, mode)]} of the value files of processes that are gone."""
    by_pid: dict[int, list[tuple[str, str, str]]] = {}
    for f in glob.glob(os.path.join(glob.escape(path), "*.db")):
        kind = _kind(f)
        if kind is not None and kind[2].isdigit():
            by_pid.setdefault(int(kind[2]), []).append((f, kind[0], kind[1]))
    return {pid: files for pid, files in by_pid.items() if not is_alive(pid)}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _recover(path: str, is_alive) -> str | None:
    """Finish or undo a merge cut short; the current archive. Only the newest archive
    counts (a rename put it in place whole); older ones and unfinished ones go, and files
    of dead processes the archive took in but that are still there (the merge stopped before
    deleting them) are deleted now."""
    current = current_archive(path)
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name.startswith(_ARCHIVE_TMP) or (name.startswith(ARCHIVE) and full != current):
            shutil.rmtree(full, ignore_errors=True)
    if current is not None:
        try:
            with open(os.path.join(current, _PIDS)) as f:
                pids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            if not is_alive(pid):
                for f in glob.glob(os.path.join(glob.escape(path), f"*_{pid}.db")):
                    kind = _kind(f)
                    if kind is not None and _fate(kind[0], kind[1]) != "keep":
                        _unlink(f)
    return current


def compact(path: str | None = None, is_alive=alive, now: float | None = None) -> int:
    """Merge the files of processes that are gone into the archive and delete them; the
    number of processes merged. Call it from one process only (the metrics process), which
    reads the files between merges, never during one."""
    path = os.environ.get(ENV) if path is None else path
    if not path or not os.path.isdir(path):
        return 0
    recent.merge_dead(path, is_alive, now)
    current = _recover(path, is_alive)
    dead = {pid: [(f, typ, mode) for f, typ, mode in files if _fate(typ, mode) != "keep"]
            for pid, files in _dead_files(path, is_alive).items()}
    dead = {pid: files for pid, files in dead.items() if files}
    if not dead:
        return 0
    tables: dict[tuple[str, str], dict[str, list]] = {}
    if current is not None:
        for f in glob.glob(os.path.join(glob.escape(current), "*.db")):
            kind = _kind(f)
            values = read_values(f)
            if kind is None or values is None:
                return 0                # our own archive unreadable: merge nothing, lose none
            table = tables.setdefault(kind[:2], {})
            for key, value, ts in values:
                table.setdefault(key, []).append((value, ts))
    done = []
    for files in dead.values():
        for f, typ, mode in files:
            done.append(f)
            if _fate(typ, mode) == "drop":
                continue
            values = read_values(f)
            if values is None or not _keys_usable(values):
                continue                # never readable, never counted: nothing to keep
            table = tables.setdefault((typ, mode), {})
            for key, value, ts in values:
                table.setdefault(key, []).append((value, ts))
    from prometheus_client.mmap_dict import MmapedDict
    generation = 1 + (int(os.path.basename(current)[len(ARCHIVE):]) if current else 0)
    tmp = os.path.join(path, f"{_ARCHIVE_TMP}{generation}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        for (typ, mode), table in tables.items():
            out = MmapedDict(os.path.join(tmp, _archive_name(typ, mode)))
            try:
                for key, values in table.items():
                    out.write_value(key, *_combine(typ, mode, values))
            finally:
                out.close()
        with open(os.path.join(tmp, _PIDS), "w") as f:
            f.write("".join(f"{pid}\n" for pid in sorted(dead)))
        os.rename(tmp, os.path.join(path, f"{ARCHIVE}{generation}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if current is not None:
        shutil.rmtree(current, ignore_errors=True)
    for f in done:
        _unlink(f)
    return len(dead)
