"""The message as milters see and change it (gateway/proto/message.py), and where it waits
(gateway/relay/spool.py, gateway/relay/held_message.py)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.native import scanner
from gateway.proto import milter as M
from gateway.proto.message import (HeaderSplitter, Stuffer, Unstuffer, apply_header_edits,
                                   clean_body, split_field)
from gateway.relay.held_message import HeldMessage
from gateway.relay.spool import Spool, prepare_spool_dir

LINES = st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"..a", b"a.b", b" x"]),
                 max_size=20)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


@settings(max_examples=300, deadline=None)
@given(LINES, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_unstuff_and_stuff_invert_each_other_across_any_chunking(lines, cuts):
    text = b"".join(line + b"\r\n" for line in lines)
    # the server core's framing of that text: what DataScanner makes of the stuffed wire form
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines)
    data_scanner = scanner.DataScanner(False)
    framed, used = data_scanner.feed(bytearray(wire + b".\r\n"))
    assert data_scanner.done and framed == wire
    unstuff, stuff = Unstuffer(), Stuffer()
    plain = b"".join(unstuff.feed(c) for c in _chunks(wire, cuts))
    assert plain == text
    assert b"".join(stuff.feed(c) for c in _chunks(text, cuts)) == wire


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_header_splitter_is_the_same_whatever_the_chunks(cuts):
    message = (b"Received: from x\r\n\tby y; date\r\nSubject: hi\r\nX-Long: a\r\n b\r\n"
               b"\r\nbody line\r\nSubject: not a header\r\n")
    splitter = HeaderSplitter()
    fields, body = [], b""
    for chunk in _chunks(message, cuts):
        f, b = splitter.feed(chunk)
        fields += f
        body += b
    f, b = splitter.finish()
    fields += f
    body += b
    assert fields == [b"Received: from x\r\n\tby y; date", b"Subject: hi", b"X-Long: a\r\n b"]
    assert splitter.separator == b"\r\n"
    assert body == b"body line\r\nSubject: not a header\r\n"
    assert split_field(fields[2]) == ("X-Long", " a\r\n b")


def test_header_block_ended_by_a_non_header_line_or_by_its_bound():
    s = HeaderSplitter()
    assert s.feed(b"Subject: x\r\nnot a header\r\nmore\r\n") == (
        [b"Subject: x"], b"not a header\r\nmore\r\n")
    assert s.eoh and s.separator == b""
    s = HeaderSplitter(limit=100)
    fields, body = s.feed(b"A: " + b"x" * 200)          # one endless line
    assert s.eoh and fields == [] and body == b"A: " + b"x" * 200
    s = HeaderSplitter()
    assert s.feed(b"Subject: only headers\r\n") == ([], b"")
    assert s.finish() == ([b"Subject: only headers"], b"")


def test_header_edits_as_postfix_applies_them():
    fields = [b"Received: r", b"Subject: s", b"X-A: 1", b"x-a: 2"]
    out = apply_header_edits(fields, [
        M.AddHeader("X-End", " e"), M.InsertHeader(0, "X-Top", " t"),
        M.InsertHeader(99, "X-Past", " p"), M.ChangeHeader(2, "X-A", " two"),
        M.ChangeHeader(1, "subject", ""), M.ChangeHeader(5, "X-New", " n"),
        M.ChangeHeader(3, "X-Gone", ""), M.ChangeFrom("<a@b>")])
    assert out == [b"X-Top: t", b"Received: r", b"X-A: 1", b"X-A: two", b"X-End: e",
                   b"X-Past: p", b"X-New: n"]


def test_clean_body():
    assert clean_body(b"a\nb\rc\r\nd\0e") == b"a\r\nb\r\nc\r\nde\r\n"
    assert clean_body(b"") == b""


def test_spool_moves_to_an_unlinked_file_beyond_its_memory(tmp_path):
    spool = Spool(str(tmp_path), memory=10)
    spool.write(b"12345")
    assert not spool.on_disk
    spool.write(b"67890abc")
    assert spool.on_disk and os.listdir(tmp_path) == []
    spool.write(b"d" * 300000)
    assert b"".join(spool.chunks(1000)) == b"1234567890abc" + b"d" * 300000
    assert all(len(c) <= 1000 for c in spool.chunks(1000))
    fd = spool._fd
    assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_mode & 0o777 == 0o600
    spool.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_prepare_spool_dir_makes_it_0700(tmp_path):
    path = tmp_path / "a" / "spool"
    prepare_spool_dir(str(path))
    assert path.stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o755)
    prepare_spool_dir(str(path))
    assert path.stat().st_mode & 0o777 == 0o700


def test_held_message_edits_and_upstream_framing(tmp_path):
    held = HeldMessage(str(tmp_path), memory=8)
    for piece in (b"Subject: x\r\nX-A: 1\r\n", b"\r\n.dot\r\nbody\r\n"):
        held.feed(piece)
    held.finish()
    assert b"".join(held.chunks()) == b"Subject: x\r\nX-A: 1\r\n\r\n.dot\r\nbody\r\n"
    assert held.on_disk
    held.apply([M.ChangeHeader(1, "X-A", ""), M.ReplaceBody(b".new\n"), M.ReplaceBody(b"x")])
    held.quarantine(["m: why"])
    assert b"".join(held.upstream_chunks()) == (
        b"X-Gateway-Quarantine: m: why\r\nSubject: x\r\n\r\n..new\r\nx\r\n")
    held.close()
