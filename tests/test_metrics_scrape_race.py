"""A scrape of the multiprocess value files while workers are created, killed and reaped
(gateway/observe/metrics.py). The value files are written with prometheus_client's own
MmapedDict, as the workers do; the races are set up by hand, so every test is deterministic.

The failure these guard against: MmapedDict creates a value file empty and only then sizes it;
a scrape in between made prometheus_client's MultiProcessCollector raise
struct.error('unpack_from requires a buffer of at least 4 bytes ...') and /metrics answer
500, and a worker SIGKILLed in between left that empty file behind for every later scrape."""
from __future__ import annotations

import os
import struct
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.observe import metrics as M


@pytest.fixture
def mpdir(tmp_path, monkeypatch):
    d = tmp_path / "mp"
    d.mkdir()
    monkeypatch.setenv(M.ENV, str(d))
    return d


def write(path, entries):
    """A value file as a worker leaves it: entries are (metric, sample, labels, value)."""
    m = MmapedDict(str(path))
    try:
        for metric, sample, labels, value in entries:
            m.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), "doc"),
                          value, 0.0)
    finally:
        m.close()


def populate(d, pid, n):
    write(d / f"counter_{pid}.db", [
        ("gateway_messages", "gateway_messages_total", {"listener": "mx", "result": "accepted"},
         n)])
    write(d / f"gauge_livesum_{pid}.db", [
        ("gateway_connections_active", "gateway_connections_active", {"listener": "mx"}, 1.0)])
    write(d / f"histogram_{pid}.db", [
        ("gateway_session_seconds", "gateway_session_seconds_bucket",
         {"listener": "mx", "protocol": "smtp", "le": "1.0"}, n),
        ("gateway_session_seconds", "gateway_session_seconds_bucket",
         {"listener": "mx", "protocol": "smtp", "le": "+Inf"}, n),
        ("gateway_session_seconds", "gateway_session_seconds_sum",
         {"listener": "mx", "protocol": "smtp"}, n / 10)])


def samples(body: bytes) -> dict:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def messages(body: bytes) -> float:
    return sum(v for (name, _), v in samples(body).items() if name == "gateway_messages_total")


def upstream(d) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(d))
    return generate_latest(registry)


def test_same_exposition_as_multiprocess_collector(mpdir):
    populate(mpdir, 101, 3.0)
    populate(mpdir, 102, 4.0)
    body, _ = M.render()
    assert samples(body) == samples(upstream(mpdir))
    assert messages(body) == 7.0


def test_scrape_while_a_value_file_is_being_created(mpdir, monkeypatch):
    """The exact window: MmapedDict has created the file (0 bytes) and not yet sized it."""
    populate(mpdir, 101, 3.0)
    new = mpdir / "counter_202.db"
    seen = {}
    real_fstat = os.fstat

    def fstat(fd):
        if not seen and os.path.exists(new) and os.path.samestat(real_fstat(fd), os.stat(new)):
            assert os.path.getsize(new) == 0
            with pytest.raises(struct.error, match="requires a buffer of at least 4 bytes"):
                upstream(mpdir)                  # the failure this guards against
            seen["body"] = M.render()[0]         # a scrape in the window
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    write(new, [("gateway_messages", "gateway_messages_total",
                 {"listener": "mx", "result": "accepted"}, 5.0)])
    monkeypatch.setattr(os, "fstat", real_fstat)
    assert "body" in seen
    assert messages(seen["body"]) == 3.0
    assert messages(M.render()[0]) == 8.0        # once written, the new file counts


def test_empty_file_of_a_killed_worker_never_fails_a_scrape(mpdir):
    """SIGKILLed between creating and sizing: the empty file stays; every scrape skips it,
    and reaping the worker removes it (its live gauges too, its counters stay)."""
    populate(mpdir, 101, 3.0)
    (mpdir / "histogram_303.db").write_bytes(b"")
    write(mpdir / "counter_303.db", [("gateway_messages", "gateway_messages_total",
                                      {"listener": "mx", "result": "accepted"}, 2.0)])
    write(mpdir / "gauge_livesum_303.db", [("gateway_connections_active",
                                            "gateway_connections_active", {"listener": "mx"}, 1.0)])
    for _ in range(3):
        assert messages(M.render()[0]) == 5.0
    M.mark_process_dead(303)
    assert sorted(p.name for p in mpdir.iterdir() if p.name.endswith("_303.db")) == [
        "counter_303.db"]
    body, _ = M.render()
    assert messages(body) == 5.0
    assert samples(body)[("gateway_connections_active", (("listener", "mx"),))] == 1.0


def test_header_only_and_zero_filled_files_are_empty(mpdir):
    populate(mpdir, 101, 3.0)
    (mpdir / "counter_404.db").write_bytes(b"\0" * 4)          # shorter than the header
    (mpdir / "counter_405.db").write_bytes(b"\0" * (1 << 16))  # sized, header not yet set
    assert messages(M.render()[0]) == 3.0


def test_corrupt_file_is_skipped(mpdir):
    populate(mpdir, 101, 3.0)
    write(mpdir / "counter_505.db", [("gateway_messages", "gateway_messages_total",
                                      {"listener": "mx", "result": "accepted"}, 9.0)])
    path = mpdir / "counter_505.db"
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("i", 1 << 20)       # first key's length beyond the used size
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="Read beyond file size"):
        upstream(mpdir)
    m = MmapedDict(str(mpdir / "counter_506.db"))
    m.write_value('["not json', 1.0, 0.0)
    m.close()
    assert messages(M.render()[0]) == 3.0


def test_file_removed_between_glob_and_read(mpdir, monkeypatch):
    """mark_process_dead (or anything else) removes a file the scrape has already listed."""
    populate(mpdir, 101, 3.0)
    populate(mpdir, 102, 4.0)
    real = MmapedDict.read_all_values_from_file

    def vanish(filename):
        if os.path.basename(filename) in ("counter_102.db", "gauge_livesum_102.db"):
            os.remove(filename)
        return real(filename)

    monkeypatch.setattr(MmapedDict, "read_all_values_from_file", staticmethod(vanish))
    body, _ = M.render()
    assert messages(body) == 3.0
    assert samples(body)[("gateway_connections_active", (("listener", "mx"),))] == 1.0


def test_endpoint_answers_200_with_an_unreadable_file(mpdir):
    populate(mpdir, 101, 3.0)
    (mpdir / "counter_606.db").write_bytes(b"")
    server = M.MetricsServer("127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            assert r.status == 200
            assert messages(r.read()) == 3.0
    finally:
        server.stop()
