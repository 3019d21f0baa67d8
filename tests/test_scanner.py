"""The line scanner: the native core and its pure-Python twin, each against the semantics and
against each other on generated input."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway
from gateway import native, pyscan

REQUIRE = os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1"
NATIVE = native.native_backend

BACKENDS = [pytest.param(pyscan, id="python"),
            pytest.param(NATIVE, id="native",
                         marks=pytest.mark.skipif(NATIVE is None and not REQUIRE,
                                                  reason="native core not built"))]


def run_data(backend, data: bytes, chunks=None):
    """Feed *data* (optionally split at *chunks* offsets) until done; (output, rest, scanner)."""
    sc = backend.DataScanner()
    pieces = []
    if chunks:
        prev = 0
        for c in sorted(set(chunks)):
            pieces.append(data[prev:c])
            prev = c
        pieces.append(data[prev:])
    else:
        pieces = [data]
    out, pending = [], b""
    for idx, piece in enumerate(pieces):
        buf = pending + piece
        o, used = sc.feed(buf)
        out.append(o)
        pending = buf[used:]
        if sc.done:
            return b"".join(out), pending + b"".join(pieces[idx + 1:]), sc
    return b"".join(out), pending, sc


def test_require_native_means_native_from_the_installed_package():
    if not REQUIRE:
        pytest.skip("GATEWAY_REQUIRE_NATIVE is not set")
    assert native.BACKEND == "native"
    source_tree = Path(__file__).resolve().parent.parent / "gateway"
    assert Path(gateway.__file__).resolve().parent != source_tree


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("line,expect", [
    (b"EHLO x\r\n", (8, 0)),
    (b"EHLO x\n", (7, pyscan.BARE_LF)),
    (b"EH\rLO\r\n", (7, pyscan.BARE_CR)),
    (b"EH\0LO\r\n", (7, pyscan.NUL)),
    (b"\n", (1, pyscan.BARE_LF)),
    (b"\r\n", (2, 0)),
    (b"no end", (-1, 0)),
    (b"", (-1, 0)),
])
def test_scan_line(b, line, expect):
    assert b.scan_line(line) == expect


@pytest.mark.parametrize("b", BACKENDS)
def test_scan_line_start_offset(b):
    assert b.scan_line(b"A\r\nBB\n", 3) == (6, pyscan.BARE_LF)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("line,expect", [
    (b"a LOGIN {5}", (5, False)), (b"a APPEND x {123+}", (123, True)), (b"{0}", (0, False)),
    (b"a {12", (-1, False)), (b"a {}", (-1, False)), (b"a {+}", (-1, False)),
    (b"a {1x}", (-1, False)), (b"a {" + b"9" * 19 + b"}", (-2, False)),
    (b"a {" + b"9" * 18 + b"}", (10 ** 18 - 1, False)), (b"", (-1, False)),
])
def test_find_literal(b, line, expect):
    assert b.find_literal(line) == expect


SMUGGLE = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("seq", SMUGGLE)
def test_smuggling_sequences_do_not_end_data(b, seq):
    data = b"Subject: x\r\n\r\nbody" + seq + b"MAIL FROM:<e@x>\r\n.\r\nMAIL FROM:<x>\r\n"
    for cut in range(len(data) + 1):
        out, rest, sc = run_data(b, data, [cut])
        assert sc.done and rest == b"MAIL FROM:<x>\r\n"
        assert b"\r\n.\r\n" not in out and out.endswith(b"\r\n")
        assert sc.flags


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("data,expect,flags", [
    (b".\r\n", b"", 0),
    (b"a\r\n.\r\n", b"a\r\n", 0),
    (b"x\n.\ny\r\n.\r\n", b"x\r\n..\r\ny\r\n", pyscan.BARE_LF),
    (b"..lead\r\n.\r\n", b"..lead\r\n", 0),
    (b".x\r\n.\r\n", b"x\r\n", 0),                 # a sloppy client's unstuffed dot
    (b"a\0b\r\n.\r\n", b"ab\r\n", pyscan.NUL),
    (b"a\rb\r\n.\r\n", b"a\r\nb\r\n", pyscan.BARE_CR),
    (b"a\r\r\n.\r\n", b"a\r\n\r\n", pyscan.BARE_CR),
])
def test_data_semantics(b, data, expect, flags):
    out, rest, sc = run_data(b, data)
    assert (out, rest, sc.done, sc.flags) == (expect, b"", True, flags)
    assert sc.size == len(data) - 3


@pytest.mark.parametrize("b", BACKENDS)
def test_feed_after_done(b):
    sc = b.DataScanner()
    sc.feed(b".\r\n")
    assert sc.feed(b"more") == (b"", 0)


messages = st.lists(st.sampled_from([b"\r", b"\n", b".", b"\0", b"a", b"\r\n", b".."]),
                    max_size=60).map(b"".join)


@pytest.mark.skipif(NATIVE is None, reason="native core not built")
@settings(max_examples=400, deadline=None)
@given(data=messages, cuts=st.lists(st.integers(0, 80), max_size=4))
def test_native_and_python_agree(data, cuts):
    data = data + b"\r\n.\r\ntail"
    cuts = [c for c in cuts if c <= len(data)]
    p = run_data(pyscan, data, cuts)
    n = run_data(NATIVE, data, cuts)
    assert (p[0], p[1], p[2].flags, p[2].size) == (n[0], n[1], n[2].flags, n[2].size)
    assert pyscan.scan_line(data) == NATIVE.scan_line(data)
    assert pyscan.find_literal(data[:20]) == NATIVE.find_literal(data[:20])


@pytest.mark.parametrize("b", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(data=messages, cuts=st.lists(st.integers(0, 80), max_size=4))
def test_chunking_does_not_matter_and_output_is_clean(b, data, cuts):
    data = data + b"\r\n.\r\n"
    whole = run_data(b, data)
    split = run_data(b, data, [c for c in cuts if c <= len(data)])
    assert whole[0] == split[0] and whole[2].flags == split[2].flags
    out = whole[0]
    assert whole[2].done
    assert b"\0" not in out
    assert out.replace(b"\r\n", b"").count(b"\r") == 0 and out.replace(b"\r\n", b"").count(b"\n") == 0
    assert not out.startswith(b".\r\n") and b"\r\n.\r\n" not in out


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_find_literal_and_scan_line_agree_on_any_bytes(raw):
    if NATIVE is None:
        return
    assert pyscan.find_literal(raw + b"{7}") == NATIVE.find_literal(raw + b"{7}")
    assert pyscan.find_literal(raw) == NATIVE.find_literal(raw)
    assert pyscan.scan_line(raw + b"\n") == NATIVE.scan_line(raw + b"\n")
