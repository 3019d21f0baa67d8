"""The line scanner (SPEC §4.4, §10): the native core and its pure-Python twin, each against the
semantics (tables, every split point, a small non-streaming reference model written here) and
against each other on generated input."""
from __future__ import annotations

import array
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway
from gateway.native import scanner, scanner_py

REQUIRE = os.environ.get("GATEWAY_REQUIRE_NATIVE") == "1"
NATIVE = scanner.native_backend
needs_native = pytest.mark.skipif(NATIVE is None and not REQUIRE, reason="native core not built")

BACKENDS = [pytest.param(scanner_py, id="python"),
            pytest.param(NATIVE, id="native", marks=needs_native)]

BARE_CR, BARE_LF, NUL = scanner_py.BARE_CR, scanner_py.BARE_LF, scanner_py.NUL
END = b".\r\n"


# --- reference model: whole-message definitions, no streaming ------------------------------

def ref_scan_line(buf: bytes, start: int = 0) -> tuple[int, int]:
    k = buf.find(b"\n", start)
    if k < 0:
        return -1, 0
    line = buf[start:k]
    flags = 0
    body = line[:-1] if line.endswith(b"\r") else line
    if body is line:
        flags |= BARE_LF
    if b"\r" in body:
        flags |= BARE_CR
    if b"\0" in line:
        flags |= NUL
    return k + 1, flags


def ref_find_literal(line: bytes) -> tuple[int, bool]:
    m = re.search(rb"\{([0-9]+)(\+?)\}\Z", line)
    if m is None:
        return -1, False
    if len(m.group(1)) > 18:
        return -2, bool(m.group(2))
    return int(m.group(1)), bool(m.group(2))


def ref_data(data: bytes):
    """(output, rest, flags, size) for complete DATA input, or None if it has no end."""
    if data.startswith(END):
        p = 0
    else:
        k = data.find(b"\r\n" + END)
        if k < 0:
            return None
        p = k + 2
    out, flags = [], 0
    for line in data[:p].split(b"\r\n")[:-1]:        # client lines
        if line.startswith(b"."):
            line = line[1:]                          # un-stuffing
        flags |= (BARE_CR if b"\r" in line else 0) | (BARE_LF if b"\n" in line else 0) \
            | (NUL if b"\0" in line else 0)
        for piece in re.split(rb"[\r\n]", line):    # bare CR/LF: line breaks
            piece = piece.replace(b"\0", b"")
            out.append((b"." if piece.startswith(b".") else b"") + piece + b"\r\n")
    return b"".join(out), data[p + 3:], flags, p


# --- helpers -------------------------------------------------------------------------------

def split_at(data: bytes, cuts) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 <= c <= len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_pieces(backend, pieces, normalize=True):
    """Feed pieces like a session does: stop at done; the rest is what was not consumed.
    Returns (output, rest, scanner, per-feed log)."""
    sc = backend.DataScanner(normalize)
    out, log = [], []
    for idx, piece in enumerate(pieces):
        o, used = sc.feed(piece)
        log.append((o, used, sc.done, sc.flags, sc.size))
        assert 0 <= used <= len(piece)
        assert len(o) <= 2 * len(piece) + 2                  # the bound proved in scan.c
        out.append(o)
        if sc.done:
            return b"".join(out), piece[used:] + b"".join(pieces[idx + 1:]), sc, log
        assert used == len(piece)                             # all consumed until the end
    return b"".join(out), b"", sc, log


def run_data(backend, data: bytes, cuts=()):
    return feed_pieces(backend, split_at(data, cuts))


def assert_clean(out: bytes):
    """The output is framing the upstream can trust."""
    assert b"\0" not in out
    lines = out.split(b"\r\n")
    assert lines[-1] == b""                                   # ends with CRLF (or is empty)
    for line in lines[:-1]:
        assert b"\r" not in line and b"\n" not in line       # no bare CR/LF
        assert line != b"."                                   # never a lone dot
    assert b"\r\n.\r\n" not in out and not out.startswith(END)


# --- the facade ----------------------------------------------------------------------------

def test_require_native_means_native_from_the_installed_package():
    if not REQUIRE:
        pytest.skip("GATEWAY_REQUIRE_NATIVE is not set")
    assert scanner.BACKEND == "native" and scanner.native_backend is not None
    source_pkg = Path(__file__).resolve().parent.parent / "gateway"
    assert Path(gateway.__file__).resolve().parent != source_pkg


def test_facade_exports_the_active_backend():
    assert scanner.BACKEND in ("native", "python")
    active = NATIVE if scanner.BACKEND == "native" else scanner_py
    assert scanner.scan_line is active.scan_line
    assert scanner.find_literal is active.find_literal
    assert scanner.DataScanner is active.DataScanner
    assert (scanner.BARE_CR, scanner.BARE_LF, scanner.NUL) == (1, 2, 4)
    if NATIVE is not None:
        assert (NATIVE.BARE_CR, NATIVE.BARE_LF, NATIVE.NUL) == (1, 2, 4)


_PROBE = """
import sys
sys.path.insert(0, {root!r})
if {block!r}:
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "gateway._native":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, Block())
try:
    import gateway.native.scanner as n
except ImportError as e:
    print("ImportError", e)
else:
    print(n.BACKEND, n.native_backend is None, n.DataScanner.__module__)
"""


@pytest.mark.parametrize("env,block,expect", [
    ({"GATEWAY_PURE_PYTHON": "1"}, False, "python True gateway.native.scanner_py"),
    ({}, True, "python True gateway.native.scanner_py"),
    ({"GATEWAY_REQUIRE_NATIVE": "1"}, True, "ImportError"),
    ({"GATEWAY_PURE_PYTHON": "1", "GATEWAY_REQUIRE_NATIVE": "1"}, True,
     "python True gateway.native.scanner_py"),
])
def test_backend_selection(env, block, expect):
    root = str(Path(gateway.__file__).resolve().parent.parent)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("GATEWAY_PURE_PYTHON", "GATEWAY_REQUIRE_NATIVE")}
    res = subprocess.run([sys.executable, "-c", _PROBE.format(root=root, block=block)],
                         env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(expect), res.stdout


# --- scan_line -----------------------------------------------------------------------------

@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("line,expect", [
    (b"EHLO x\r\n", (8, 0)),
    (b"EHLO x\n", (7, BARE_LF)),
    (b"EH\rLO\r\n", (7, BARE_CR)),
    (b"EH\0LO\r\n", (7, NUL)),
    (b"\r\r\n", (3, BARE_CR)),
    (b"\r\0\n", (3, BARE_CR | BARE_LF | NUL)),
    (b"\n", (1, BARE_LF)),
    (b"\r\n", (2, 0)),
    (b"\0\r\n", (3, NUL)),
    (b"a\r\nb\rc\0\n", (3, 0)),                     # only the first line counts
    (b"no end", (-1, 0)),
    (b"no end\r", (-1, 0)),
    (b"", (-1, 0)),
])
def test_scan_line(b, line, expect):
    assert b.scan_line(line) == expect
    assert ref_scan_line(line) == expect


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("buf,start,expect", [
    (b"A\r\nBB\n", 3, (6, BARE_LF)),
    (b"A\r\nBB\r\n", 3, (7, 0)),
    (b"A\r\n", 2, (3, BARE_LF)),                    # the CR before start is not in the line
    (b"A\r\n", 3, (-1, 0)),
    (b"A\r\n", 99, (-1, 0)),
    (b"A\r\n", 2 ** 70, (-1, 0)),
    (b"\0\0\r\n", 1, (4, NUL)),
])
def test_scan_line_start(b, buf, start, expect):
    assert b.scan_line(buf, start) == expect


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview,
                                  lambda x: memoryview(b"zz" + x + b"zz")[2:-2]])
def test_buffer_types(b, wrap):
    assert b.scan_line(wrap(b"a\rb\n")) == (4, BARE_CR | BARE_LF)
    assert b.find_literal(wrap(b"A1 LOGIN {42+}")) == (42, True)
    sc = b.DataScanner()
    assert sc.feed(wrap(b"a\n.b\r\n.\r\nQUIT")) == (b"a\r\n..b\r\n", 9)


@pytest.mark.parametrize("b", BACKENDS)
def test_multibyte_buffers_are_read_as_bytes(b):
    buf = array.array("H", [0x0D0A, 0x0A00])        # little or big endian: 4 raw bytes
    assert b.scan_line(buf) == ref_scan_line(buf.tobytes())
    assert b.scan_line(memoryview(buf)) == ref_scan_line(buf.tobytes())


@needs_native
@pytest.mark.parametrize("call", [
    lambda m: m.scan_line("a\n"), lambda m: m.scan_line(5), lambda m: m.scan_line(None),
    lambda m: m.scan_line(b"a\n", -1), lambda m: m.scan_line(b"a\n", 1.0),
    lambda m: m.scan_line(b"a\n", "1"), lambda m: m.scan_line(memoryview(b"a\nb\n")[::2]),
    lambda m: m.find_literal("{1}"), lambda m: m.find_literal(3),
    lambda m: m.DataScanner().feed("x"), lambda m: m.DataScanner().feed(3),
    lambda m: m.DataScanner().feed(memoryview(b"a\r\n.\r\n")[::2]),
], ids=range(12))
def test_bad_arguments_raise_the_same_error(call):
    errors = []
    for m in (scanner_py, NATIVE):
        with pytest.raises((TypeError, ValueError, BufferError)) as info:
            call(m)
        errors.append(info.type)
    assert errors[0] is errors[1]


@pytest.mark.parametrize("b", BACKENDS)
def test_scan_line_start_may_be_any_index(b):
    assert b.scan_line(b"ab\ncd\n", True) == (3, BARE_LF)


# --- find_literal --------------------------------------------------------------------------

@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("line,expect", [
    (b"a LOGIN {5}", (5, False)), (b"a APPEND x {123+}", (123, True)), (b"{0}", (0, False)),
    (b"{007}", (7, False)), (b"x {1}{2}", (2, False)), (b"x {1+}", (1, True)),
    (b"a {12", (-1, False)), (b"a {}", (-1, False)), (b"a {+}", (-1, False)),
    (b"a {1x}", (-1, False)), (b"a {1}x", (-1, False)), (b"a {1++}", (-1, False)),
    (b"a {-1}", (-1, False)), (b"a {+1}", (-1, False)), (b"a { 1}", (-1, False)),
    (b"a 1}", (-1, False)), (b"}", (-1, False)), (b"+}", (-1, False)), (b"", (-1, False)),
    (b"a {\xd9\xa1}", (-1, False)),                # a non-ASCII digit is not a digit
    (b"a {" + b"9" * 19 + b"}", (-2, False)), (b"a {" + b"0" * 19 + b"+}", (-2, True)),
    (b"a {" + b"9" * 18 + b"}", (10 ** 18 - 1, False)),
    (b"a {" + b"9" * 18 + b"+}", (10 ** 18 - 1, True)),
    (b"a {" + b"1" * 5000 + b"}", (-2, False)),
])
def test_find_literal(b, line, expect):
    assert b.find_literal(line) == expect
    assert ref_find_literal(line) == expect


# --- DataScanner ---------------------------------------------------------------------------

SMUGGLE = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]
SMUGGLE_OUT = {                  # what "body" + seq + "\r\n" travels as, and its flag
    b"\n.\n": (b"body\r\n..\r\n\r\n", BARE_LF),
    b"\r.\r": (b"body\r\n..\r\n\r\n", BARE_CR),
    b"\n.\r\n": (b"body\r\n..\r\n\r\n", BARE_LF),
    b"\r\n.\n": (b"body\r\n\r\n\r\n", BARE_LF),    # client line start: the dot is un-stuffed
    b"\r.\r\n": (b"body\r\n..\r\n\r\n", BARE_CR),
}
NEXT = b"MAIL FROM:<x>\r\n"


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("seq", SMUGGLE, ids=repr)
def test_smuggling_sequences_do_not_end_data(b, seq):
    data = b"body" + seq + b"\r\n.\r\n" + NEXT
    expect_out, expect_flags = SMUGGLE_OUT[seq]
    # one feed, then every split point, then every pair of split points
    cut_sets = [()] + [(c,) for c in range(len(data) + 1)] + \
        [(c, d) for c in range(len(data) + 1) for d in range(c, len(data) + 1)]
    for cuts in cut_sets:
        out, rest, sc, log = run_data(b, data, cuts)
        assert (out, rest, sc.done, sc.flags) == (expect_out, NEXT, True, expect_flags), cuts
        assert sc.size == len(data) - len(NEXT) - 3
        assert [entry[2] for entry in log].count(True) == 1       # exactly one end
        assert_clean(out)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("seq", SMUGGLE, ids=repr)
def test_smuggling_sequence_alone_is_not_an_end(b, seq):
    data = b"body" + seq + NEXT
    for cut in range(len(data) + 1):
        out, rest, sc, _ = run_data(b, data, [cut])
        assert not sc.done and rest == b"" and sc.size == len(data)


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("data,expect,flags", [
    # empty message: the DATA command's CRLF is the first CRLF of <CRLF>.<CRLF>
    (b".\r\n", b"", 0),
    (b"a\r\n.\r\n", b"a\r\n", 0),
    (b"\r\n.\r\n", b"\r\n", 0),
    # the example of SPEC §4.4
    (b"x\n.\ny\r\n.\r\n", b"x\r\n..\r\ny\r\n", BARE_LF),
    # un-stuffing at client line starts, re-stuffing of output line starts
    (b"..lead\r\n.\r\n", b"..lead\r\n", 0),
    (b"..\r\n.\r\n", b"..\r\n", 0),
    (b"...\r\n.\r\n", b"...\r\n", 0),
    (b"a\r\n..b\r\n.\r\n", b"a\r\n..b\r\n", 0),
    (b".x\r\n.\r\n", b"x\r\n", 0),                  # a sloppy client's unstuffed dot
    (b"a.b\r\n.\r\n", b"a.b\r\n", 0),
    (b"a\n..x\r\n.\r\n", b"a\r\n...x\r\n", BARE_LF),  # after a bare LF: no un-stuffing
    (b"a\r.\r\n.\r\n", b"a\r\n..\r\n", BARE_CR),
    (b".\rx\r\n.\r\n", b"\r\nx\r\n", BARE_CR),        # ".\r" + other: dot deleted, CR bare
    (b".\r\r\n.\r\n", b"\r\n\r\n", BARE_CR),
    (b".\n.\r\n\r\n.\r\n", b"\r\n..\r\n\r\n", BARE_LF),   # ".\n": un-stuffed
    # NUL removal
    (b"a\0b\r\n.\r\n", b"ab\r\n", NUL),
    (b"\0\r\n.\r\n", b"\r\n", NUL),
    (b"\0.\r\n.\r\n", b"..\r\n", NUL),              # a dot made leading by removing NUL
    (b".\0\r\n.\r\n", b"\r\n", NUL),
    (b"\r\0\n\r\n.\r\n", b"\r\n\r\n\r\n", BARE_CR | BARE_LF | NUL),
    # bare CR / LF
    (b"a\rb\r\n.\r\n", b"a\r\nb\r\n", BARE_CR),
    (b"a\r\r\n.\r\n", b"a\r\n\r\n", BARE_CR),
    (b"a\n\r\n.\r\n", b"a\r\n\r\n", BARE_LF),
    (b"a\n\n\r\n.\r\n", b"a\r\n\r\n\r\n", BARE_LF),
    (b"\n.\r\n\r\n.\r\n", b"\r\n..\r\n\r\n", BARE_LF),   # "\n" is no client CRLF
])
def test_data_semantics(b, data, expect, flags):
    ref = ref_data(data)
    for cuts in [()] + [(c,) for c in range(len(data) + 1)]:
        out, rest, sc, _ = run_data(b, data, cuts)
        assert (out, rest, sc.done, sc.flags, sc.size) == (expect, b"", True, flags,
                                                          ref[3]), cuts
    assert ref[:3] == (expect, b"", flags)
    assert_clean(expect)


@pytest.mark.parametrize("b", BACKENDS)
def test_pipelined_command_after_the_end_stays_with_the_caller(b):
    sc = b.DataScanner()
    assert sc.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n") == (
        b"Subject: hi\r\n\r\nbody\r\n", 24)
    assert sc.done and sc.size == 21
    assert sc.feed(b"QUIT\r\n") == (b"", 0)


@pytest.mark.parametrize("b", BACKENDS)
def test_feed_after_done_and_empty_feeds(b):
    sc = b.DataScanner()
    assert sc.feed(b"") == (b"", 0)
    assert sc.feed(b"a\r") == (b"a", 2)                # the CR waits for the next byte
    assert sc.feed(b"") == (b"", 0)
    assert sc.feed(b"\n") == (b"\r\n", 1)
    assert sc.feed(b".") == (b"", 1)
    assert sc.feed(b"\r") == (b"", 1)
    assert not sc.done
    assert sc.feed(b"\nrest") == (b"", 1)
    assert sc.done and sc.size == 3 and sc.flags == 0
    assert sc.feed(b"more") == (b"", 0)
    assert sc.feed(b"") == (b"", 0)
    assert (sc.done, sc.size, sc.flags) == (True, 3, 0)


@pytest.mark.parametrize("b", BACKENDS)
def test_size_counts_raw_octets_with_stuffing(b):
    data = b"..a\r\n\0\r\n.\r\n"
    out, _, sc, _ = run_data(b, data)
    assert out == b"..a\r\n\r\n" and sc.size == len(data) - 3 and sc.flags == NUL


@pytest.mark.parametrize("b", BACKENDS)
def test_normalize_flag_does_not_change_the_output(b):
    data = b"a\n.\rb\0\r\n.\r\n"
    assert feed_pieces(b, [data], True)[0] == feed_pieces(b, [data], False)[0]
    assert b.DataScanner(False).normalize is False and b.DataScanner().normalize is True


@pytest.mark.parametrize("b", BACKENDS)
@pytest.mark.parametrize("first,body", [(b"a\r", b"\n" * 1000), (b".\r", b"\r" * 999 + b"\n"),
                                        (b"a\r", b"\r" * 999 + b"\n"), (b"a\n", b".\n" * 500),
                                        (b"", b"\n" * 4096)])
def test_worst_case_output_size(b, first, body):
    sc = b.DataScanner()
    sc.feed(first)
    out, used = sc.feed(body)
    assert used == len(body) and len(out) <= 2 * len(body) + 2
    assert_clean(out if out.endswith(b"\r\n") else out + b"\r\n")


@pytest.mark.parametrize("b", BACKENDS)
def test_large_message_in_reads(b):
    line = b"Lorem ipsum dolor sit amet\r\n"
    msg = b"Subject: x\r\n\r\n" + (line + b"..dot\r\n") * 20000    # stuffed by the client
    data = msg + b".\r\nQUIT\r\n"
    out, rest, sc, _ = feed_pieces(b, split_at(data, range(0, len(data), 65536)))
    assert out == msg and rest == b"QUIT\r\n"
    assert sc.size == len(msg) and sc.flags == 0


# --- generated input -----------------------------------------------------------------------

TOKENS = [b"\r", b"\n", b".", b"\0", b"a", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"..",
          b"\r\n.\n", b"\n.\r",
          # plain runs around the native scanner's 16-byte SIMD block, so that specials
          # land at every position of a block and at its edges
          b"y" * 15, b"0123456789abcdef", b"abcdefghijklmnopq", b"w" * 40]
token_bytes = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)
messages = st.one_of(token_bytes, token_bytes, st.binary(max_size=60),
                     st.tuples(token_bytes, st.binary(max_size=10), token_bytes).map(b"".join))
cut_lists = st.lists(st.integers(0, 200), max_size=6)


@pytest.mark.parametrize("b", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(data=messages, cuts=cut_lists)
def test_data_matches_the_reference_model_in_any_chunking(b, data, cuts):
    data += b"\r\n.\r\nNEXT"
    out, rest, sc, _ = run_data(b, data, cuts)
    assert (out, rest, sc.flags, sc.size) == ref_data(data)
    assert sc.done
    assert_clean(out)


@pytest.mark.parametrize("b", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(data=messages, cuts=cut_lists)
def test_chunking_does_not_matter(b, data, cuts):
    whole = run_data(b, data)
    split = run_data(b, data, cuts)
    assert whole[:2] == split[:2]
    assert (whole[2].done, whole[2].flags, whole[2].size) == \
        (split[2].done, split[2].flags, split[2].size)
    if not whole[2].done:
        assert whole[2].size == len(data) and ref_data(data) is None


@needs_native
@settings(max_examples=500, deadline=None)
@given(data=messages, cuts=cut_lists)
def test_native_and_python_agree_feed_by_feed(data, cuts):
    pieces = split_at(data + b"\r\n.\r\n" if len(data) % 3 else data, cuts)
    p = feed_pieces(scanner_py, pieces)
    n = feed_pieces(NATIVE, pieces)
    assert p[3] == n[3]                                       # every feed's full result
    assert p[:2] == n[:2]


@needs_native
@settings(max_examples=500, deadline=None)
@given(data=messages, start=st.integers(0, 70))
def test_native_and_python_agree_on_scan_line(data, start):
    expect = ref_scan_line(data, start)
    assert scanner_py.scan_line(data, start) == expect
    assert NATIVE.scan_line(data, start) == expect
    assert NATIVE.scan_line(bytearray(data), start) == expect


@given(data=messages, start=st.integers(0, 70))
@settings(max_examples=200, deadline=None)
def test_scan_line_on_generated_bytes(data, start):
    assert scanner_py.scan_line(data, start) == ref_scan_line(data, start)


literal_lines = st.one_of(
    st.binary(max_size=30),
    st.lists(st.sampled_from([b"{", b"}", b"+", b"0", b"7", b"9", b" ", b"a", b"\xd9"]),
             max_size=30).map(b"".join),
    st.tuples(st.binary(max_size=10), st.text("0123456789", min_size=0, max_size=22),
              st.sampled_from(["", "+", "++", "-"])).map(
                  lambda t: t[0] + b"{" + t[1].encode() + t[2].encode() + b"}"),
)


@pytest.mark.parametrize("b", BACKENDS)
@settings(max_examples=400, deadline=None)
@given(line=literal_lines)
def test_find_literal_matches_the_reference(b, line):
    assert b.find_literal(line) == ref_find_literal(line)


@needs_native
@settings(max_examples=300, deadline=None)
@given(line=literal_lines)
def test_native_and_python_agree_on_find_literal(line):
    assert NATIVE.find_literal(line) == scanner_py.find_literal(line)
    assert NATIVE.find_literal(memoryview(line)) == scanner_py.find_literal(bytearray(line))
