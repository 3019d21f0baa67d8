"""Merging the value files of dead processes (gateway/observe/metric_files.py, SPEC §9, §11):
prometheus-client has no merge API, so these prove on files written by its own MmapedDict that
no counter or histogram sample goes backwards across a merge (exact sums, the archive rounded
up), that gauges keep their multiprocess mode's meaning, that the files stay flat, that a merge
cut short is finished without counting twice, and the last minute's counts merge too."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from gateway.observe import metric_files as F
from gateway.observe import recent

LABELS = {"listener": "mx", "protocol": "smtp"}
BOUNDS = ("0.5", "1.0", "+Inf")


def write(path, entries, timestamp=0.0):
    """A value file as a worker leaves it: entries are (metric, sample, labels, value)."""
    m = MmapedDict(str(path))
    try:
        for metric, sample, labels, value in entries:
            m.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), "doc"),
                          value, timestamp)
    finally:
        m.close()


def populate(d, pid, n: float, seconds: list[float], gauge: float):
    write(os.path.join(d, f"counter_{pid}.db"), [
        ("gateway_message_bytes", "gateway_message_bytes_total", {"listener": "mx"}, n)])
    hist = [("gateway_session_seconds", "gateway_session_seconds_sum", LABELS, math.fsum(seconds))]
    for bound in BOUNDS:
        limit = float(bound)
        hist.append(("gateway_session_seconds", "gateway_session_seconds_bucket",
                     {**LABELS, "le": bound}, float(sum(1 for s in seconds if s <= limit) -
                                                    sum(1 for s in seconds
                                                        if s <= _below(bound)))))
    write(os.path.join(d, f"histogram_{pid}.db"), hist)
    write(os.path.join(d, f"gauge_max_{pid}.db"), [
        ("gateway_upstream_last_result_timestamp_seconds",
         "gateway_upstream_last_result_timestamp_seconds", {"listener": "mx", "result": "ok"},
         gauge)])
    write(os.path.join(d, f"gauge_livesum_{pid}.db"), [
        ("gateway_connections_active", "gateway_connections_active", {"listener": "mx"}, 1.0)])


def _below(bound: str) -> float:
    """The bucket bound before *bound* (a file holds each bucket's own count)."""
    i = BOUNDS.index(bound)
    return -math.inf if i == 0 else float(BOUNDS[i - 1])


def samples(d) -> dict:
    out = {}
    for family in F.collect(str(d)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def counters(sampled: dict) -> dict:
    return {k: v for k, v in sampled.items()
            if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


def db_files(d) -> int:
    return sum(len([f for f in files if f.endswith(".db")]) for _, _, files in os.walk(d))


values = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
tenths = st.integers(0, 10**6).map(lambda n: n / 10)          # 0.1, 0.3, ...: inexact sums


@settings(max_examples=40, deadline=None)
@given(workers=st.lists(st.tuples(st.one_of(values, tenths), st.lists(tenths, max_size=4),
                                  values), min_size=2, max_size=7),
       order=st.randoms(use_true_random=False), more=st.one_of(values, tenths))
def test_no_counter_goes_backwards_and_files_stay_flat_across_merges(workers, order, more):
    d = tempfile.mkdtemp(prefix="merge-test-")
    try:
        pids = list(range(1001, 1001 + len(workers)))
        for pid, (n, seconds, gauge) in zip(pids, workers):
            populate(d, pid, n, seconds, gauge)
        live = set(pids)
        deaths = list(pids[:-1])                         # the last one lives on
        order.shuffle(deaths)
        previous = samples(d)
        exact_bytes = math.fsum(n for n, _, _ in workers)
        assert previous[("gateway_message_bytes_total", (("listener", "mx"),))] == exact_bytes
        files = db_files(d)
        for pid in deaths:
            live.discard(pid)
            merged = F.compact(d, is_alive=live.__contains__)
            assert merged == 1
            now = samples(d)
            went_back = {k: (v, now.get(k)) for k, v in counters(previous).items()
                         if now.get(k, -1.0) < v}
            assert not went_back
            assert now[("gateway_upstream_last_result_timestamp_seconds",
                        (("listener", "mx"), ("result", "ok")))] == max(g for _, _, g in workers)
            assert now[("gateway_connections_active", (("listener", "mx"),))] == len(live)
            assert db_files(d) <= files                  # never more files than before
            previous = now
        # the living one counts on: the sum moves with it, from the merged archive up
        last = pids[-1]
        write(os.path.join(d, f"counter_{last}.db"), [
            ("gateway_message_bytes", "gateway_message_bytes_total", {"listener": "mx"},
             workers[-1][0] + more)])
        final = samples(d)[("gateway_message_bytes_total", (("listener", "mx"),))]
        assert final >= previous[("gateway_message_bytes_total", (("listener", "mx"),))]
        assert math.isclose(final, exact_bytes + more, rel_tol=1e-12, abs_tol=1e-9)
        assert db_files(d) == 4 + 3                      # the living one's, the archive's
    finally:
        shutil.rmtree(d)


def test_the_archive_is_what_the_collector_reads_and_gauges_keep_their_mode(tmp_path):
    populate(tmp_path, 11, 3.0, [0.25, 0.75], 100.0)     # sums exact in binary: equal
    populate(tmp_path, 12, 4.0, [1.5], 250.0)
    before = samples(tmp_path)
    assert F.compact(str(tmp_path), is_alive=lambda pid: pid == 12) == 1
    after = samples(tmp_path)
    assert after == before | {(("gateway_connections_active"), (("listener", "mx"),)): 1.0}
    names = sorted(os.listdir(tmp_path))
    assert names == ["counter_12.db", "gauge_livesum_12.db", "gauge_max_12.db",
                     "histogram_12.db", "merged.1"]
    assert sorted(os.listdir(tmp_path / "merged.1")) == [
        "counter_merged.db", "gauge_max_merged.db", "histogram_merged.db", "pids"]
    assert F.compact(str(tmp_path), is_alive=lambda pid: pid == 12) == 0      # nothing new
    assert F.compact(str(tmp_path), is_alive=lambda pid: False) == 1
    assert samples(tmp_path) == {k: v for k, v in before.items()
                                 if k[0] != "gateway_connections_active"}
    assert sorted(os.listdir(tmp_path)) == ["merged.2"]


def test_a_merge_cut_short_is_finished_without_counting_twice(tmp_path):
    populate(tmp_path, 21, 3.0, [0.2], 1.0)
    populate(tmp_path, 22, 4.0, [0.3], 2.0)
    saved = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path) if "_21." in f}
    before = samples(tmp_path)
    F.compact(str(tmp_path), is_alive=lambda pid: pid == 22)
    for name, data in saved.items():                 # stopped before deleting pid 21's files
        (tmp_path / name).write_bytes(data)
    (tmp_path / "merged.0").mkdir()                  # an older archive not removed yet
    (tmp_path / ".merged-2").mkdir()                 # one being written
    assert F.compact(str(tmp_path), is_alive=lambda pid: pid == 22) == 0
    after = samples(tmp_path)
    assert after[("gateway_message_bytes_total", (("listener", "mx"),))] == 7.0
    assert {k: v for k, v in after.items() if k[0] != "gateway_connections_active"} == \
        {k: v for k, v in before.items() if k[0] != "gateway_connections_active"}
    assert sorted(os.listdir(tmp_path)) == ["counter_22.db", "gauge_livesum_22.db",
                                            "gauge_max_22.db", "histogram_22.db", "merged.1"]


def test_unreadable_files_of_dead_processes_go_and_an_unreadable_archive_stops_the_merge(
        tmp_path):
    populate(tmp_path, 31, 3.0, [], 1.0)
    (tmp_path / "histogram_32.db").write_bytes(b"")             # killed while creating it
    (tmp_path / "counter_33.db").write_bytes(b"\0" * 4)
    assert F.compact(str(tmp_path), is_alive=lambda pid: pid == 31) == 2
    assert sorted(os.listdir(tmp_path)) == ["counter_31.db", "gauge_livesum_31.db",
                                            "gauge_max_31.db", "histogram_31.db", "merged.1"]
    (tmp_path / "merged.1" / "counter_merged.db").write_bytes(b"\0" * 4)   # damaged
    assert F.compact(str(tmp_path), is_alive=lambda pid: False) == 0      # nothing lost
    assert "counter_31.db" in os.listdir(tmp_path)


def test_the_last_minute_of_dead_workers_merges_into_one_file(tmp_path):
    d = tmp_path / recent.SUBDIR
    d.mkdir()
    counts = {}
    for pid, names in ((41, ["mx", "sub"]), (42, ["mx"]), (43, ["mx", "sub"])):
        r = recent.RecentCounts(str(d / f"{pid}.bin"), names)
        for i in range(len(names)):
            for _ in range(pid - 40):
                r.session(i)
            r.message(0)
        counts[pid] = r
    now = int(time.time())
    before = recent.read_recent(str(tmp_path), now)
    assert recent.merge_dead(str(tmp_path), lambda pid: pid == 43, now) == 2
    assert sorted(os.listdir(d)) == ["43.bin", recent.MERGED]
    assert recent.read_recent(str(tmp_path), now) == before
    assert recent.merge_dead(str(tmp_path), lambda pid: False, now) == 1
    assert os.listdir(d) == [recent.MERGED]
    assert recent.read_recent(str(tmp_path), now) == before
    assert recent.read_recent(str(tmp_path), now + recent.WINDOW) == {
        "mx": {"sessions": 0, "messages": 0}, "sub": {"sessions": 0, "messages": 0}}
