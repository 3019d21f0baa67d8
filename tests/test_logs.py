"""The structured event log (SPEC §7)."""
from __future__ import annotations

import io
import json
import re

from hypothesis import given
from hypothesis import strategies as st

from gateway.observe.logs import EventLog, format_logfmt, new_conn_id, timestamp

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def logfmt_pairs(line: str) -> list[tuple[str, str]]:
    """A small logfmt reader (for the tests): keys and unescaped values, in order."""
    pairs = []
    for m in re.finditer(r'(\S+?)=("((?:[^"\\]|\\.)*)"|\S*)(?: |\Z)', line):
        value = m.group(3) if m.group(3) is not None else m.group(2)
        if m.group(3) is not None:
            value = re.sub(r"\\(.)", lambda e: {"n": "\n", "r": "\r", "t": "\t"}
                           .get(e.group(1), e.group(1)), value)
        pairs.append((m.group(1), value))
    return pairs


def test_logfmt_line_and_key_order():
    out = io.StringIO()
    log = EventLog("logfmt", stream=out)
    conn = log.bind(listener="inbound").bind(conn="abc123", client="192.0.2.7:4000")
    conn.event("tls", side="client", version="TLSv1.3", verified=False)
    (line,) = lines(out)
    keys = [k for k, _ in logfmt_pairs(line)]
    assert keys == ["ts", "level", "event", "conn", "listener", "client", "side", "version",
                    "verified"]
    assert TS.match(dict(logfmt_pairs(line))["ts"])
    assert line.split(" ", 1)[1] == ("level=info event=tls conn=abc123 listener=inbound "
                                     "client=192.0.2.7:4000 side=client version=TLSv1.3 "
                                     "verified=false")


def test_bound_fields_keep_their_order_after_the_leading_ones():
    out = io.StringIO()
    log = EventLog(stream=out)
    log.bind(zeta=1, alpha=2).bind(client="c", beta=3).event("x", level="warning", gamma=4)
    keys = [k for k, _ in logfmt_pairs(lines(out)[0])]
    assert keys == ["ts", "level", "event", "client", "zeta", "alpha", "beta", "gamma"]
    assert "level=warning" in out.getvalue()


def test_call_field_overrides_a_bound_one_in_place():
    out = io.StringIO()
    EventLog(stream=out).bind(conn="a", side="client").event("e", side="upstream")
    assert lines(out)[0].endswith("event=e conn=a side=upstream")


def test_logfmt_quoting_and_escaping():
    record = {"a": "plain", "b": "two words", "c": "k=v", "d": 'say "hi"', "e": "",
              "f": "back\\slash", "g": "line1\nline2\r", "h": True, "i": 42, "j": 1.5,
              "k": "tab\there", "l": "\x00\x1b", "m": "ünïcode"}
    line = format_logfmt(record)
    assert line == ('a=plain b="two words" c="k=v" d="say \\"hi\\"" e="" '
                    'f="back\\\\slash" g="line1\\nline2\\r" h=true i=42 j=1.5 '
                    'k="tab\\there" l="\\x00\\x1b" m=ünïcode')
    assert "\n" not in line
    parsed = dict(logfmt_pairs(line))
    for key in "abcdefgk":
        assert parsed[key] == record[key], key


def test_none_values_are_omitted():
    out = io.StringIO()
    EventLog(stream=out).bind(conn=None).event("e", peer=None, x=1)
    assert lines(out)[0].split(" ", 1)[1] == "level=info event=e x=1"


def test_odd_values_never_raise():
    class Bad:
        def __str__(self):
            raise RuntimeError("no")

        def __repr__(self):
            raise RuntimeError("no")

    out = io.StringIO()
    for fmt in ("logfmt", "json"):
        log = EventLog(fmt, stream=out)
        log.event("odd", data=b"\xff\x00bytes \"q\"", obj=Bad(), nan=float("nan"),
                  lst=["a", 1], nested={"k": [1, 2]}, exc=ValueError("boom"))
    first, second = lines(out)
    assert 'data="\\\\xff\\x00bytes \\"q\\""' in first   # undecodable byte, NUL
    assert "obj=<unprintable" in first or 'obj="<unprintable' in first
    assert "lst=a,1" in first
    decoded = json.loads(second)
    assert decoded["data"] == '\\xff\x00bytes "q"'
    assert decoded["nan"] == "nan" and decoded["lst"] == ["a", 1]
    assert decoded["nested"] == {"k": [1, 2]} and decoded["exc"] == "boom"


def test_a_broken_stream_is_ignored():
    class Broken:
        lines: list[str] = []

        def write(self, text):
            self.lines.append(text)
            raise BrokenPipeError

        def flush(self):
            raise BrokenPipeError

    stream = Broken()
    log = EventLog(stream=stream)
    log.event("e", x=1)                            # must not raise
    log.bind(conn="c1").event("f", y=2)            # nor a bound one, and logging goes on
    assert [line.split(" ", 1)[1] for line in stream.lines] == [
        "level=info event=e x=1\n", "level=info event=f conn=c1 y=2\n"]


def test_reserved_names_do_not_clobber_the_header():
    out = io.StringIO()
    EventLog(stream=out).bind(ts="bound").event("e")
    pairs = logfmt_pairs(lines(out)[0])
    assert pairs[0][0] == "ts" and TS.match(pairs[0][1])
    assert ("ts_", "bound") in pairs


def test_json_lines_with_the_same_key_order():
    out = io.StringIO()
    log = EventLog("json", stream=out)
    conn = log.bind(listener="inbound").bind(conn="c1", client="[2001:db8::1]:25")
    conn.event("conn_close", duration=1.25, bytes_in=10, bytes_out=20, note="a \"b\"\n")
    conn.event("message", level="warning", ok=True, skip=None)
    first, second = (json.loads(line) for line in lines(out))
    assert list(first) == ["ts", "level", "event", "conn", "listener", "client", "duration",
                           "bytes_in", "bytes_out", "note"]
    assert first["duration"] == 1.25 and first["note"] == 'a "b"\n'
    assert TS.match(first["ts"])
    assert second["level"] == "warning" and second["ok"] is True and "skip" not in second


def test_default_stream_is_stderr_at_write_time(capsys):
    EventLog().event("hello", who="me")
    err = capsys.readouterr().err
    assert "event=hello who=me" in err and err.endswith("\n")


def test_timestamp_format():
    assert timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(1700000000.1234) == "2023-11-14T22:13:20.123Z"


def test_conn_ids_are_short_and_unique():
    ids = {new_conn_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(re.fullmatch(r"[a-z2-7]{10}", i) for i in ids)


@given(st.text(), st.text())
def test_logfmt_round_trips_any_text(key_value, other):
    line = format_logfmt({"v": key_value, "w": other})
    assert "\n" not in line
    parsed = dict(logfmt_pairs(line))
    # non-printable characters other than \n \r \t are shown as escapes, not reproduced
    if all(ch.isprintable() or ch in "\n\r\t" for ch in key_value + other):
        assert parsed == {"v": key_value, "w": other}


_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3),
                    st.binary(max_size=8))
_keys = st.sampled_from(["conn", "client", "listener", "ts", "reason",
                         "size", "a b", "é", "x=y", "code"])


@given(bound=st.dictionaries(_keys, _values, max_size=4),
       fields=st.dictionaries(_keys, _values, max_size=5),
       event=st.text(max_size=10), level=st.sampled_from(["info", "warning", "odd level"]))
def test_bound_logfmt_fast_path_writes_what_the_general_path_writes(bound, fields, event,
                                                                     level):
    """BoundLog formats its bound fields once; the lines must equal the general formatter's
    for any fields, including ones that repeat a bound key or a reserved one."""
    import gateway.observe.logs as L
    out = io.StringIO()
    log = EventLog("logfmt", stream=out)
    bound_log = log.bind(**bound)
    saved = L.timestamp
    L.timestamp = lambda now=None: "T"
    try:
        bound_log.event(event, level, **fields)
        bound_log.event(event, level, **fields)       # again, with the prefix cached
        expected = format_logfmt(EventLog._record(event, level, bound_log.fields, fields))
    finally:
        L.timestamp = saved
    assert lines(out) == [expected, expected]


def test_timestamp_cache_follows_the_clock():
    assert timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert timestamp(1.25) == "1970-01-01T00:00:01.250Z"
    assert timestamp(86400.5) == "1970-01-02T00:00:00.500Z"
    assert timestamp(0.001) == "1970-01-01T00:00:00.001Z"
