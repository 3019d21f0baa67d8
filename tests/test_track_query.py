"""`gateway track` (SPEC §7) over written tracking files: files, filters, times, output, bad
input. The records are the shape the gateway writes (TrackingRecord)."""
from __future__ import annotations

import datetime
import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from gateway import cli
from gateway.observe import track_query
from gateway.proto import replies as R
from gateway.relay.milter_data import DISCARDED
from gateway.observe.tracking_log import TrackingRecord, encode_record
from harness import NEUTRAL_CWD, gateway_subprocess_env

UTC = datetime.timezone.utc
TLS13 = "TLSv1.3 TLS_AES_256_GCM_SHA384"
TLS12 = "TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384"


def said(reply) -> str:
    """A reply as a record holds it: "code text"."""
    return f"{reply[0]} {reply[1]}"


# Replies as records hold them: the gateway's own (gateway/proto/replies.py, milter_data.py)
# and a Postfix upstream's, relayed (its queue id, its unknown-user refusal)
QUEUED = "250 2.0.0 Ok: queued as 4AbCdE"
UNKNOWN_USER = ("550 5.1.1 <nobody@x.example>: Recipient address rejected: User unknown in "
                "local recipient table")
NOT_OFFERED = said(R.UPSTREAM_TLS_NOT_OFFERED)       # 451 4.7.5 TLS is required, but ...
MUST_STARTTLS = said(R.MUST_STARTTLS)
MESSAGE_DISCARDED = said(DISCARDED)


def rec(id, time, *, mail_from="alice@a.example", rcpts=("bob@x.example",), client_tls=None,
        upstream_tls=None, result="accepted", upstream_leg=None,
        reply=QUEUED, **kw) -> TrackingRecord:
    if upstream_leg is None and result == "accepted":
        upstream_leg = "tls" if upstream_tls else "plain"
    return TrackingRecord(id=id, time=time, listener="mx", client="192.0.2.7:40000",
                          helo="client.test", mail_from=mail_from, recipients=list(rcpts),
                          size=1234, client_tls=client_tls, upstream="10.0.0.2:25",
                          upstream_tls=upstream_tls, result=result, reply=reply,
                          upstream_leg=upstream_leg, **kw)


RECORDS = [
    # both legs TLS
    rec("m.1", "2026-11-23T09:00:00.000+00:00", client_tls=TLS13, upstream_tls=TLS12),
    # plaintext client, TLS upstream
    rec("m.2", "2026-11-23T22:30:00.000+00:00", mail_from="carol@b.example",
        rcpts=("dave@y.example", "erin@x.example"), upstream_tls=TLS13),
    # TLS client, plaintext upstream, to x.example
    rec("m.3", "2026-11-24T08:00:00.000+00:00", client_tls=TLS13, rcpts=("frank@x.example",)),
    # refused by the upstream at RCPT over a plaintext leg
    rec("m.4", "2026-11-24T09:00:00.000+00:00", mail_from="", result="rejected",
        upstream_leg="plain", reply=UNKNOWN_USER,
        rcpts=("nobody@x.example",)),
    # TLS required upstream, not offered: never reached the upstream (no leg)
    rec("m.5", "2026-11-24T10:00:00.000+00:00", client_tls=TLS13, result="tempfail",
        reply=NOT_OFFERED),
    # refused by the gateway's own policy, plaintext client: no upstream leg
    rec("m.6", "2026-11-24T11:00:00.000+00:00", result="rejected",
        reply=MUST_STARTTLS, rcpts=("ops@z.example",)),
    # a milter discarded it; authenticated
    rec("m.7", "2026-11-24T12:00:00.000+00:00", client_tls=TLS13, result="discarded",
        reply=MESSAGE_DISCARDED, auth_user="alice",
        milter=[{"milter": "rspamd", "stage": "eom", "result": "discard"}]),
]


def write(path, records, *, compress=False):
    data = b"".join(encode_record(r) for r in records)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def run(capsys, *args):
    code = cli.main(["track", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def ids(capsys, *args) -> list[str]:
    code, out, err = run(capsys, "--json", *args)
    assert code == 0, err
    return [json.loads(line)["id"] for line in out.splitlines()]


@pytest.fixture
def log(tmp_path):
    return write(tmp_path / "tracking.jsonl", RECORDS)


def test_sender_and_recipient_filters(log, capsys):
    assert ids(capsys, log, "--from", "carol@b.example") == ["m.2"]
    assert ids(capsys, log, "--from", "B.EXAMPLE") == ["m.2"]
    assert ids(capsys, log, "--from", "@b.example") == ["m.2"]
    assert ids(capsys, log, "--from", "<>") == ["m.4"]
    assert ids(capsys, log, "--to", "@x.example") == ["m.1", "m.2", "m.3", "m.4", "m.5", "m.7"]
    assert ids(capsys, log, "--to", "erin@x.example") == ["m.2"]
    assert ids(capsys, log, "--to", "x.example", "--from", "a.example",
               "--result", "accepted") == ["m.1", "m.3"]


def test_addr_matches_the_sender_or_any_recipient(log, capsys):
    # "everything for bob" in one query: as sender or as any recipient (SPEC §12)
    assert ids(capsys, log, "--addr", "bob@x.example") == ["m.1", "m.5", "m.7"]
    assert ids(capsys, log, "--addr", "carol@b.example") == ["m.2"]          # sender only
    assert ids(capsys, log, "--addr", "Erin@X.example") == ["m.2"]          # 2nd recipient
    assert ids(capsys, log, "--addr", "alice@a.example") == ["m.1", "m.3", "m.5", "m.6", "m.7"]
    assert ids(capsys, log, "--addr", "@y.example") == ["m.2"]
    assert ids(capsys, log, "--addr", "b.example") == ["m.2"]
    assert ids(capsys, log, "--addr", "<>") == ["m.4"]
    assert ids(capsys, log, "--addr", "nobody@nowhere.example") == []
    # with the other filters: all must hold
    assert ids(capsys, log, "--addr", "bob@x.example", "--result", "accepted") == ["m.1"]
    assert ids(capsys, log, "--addr", "x.example", "--from", "<>") == ["m.4"]


def test_result_filter_repeatable_and_comma_list(log, capsys):
    assert ids(capsys, log, "--result", "tempfail") == ["m.5"]
    assert ids(capsys, log, "--result", "rejected,discarded") == ["m.4", "m.6", "m.7"]
    assert ids(capsys, log, "--result", "rejected", "--result", "tempfail") == [
        "m.4", "m.5", "m.6"]


def test_leg_filters_and_the_message_that_never_reached_the_upstream(log, capsys):
    assert ids(capsys, log, "--client-tls") == ["m.1", "m.3", "m.5", "m.7"]
    assert ids(capsys, log, "--no-client-tls") == ["m.2", "m.4", "m.6"]
    assert ids(capsys, log, "--upstream-tls") == ["m.1", "m.2"]
    # m.5 (tempfail before the upstream) and m.6/m.7 have no upstream leg: not "plain"
    assert ids(capsys, log, "--no-upstream-tls") == ["m.3", "m.4"]
    # every leg that existed used TLS: m.5 and m.7 had only a TLS client leg
    assert ids(capsys, log, "--tls") == ["m.1", "m.5", "m.7"]
    assert ids(capsys, log, "--no-tls") == ["m.2", "m.3", "m.4", "m.6"]
    # which mail to x.example left without TLS?
    assert ids(capsys, log, "--to", "@x.example", "--no-upstream-tls",
               "--result", "accepted") == ["m.3"]


def test_records_without_upstream_leg_are_inferred(tmp_path, capsys):
    # records written before the field existed
    old = [{k: v for k, v in asdict(r).items()
            if k not in ("upstream_leg", "auth_user", "milter")} for r in RECORDS]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [track_query.upstream_leg(r) for r in old] == ["tls", "tls", "plain", None, None, None,
                                                    None]
    assert ids(capsys, path, "--no-upstream-tls") == ["m.3"]     # m.4 is unknown: no leg
    assert ids(capsys, path, "--upstream-tls") == ["m.1", "m.2"]
    # the session writes null for "no leg": the same inference applies
    assert track_query.upstream_leg({"upstream_leg": None, "upstream_tls": None,
                               "result": "tempfail"}) is None


def test_table_marks_tls_legs_and_keeps_the_whole_reply(log, capsys):
    code, out, err = run(capsys, log)
    assert code == 0 and err == ""
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["ID", "TIME", "(UTC)", "RESULT"] and header[-3:] == [
        "AUTH", "MILTER", "REPLY"]
    assert len(lines) == 1 + len(RECORDS)
    # the record id is the first column (SPEC §12): what a log line or a user quotes back
    assert [line.split()[0] for line in lines[1:]] == [r.id for r in RECORDS]
    row = {r.id: line.split(None, 1)[1] for r, line in zip(RECORDS, lines[1:])}
    assert " TLSv1.3  TLSv1.2 " in row["m.1"]                  # client, upstream
    assert " plain    TLSv1.3 " in row["m.2"]
    assert " TLSv1.3  plain " in row["m.3"]
    assert " TLSv1.3  -  " in row["m.5"]                       # no upstream leg
    assert row["m.5"].endswith("451 4.7.5 TLS is required, but was not offered by host")
    assert row["m.6"].endswith("530 5.7.0 Must issue a STARTTLS command first")
    assert row["m.4"].endswith(UNKNOWN_USER)                   # the whole reply, spaces too
    assert row["m.2"].split()[:10] == [
        "2026-11-23", "22:30:00", "accepted", "carol@b.example", "dave@y.example,erin@x.example",
        "1234", "plain", "TLSv1.3", "-", "-"]                  # no AUTH, no MILTER
    assert row["m.7"].split()[6:10] == ["TLSv1.3", "-", "alice", "rspamd:eom:discard"]
    assert row["m.4"].split()[3] == "<>"


def test_table_without_auth_or_milter_has_no_such_columns(log, capsys):
    code, out, _ = run(capsys, log, "--result", "accepted")
    assert code == 0
    assert out.splitlines()[0].split() == ["ID", "TIME", "(UTC)", "RESULT", "FROM", "TO",
                                           "SIZE", "CLIENT", "UPSTREAM", "REPLY"]


def test_json_keeps_lists(log, capsys):
    code, out, _ = run(capsys, log, "--json", "--from", "carol@b.example")
    assert code == 0
    (line,) = out.splitlines()
    assert json.loads(line) == asdict(RECORDS[1])
    code, out, _ = run(capsys, log, "--json", "--result", "discarded")
    got = json.loads(out)
    assert got["recipients"] == ["bob@x.example"] and got["auth_user"] == "alice"
    assert got["milter"] == [{"milter": "rspamd", "stage": "eom", "result": "discard"}]


def test_several_files_positional_gzip_and_time_order(tmp_path, capsys):
    older = write(tmp_path / "t.jsonl.2.gz", RECORDS[:2], compress=True)
    middle = write(tmp_path / "t.jsonl.1", RECORDS[2:4])
    newest = write(tmp_path / "t.jsonl", RECORDS[4:])
    everything = [r.id for r in RECORDS]
    assert ids(capsys, older, middle, newest) == everything
    assert ids(capsys, newest, middle, older) == everything          # shown in time order
    assert ids(capsys, "-f", newest, "-f", older, middle) == everything
    assert ids(capsys, older, "--from", "alice@a.example", middle, "-f", newest,
               "--client-tls") == ["m.1", "m.3", "m.5", "m.7"]     # files between options
    # gzip is found by its content, whatever the name
    renamed = write(tmp_path / "archive", RECORDS[:1], compress=True)
    assert ids(capsys, renamed) == ["m.1"]


def test_config_reads_the_log_and_its_rotated_siblings(tmp_path, capsys):
    base = tmp_path / "tracking.jsonl"
    write(tmp_path / "tracking.jsonl-20261120.gz", RECORDS[:1], compress=True)
    write(tmp_path / "tracking.jsonl.10.gz", RECORDS[1:2], compress=True)
    write(tmp_path / "tracking.jsonl.2.gz", RECORDS[2:3], compress=True)
    write(tmp_path / "tracking.jsonl.1", RECORDS[3:4])
    write(base, RECORDS[4:])
    (tmp_path / "tracking.jsonl.bak").write_text("not a rotated file\n")
    (tmp_path / "tracking.jsonl.1.tmp").write_text("nor this\n")
    assert track_query.rotated_files(str(base)) == [str(tmp_path / n) for n in (
        "tracking.jsonl-20261120.gz", "tracking.jsonl.10.gz", "tracking.jsonl.2.gz",
        "tracking.jsonl.1", "tracking.jsonl")]
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\ntracking_log = "{base}"\n\n[[listeners]]\nname = "mx"\n'
                      'protocol = "smtp"\nbind = "127.0.0.1:2525"\ntls = "off"\n'
                      'upstream = { address = "127.0.0.1:2526" }\n')
    assert ids(capsys, "-c", config) == [r.id for r in RECORDS]
    # a file given on the command line wins over the configuration
    assert ids(capsys, "-c", config, base) == [r.id for r in RECORDS[4:]]
    # the current file rotated away, nothing written since: the siblings are still read
    base.unlink()
    assert ids(capsys, "-c", config) == [r.id for r in RECORDS[:4]]


def test_parse_time_forms():
    now = datetime.datetime(2026, 11, 24, 15, 30, tzinfo=UTC)
    assert track_query.parse_time("2026-11-24T10:00Z", now) == datetime.datetime(
        2026, 11, 24, 10, 0, tzinfo=UTC)
    assert track_query.parse_time("2026-11-24T10:00:00+02:00", now) == datetime.datetime(
        2026, 11, 24, 8, 0, tzinfo=UTC)
    assert track_query.parse_time("2026-11-24 10:00", now) == datetime.datetime(  # no offset: UTC
        2026, 11, 24, 10, 0, tzinfo=UTC)
    assert track_query.parse_time("2026-11-24", now) == datetime.datetime(2026, 11, 24, tzinfo=UTC)
    assert track_query.parse_time("30m", now) == now - datetime.timedelta(minutes=30)
    assert track_query.parse_time("24h", now) == now - datetime.timedelta(hours=24)
    assert track_query.parse_time("7d", now) == now - datetime.timedelta(days=7)
    assert track_query.parse_time("90s", now) == now - datetime.timedelta(seconds=90)
    assert track_query.parse_time("2w", now) == now - datetime.timedelta(weeks=2)
    assert track_query.parse_time("now", now) == now
    for bad in ("", "soon", "10:00", "24x", "-3h", "2026-13-01", "99999999999d"):
        with pytest.raises(ValueError):
            track_query.parse_time(bad, now)


@pytest.fixture
def local_tz(monkeypatch):
    """Local time is UTC+3 (no DST), so local midnight is 21:00 UTC the day before."""
    monkeypatch.setenv("TZ", "TST-3")
    time.tzset()
    yield datetime.timezone(datetime.timedelta(hours=3))
    monkeypatch.undo()
    time.tzset()


def test_today_and_yesterday_are_local_midnights(local_tz):
    now = datetime.datetime(2026, 11, 24, 1, 0, tzinfo=local_tz)      # 2026-11-23 22:00 UTC
    assert track_query.parse_time("today", now) == datetime.datetime(2026, 11, 23, 21, 0,
                                                                     tzinfo=UTC)
    assert track_query.parse_time("yesterday", now) == datetime.datetime(2026, 11, 22, 21, 0,
                                                                         tzinfo=UTC)


def test_relative_times_on_the_command_line(log, capsys, local_tz, monkeypatch):
    now = datetime.datetime(2026, 11, 24, 15, 0, tzinfo=local_tz)     # 12:00 UTC
    monkeypatch.setattr(track_query, "local_now", lambda: now)
    # yesterday (local) = 2026-11-22T21:00Z .. 2026-11-23T21:00Z; until is exclusive
    assert ids(capsys, log, "--since", "yesterday", "--until", "today") == ["m.1"]
    assert ids(capsys, log, "--since", "today") == ["m.2", "m.3", "m.4", "m.5", "m.6", "m.7"]
    assert ids(capsys, log, "--since", "3h") == ["m.4", "m.5", "m.6", "m.7"]   # 09:00Z on
    assert ids(capsys, log, "--since", "180m", "--until", "1h") == ["m.4", "m.5"]
    assert ids(capsys, log, "--since", "7d") == [r.id for r in RECORDS]
    assert ids(capsys, log, "--until", "2026-11-24T10:00Z") == ["m.1", "m.2", "m.3", "m.4"]
    assert ids(capsys, log, "--since", "2026-11-24T10:00Z") == ["m.5", "m.6", "m.7"]
    # which mail to x.example left without TLS yesterday?
    assert ids(capsys, log, "--to", "@x.example", "--since", "yesterday", "--until", "today",
               "--no-upstream-tls") == []
    assert ids(capsys, log, "--to", "@x.example", "--since", "yesterday", "--until", "today",
               "--no-tls") == []
    assert ids(capsys, log, "--to", "@x.example", "--since", "today",
               "--no-upstream-tls") == ["m.3", "m.4"]


def test_bad_lines_are_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "tracking.jsonl"
    good = encode_record(RECORDS[0])
    path.write_bytes(good[:40] + b"\n" + good + b"[1, 2]\n" + b'{"time": "yesterday"}\n'
                     + b'{"time": "2026-11-24T10:00Z", "recipients": "bob"}\n' + b"\n"
                     + b"\xff\xfe garbage\n" + encode_record(RECORDS[1]))
    code, out, err = run(capsys, "--json", path)
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["m.1", "m.2"]
    assert err == f"warning: {path}: 5 lines skipped (not tracking records)\n"
    # a record with fields missing still prints
    path.write_text('{"time": "2026-11-24T10:00Z"}\n')
    code, out, err = run(capsys, path)
    assert code == 0 and err == "" and out.splitlines()[1].startswith("-   2026-11-24 10:00:00")


def test_truncated_gzip_keeps_what_it_read(tmp_path, capsys):
    data = gzip.compress(b"".join(encode_record(r) for r in RECORDS) * 50)
    path = tmp_path / "tracking.jsonl.1.gz"
    path.write_bytes(data[:len(data) // 2])                  # still being compressed
    code, out, err = run(capsys, "--json", path)
    assert code == 0 and len(out.splitlines()) > 0
    assert err.startswith(f"warning: {path}: read stopped early: ") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--since", "soon"], "error: --since: not a time: 'soon' ("),
    (["--until", "2026-02-30"], "error: --until: not a time: '2026-02-30' ("),
    (["--result", "accepted,bounced"], "error: --result: unknown result 'bounced' (one of "
                                       "accepted, rejected, tempfail, discarded)"),
])
def test_bad_arguments_are_one_line_and_exit_2(log, capsys, args, message):
    code, out, err = run(capsys, log, *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_missing_inputs(tmp_path, capsys):
    code, out, err = run(capsys, tmp_path / "nothere.jsonl")
    assert (code, out) == (1, "")
    assert err == f"error: {tmp_path / 'nothere.jsonl'}: No such file or directory\n"
    code, _, err = run(capsys)
    assert code == 2 and err.startswith("error: no tracking log: give FILE, -f FILE or -c ")
    code, _, err = run(capsys, "-c", tmp_path / "nothere.toml")
    assert code == 2 and err.startswith(f"error: {tmp_path / 'nothere.toml'}: cannot read")
    config = tmp_path / "gateway.toml"
    config.write_text('[[listeners]]\nname = "mx"\nprotocol = "smtp"\nbind = "127.0.0.1:2525"\n'
                      'tls = "off"\nupstream = { address = "127.0.0.1:2526" }\n')
    code, _, err = run(capsys, "-c", config)
    assert (code, err) == (2, f"error: {config}: gateway.tracking_log is not set\n")
    code, _, err = run(capsys, "--tls", "--no-tls", tmp_path / "x")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run(capsys, tmp_path / "x", "--no-such-option", "y")
    assert code == 2 and err.endswith("error: unrecognized arguments: --no-such-option y\n")


def test_unreadable_directory_of_rotated_files_is_one_line(tmp_path, capsys):
    # the command, not only main(): no traceback on stderr for a file that is a directory
    path = tmp_path / "dir.jsonl"
    path.mkdir()
    out = subprocess.run([sys.executable, "-m", "gateway", "track", str(path)],
                         capture_output=True, text=True, timeout=60,
                         env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"error: {path}: Is a directory\n"
    assert os.path.isdir(path)


def _pipe_into_head(args: list[str], stderr) -> tuple[subprocess.Popen, str]:
    """`gateway ARGS | head -1`, as a shell runs it: head exits after one line, closing the
    pipe while the gateway still has output to write."""
    gw = subprocess.Popen([sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE,
                          stderr=stderr, env=gateway_subprocess_env(), cwd=NEUTRAL_CWD)
    head = subprocess.Popen(["head", "-1"], stdin=gw.stdout, stdout=subprocess.PIPE)
    gw.stdout.close()                   # only head holds the read end now
    out, _ = head.communicate(timeout=60)
    gw.wait(timeout=60)
    return gw, out.decode()


@pytest.mark.parametrize("mode", ["table", "json"])
def test_piped_into_head_ends_quietly(tmp_path, mode):
    # far more than a pipe holds (64 KiB): the gateway is still writing when head exits
    many = [rec(f"m.{i}", f"2026-11-24T10:{i // 60 % 60:02d}:{i % 60:02d}.000+00:00",
                client_tls=TLS13, upstream_tls=TLS12) for i in range(4000)]
    path = write(tmp_path / "tracking.jsonl", many)
    assert path.stat().st_size > 16 * 65536
    errors = tmp_path / "stderr"
    with open(errors, "wb") as err:
        gw, out = _pipe_into_head(["track", str(path)] + ["--json"] * (mode == "json"), err)
    assert errors.read_text() == ""                     # no BrokenPipeError traceback
    assert gw.returncode == 1                           # as Python's own recipe: 1 on EPIPE
    if mode == "json":
        assert json.loads(out)["id"] == "m.0"
    else:
        assert out.split()[:2] == ["ID", "TIME"]
