"""MTA-STS groundwork (SPEC §4.8, RFC 8461; issue #23): the TXT and policy parsers rule by
rule, the MX pattern match, the policy cache's decisions in the shared state database, and
the HTTPS fetch against a real nginx on 127.0.0.2:443 serving policies with certificates of a
test CA (trustme): success, a certificate for another name, a CA outside the one given, a
redirect, a 404, a wrong Content-Type, a body over 64 KiB, a server that drips and one that
never answers — each a FetchError within the bound."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from gateway.dest import mta_sts
from gateway.dest.mta_sts import (MAX_AGE_LIMIT, CachedPolicy, FetchError, Policy, PolicyError,
                                  StsCache, fetch_policy, mx_matches, parse_policy, parse_txt)
from gateway.serve.state import FILENAME, StateStore
from peers import instance_dir, require, wait_for_port

T = 10

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmx: *.mx.example.test\r\nmax_age: 86400\r\n"


# --- the policy file (RFC 8461 §3.2) -------------------------------------------------------

def test_a_valid_policy_with_crlf_or_lf_lines():
    p = parse_policy(GOOD.encode())
    assert p == Policy(mode="enforce", mx=("mail.example.test", "*.mx.example.test"),
                       max_age=86400)
    assert parse_policy(GOOD.replace("\r\n", "\n")) == p
    # no final line end; fields in any order; spaces after the colon and at the end
    assert parse_policy("max_age:86400\nmx:   MAIL.example.test.  \nmode: testing\n"
                        "version: STSv1") == Policy("testing", ("mail.example.test",), 86400)


def test_max_age_is_clamped_and_must_be_digits():
    assert parse_policy(GOOD.replace("86400", "9999999999")).max_age == MAX_AGE_LIMIT
    assert parse_policy(GOOD.replace("86400", "0")).max_age == 0
    for bad in ("-1", "1.5", "12345678901", "", "1d", "٣"):
        with pytest.raises(PolicyError, match="max_age"):
            parse_policy(GOOD.replace("86400", bad))


def test_unknown_keys_are_ignored_when_well_formed():
    p = parse_policy(GOOD + "report_uri: mailto:x@example.test\nx-ext.1: some value\n\n")
    assert p.mode == "enforce" and len(p.mx) == 2
    with pytest.raises(PolicyError):
        parse_policy(GOOD + "_bad: value\n")            # a name starts with a letter or digit
    with pytest.raises(PolicyError):
        parse_policy(GOOD + "ext: \x01\n")               # values are printable ASCII


@pytest.mark.parametrize("body, reason", [
    (GOOD.replace("STSv1", "STSv2"), "version"),
    (GOOD.replace("version: STSv1\r\n", ""), "no version"),
    (GOOD.replace("version", "Version"), "no version"),            # names are case-sensitive
    (GOOD.replace("enforce", "Enforce"), "mode"),
    (GOOD.replace("enforce", "reject"), "mode"),
    (GOOD.replace("mode: enforce\r\n", ""), "no mode"),
    (GOOD.replace("max_age: 86400\r\n", ""), "no max_age"),
    (GOOD.replace("mx: mail.example.test\r\nmx: *.mx.example.test\r\n", ""), "without any mx"),
    (GOOD + "mode: testing\r\n", "twice"),
    (GOOD + "max_age: 5\r\n", "twice"),
    (GOOD + "mx: *.*.example.test\r\n", "mx"),
    (GOOD + "mx: mail.*.example.test\r\n", "mx"),
    (GOOD + "mx: mail_1.example.test\r\n", "mx"),
    (GOOD + "mx: -mail.example.test\r\n", "mx"),
    (GOOD + "just a line\r\n", "key: value"),
    ("<html>not a policy</html>", "key: value"),
    (GOOD.encode() + "mx: mäil.example.test\r\n".encode(), "ASCII"),
])
def test_an_invalid_policy_is_no_policy(body, reason):
    with pytest.raises(PolicyError, match=reason):
        parse_policy(body)


def test_mode_none_may_omit_mx():
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n") == \
        Policy("none", (), 86400)


# --- the TXT record (RFC 8461 §3.1) --------------------------------------------------------

def test_the_txt_record_gives_the_id():
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc"]) == "abc"
    assert parse_txt([b"v=STSv1; id=abc; ext=val"]) == "abc"
    assert parse_txt([[b"v=STSv1; id=", b"abc;"]]) == "abc"     # character-strings joined
    # records not starting v=STSv1 are discarded first
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=abc;", "hello"]) == "abc"


@pytest.mark.parametrize("records", [
    [],
    ["v=spf1 -all"],
    ["v=STSv1; id=abc;", "v=STSv1; id=def;"],      # several: no policy, even if one is valid
    ["v=STSv1; id=abc;", "v=STSv1;"],
    ["v=STSv1;"],                                  # no id
    ["v=STSv1; id=;"],
    ["v=STSv1; id=abc-def;"],                      # id is letters and digits
    ["v=STSv1; id=" + "a" * 33],                   # at most 32
    ["v=STSv1; id=abc; id=def"],
    ["v=STSv10; id=abc"],
    ["V=STSv1; id=abc"],
    [" v=STSv1; id=abc"],
    ["v=STSv1; id=abc; bad"],
    [b"v=STSv1; id=\xff"],
])
def test_no_single_valid_txt_record_is_no_new_policy(records):
    assert parse_txt(records) is None


# --- MX patterns (RFC 8461 §4.1) -----------------------------------------------------------

def test_mx_patterns():
    assert mx_matches("mail.example.net", "mail.example.net")
    assert mx_matches("mail.example.net", "MAIL.Example.NET.")
    assert mx_matches("mail.example.net.", "mail.example.net")
    assert mx_matches("*.example.net", "mx1.example.net")
    assert mx_matches("*.EXAMPLE.net", "Mx1.example.NET.")
    assert not mx_matches("*.example.net", "example.net")
    assert not mx_matches("*.example.net", "a.b.example.net")           # one label only
    assert not mx_matches("*.example.net", ".example.net")
    assert not mx_matches("*.example.net", "mx1.example.network")
    assert not mx_matches("mail.example.net", "mx.mail.example.net")
    assert not mx_matches("mail.example.net", "")
    policy = parse_policy(GOOD)
    assert policy.allows("a.mx.example.test") and policy.allows("mail.example.test")
    assert not policy.allows("other.example.test")


# --- the cache's decisions (SPEC §4.8) -----------------------------------------------------

class Fetches:
    """A fetch function that counts its calls and fails while `fail` is set."""

    def __init__(self, policy_text: str = GOOD):
        self.calls: list[str] = []
        self.fail: str | None = None
        self.text = policy_text

    async def __call__(self, domain: str) -> Policy:
        self.calls.append(domain)
        if self.fail:
            raise FetchError(self.fail)
        return parse_policy(self.text)


@pytest.fixture
def store(tmp_path):
    s = StateStore(str(tmp_path))
    yield s
    s.close()


async def test_a_new_id_refetches_the_same_id_does_not(store):
    cache, fetch = StsCache(store), Fetches()
    first = await cache.policy_for("Example.Test.", 1000.0, txt=["v=STSv1; id=one"],
                                   fetch=fetch)
    assert (first.source, first.error, fetch.calls) == ("fetched", None, ["example.test"])
    assert first.policy == CachedPolicy("example.test", "one", parse_policy(GOOD), 1000.0,
                                        87400.0)
    again = await cache.policy_for("example.test", 2000.0, txt=["v=STSv1; id=one"],
                                   fetch=fetch)
    assert (again.source, again.policy, len(fetch.calls)) == ("cache", first.policy, 1)
    fetch.text = GOOD.replace("enforce", "testing")
    new = await cache.policy_for("example.test", 3000.0, txt=["v=STSv1; id=two"], fetch=fetch)
    assert (new.source, new.policy.policy_id, new.policy.policy.mode) == \
        ("fetched", "two", "testing")
    assert len(fetch.calls) == 2
    # stored: a new cache on the same database (another worker) sees it without fetching
    other = await StsCache(StateStore(os.path.dirname(store.path))).policy_for(
        "example.test", 4000.0, txt=["v=STSv1; id=two"], fetch=fetch)
    assert (other.source, other.policy) == ("cache", new.policy)
    assert len(fetch.calls) == 2
    # the refresher fetches even under the same id, and the expiry moves on
    ref = await cache.policy_for("example.test", 5000.0, txt=["v=STSv1; id=two"], fetch=fetch,
                                 refresh=True)
    assert (ref.source, ref.policy.expires_at, len(fetch.calls)) == ("fetched", 91400.0, 3)


async def test_failures_keep_an_unexpired_policy(store):
    cache, fetch = StsCache(store), Fetches()
    await cache.policy_for("example.test", 1000.0, txt=["v=STSv1; id=one"], fetch=fetch)
    fetch.fail = "HTTP 500"
    kept = await cache.policy_for("example.test", 2000.0, txt=["v=STSv1; id=two"], fetch=fetch)
    assert (kept.source, kept.policy.policy_id, kept.error) == ("cache", "one", "HTTP 500")
    for txt in ([], ["v=STSv1;"], ["v=STSv1; id=a", "v=STSv1; id=b"], mta_sts.TXT_FAILED):
        kept = await cache.policy_for("example.test", 2000.0, txt=txt, fetch=fetch)
        assert (kept.source, kept.policy.policy_id) == ("cache", "one"), txt
    assert len(fetch.calls) == 2                 # only the new id tried a fetch
    # a failed refresh keeps it too, and does not shorten it
    kept = await cache.policy_for("example.test", 2000.0, txt=["v=STSv1; id=one"],
                                  fetch=fetch, refresh=True)
    assert (kept.source, kept.policy.expires_at) == ("cache", 87400.0)


async def test_expired_and_failed_is_no_policy_never_a_tempfail(store):
    cache, fetch = StsCache(store), Fetches()
    await cache.policy_for("example.test", 1000.0, txt=["v=STSv1; id=one"], fetch=fetch)
    expired = 1000.0 + 86400
    fetch.fail = "cannot connect"
    for txt in (["v=STSv1; id=one"], ["v=STSv1; id=two"]):
        gone = await cache.policy_for("example.test", expired, txt=txt, fetch=fetch)
        assert (gone.policy, gone.source, gone.error) == (None, "none", "cannot connect")
    for txt in ([], mta_sts.TXT_FAILED):
        gone = await cache.policy_for("example.test", expired, txt=txt, fetch=fetch)
        assert (gone.policy, gone.source) == (None, "none")
    # the same id past max_age is fetched again (not trusted from the cache)
    fetch.fail = None
    back = await cache.policy_for("example.test", expired, txt=["v=STSv1; id=one"],
                                  fetch=fetch)
    assert (back.source, back.policy.expires_at) == ("fetched", expired + 86400)
    # nothing cached and no TXT: no policy, no fetch
    calls = len(fetch.calls)
    none = await cache.policy_for("other.test", 1000.0, txt=[], fetch=fetch)
    assert (none.policy, none.source, len(fetch.calls)) == (None, "none", calls)


async def test_mode_none_replaces_an_enforced_policy(store):
    cache, fetch = StsCache(store), Fetches()
    await cache.policy_for("example.test", 1000.0, txt=["v=STSv1; id=one"], fetch=fetch)
    fetch.text = "version: STSv1\nmode: none\nmax_age: 86400\n"
    got = await cache.policy_for("example.test", 1100.0, txt=["v=STSv1; id=two"], fetch=fetch)
    assert (got.source, got.policy.policy.mode, got.policy.policy.mx) == ("fetched", "none", ())
    assert (await cache.get("example.test")).policy.mode == "none"


async def test_due_for_refresh_lists_what_expires_soon(store):
    cache = StsCache(store)
    for domain, max_age in (("a.test", 100), ("b.test", 5000), ("c.test", 50)):
        await cache.policy_for(domain, 1000.0, txt=["v=STSv1; id=x"],
                               fetch=Fetches(GOOD.replace("86400", str(max_age))))
    assert await cache.due_for_refresh(1000.0, 200) == ["c.test", "a.test"]
    assert await cache.due_for_refresh(1060.0, 0) == ["c.test"]          # expired included
    assert await cache.due_for_refresh(1000.0, 10) == []


async def test_a_read_only_store_reads_and_never_writes(tmp_path):
    ro = StateStore(str(tmp_path), read_only=True)
    cache = StsCache(ro)
    fetch = Fetches()
    # no database yet: nothing cached, and nothing created
    got = await cache.policy_for("example.test", 1000.0, txt=["v=STSv1; id=one"], fetch=fetch)
    assert (got.source, got.error) == ("fetched", None)       # used, not stored
    assert await cache.due_for_refresh(1000.0, 10**9) == []
    assert not os.path.exists(tmp_path / FILENAME)
    rw = StateStore(str(tmp_path))
    await StsCache(rw).policy_for("example.test", 1000.0, txt=["v=STSv1; id=one"], fetch=fetch)
    rw.close()
    before = os.stat(tmp_path / FILENAME)
    assert (await cache.get("example.test")).policy_id == "one"
    assert await cache.due_for_refresh(1000.0, 10**9) == ["example.test"]
    with pytest.raises(Exception, match="readonly"):
        ro.put_sts_policy(ro.get_sts_policy("example.test"))
    ro.close()
    after = os.stat(tmp_path / FILENAME)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `gateway policy --resolve` runs")
def test_a_root_reader_leaves_the_wal_files_to_the_owner(tmp_path):
    rw = StateStore(str(tmp_path))
    rw.put_sts_policy(mta_sts._to_row(CachedPolicy("a.test", "1", parse_policy(GOOD), 1.0,
                                                    2.0)))
    rw.close()                                   # the last connection: -wal and -shm go
    db = tmp_path / FILENAME
    os.chown(db, 65534, 65534)
    assert not os.path.exists(f"{db}-shm")
    ro = StateStore(str(tmp_path), read_only=True)
    assert ro.get_sts_policy("a.test").mx == ("mail.example.test", "*.mx.example.test")
    owners = {(os.stat(f"{db}{s}").st_uid, os.stat(f"{db}{s}").st_gid) for s in ("-wal", "-shm")
              if os.path.exists(f"{db}{s}")}
    ro.close()
    assert owners == {(65534, 65534)}


async def test_a_broken_store_is_an_uncached_policy(tmp_path):
    (tmp_path / "file").write_text("x")
    cache = StsCache(StateStore(str(tmp_path / "file")))        # a directory that is a file
    got = await cache.policy_for("example.test", 1000.0, txt=["v=STSv1; id=one"],
                                 fetch=Fetches())
    assert got.source == "fetched" and got.policy.policy.mode == "enforce"
    assert "policy cache" in got.error
    none = await cache.policy_for("example.test", 1000.0, txt=[], fetch=Fetches())
    assert (none.policy, none.source) == (None, "none") and "policy cache" in none.error


# --- the HTTPS fetch against nginx ---------------------------------------------------------

ADDRESS = "127.0.0.2"          # nginx, port 443
SILENT = "127.0.0.3"           # a listener that accepts and never answers, port 443
DEAD = "127.0.0.4"             # nothing listens
NAMES = ("example.test", "redirect.test", "missing.test", "big.test", "html.test",
         "drip.test", "broken.test")
WRONG_NAME = "wrongname.test"  # its certificate names www.other.test


def _server(name: str, cert: str, key: str, location: str, root: Path) -> str:
    return f"""
    server {{
        listen {ADDRESS}:443 ssl;
        server_name mta-sts.{name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location = /.well-known/mta-sts.txt {{
            types {{ }}
            {location}
        }}
    }}"""


@pytest.fixture(scope="module")
def nginx(ca, pubdir):
    """A private nginx serving the test domains' policies on 127.0.0.2:443."""
    binary = require("nginx")
    d = instance_dir(pubdir, "nginx")
    (d / "tmp").mkdir()
    good = ca.issue_cert(*(f"mta-sts.{n}" for n in (*NAMES, "second.test")))
    wrong = ca.issue_cert("www.other.test")
    for stem, issued in (("good", good), ("wrong", wrong)):
        issued.private_key_pem.write_to_path(str(d / f"{stem}.key"))
        issued.cert_chain_pems[0].write_to_path(str(d / f"{stem}.crt"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    www = d / "www" / ".well-known"
    www.mkdir(parents=True)
    (www / "mta-sts.txt").write_text(GOOD)
    big = d / "big" / ".well-known"
    big.mkdir(parents=True)
    (big / "mta-sts.txt").write_text(GOOD + "".join(f"x{i}: {'y' * 60}\n" for i in range(1100)))
    assert (big / "mta-sts.txt").stat().st_size > 64 * 1024
    gc, gk = d / "good.crt", d / "good.key"
    servers = [
        # the first: the default server, also for mta-sts.second.test
        _server("example.test", gc, gk, "default_type text/plain;", d / "www"),
        _server(WRONG_NAME, d / "wrong.crt", d / "wrong.key", "default_type text/plain;",
                d / "www"),
        _server("redirect.test", gc, gk,
                "return 301 https://mta-sts.example.test/.well-known/mta-sts.txt;", d / "www"),
        _server("missing.test", gc, gk, "default_type text/plain;", d / "nowhere"),
        _server("big.test", gc, gk, "default_type text/plain;", d / "big"),
        _server("html.test", gc, gk, "default_type text/html;", d / "www"),
        _server("drip.test", gc, gk, "default_type text/plain; limit_rate 1; "
                "limit_rate_after 0;", d / "www"),
        _server("broken.test", gc, gk, 'default_type text/plain; return 200 "<html>";',
                d / "www"),
    ]
    temp = " ".join(f"{kind}_temp_path {d / 'tmp' / kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (d / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {d / 'nginx.pid'};
error_log {d / 'error.log'} info;
events {{ worker_connections 64; }}
http {{
    log_format sts '$host "$request" $status $bytes_sent';
    access_log {d / 'access.log'} sts;
    {temp}
    {''.join(servers)}
}}
""")
    proc = subprocess.Popen([binary, "-p", str(d), "-c", str(d / "nginx.conf"),
                             "-e", str(d / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=open(d / "console.log", "wb"))
    try:
        wait_for_port(ADDRESS, 443, timeout=T, alive=lambda: proc.poll() is None)
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=T)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def resolver(table: dict[str, list[str]]):
    async def resolve(name: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        if name not in table:
            raise LookupError(f"NXDOMAIN {name}")
        return table[name]
    return resolve


RESOLVE = resolver({f"mta-sts.{n}": [ADDRESS] for n in (*NAMES, WRONG_NAME)}
                   | {"mta-sts.silent.test": [SILENT], "mta-sts.dead.test": [DEAD],
                      "mta-sts.second.test": [DEAD, ADDRESS], "mta-sts.empty.test": []})


async def fetch(nginx, domain: str, *, timeout: float = 5.0, ca: bool = True):
    with trio.fail_after(T):
        return await fetch_policy(domain, resolve=RESOLVE, timeout=timeout,
                                  ca_file=str(nginx / "ca.crt") if ca else None)


async def test_the_policy_is_fetched_over_verified_https(nginx):
    assert await fetch(nginx, "example.test") == parse_policy(GOOD)
    assert await fetch(nginx, "EXAMPLE.test.") == parse_policy(GOOD)
    log = (nginx / "access.log").read_text()
    assert 'mta-sts.example.test "GET /.well-known/mta-sts.txt HTTP/1.1" 200' in log


async def test_the_next_address_is_tried_when_one_refuses(nginx):
    assert (await fetch(nginx, "second.test")).mode == "enforce"


@pytest.mark.parametrize("domain, kwargs, reason", [
    (WRONG_NAME, {}, "not valid: hostname mismatch"),
    ("example.test", {"ca": False}, "not valid: unable to verify"),   # the system's CAs
    ("redirect.test", {}, "HTTP 301: redirects are not followed"),
    ("missing.test", {}, "HTTP 404"),
    ("html.test", {}, "Content-Type text/html, not text/plain"),
    ("big.test", {}, "larger than 65536 bytes"),
    ("broken.test", {}, "invalid policy: line 1"),
    ("dead.test", {}, "cannot connect to mta-sts.dead.test port 443"),
    ("empty.test", {}, "has no address"),
    ("nxdomain.test", {}, "cannot resolve mta-sts.nxdomain.test: NXDOMAIN"),
])
async def test_a_failed_fetch_says_why(nginx, domain, kwargs, reason):
    with pytest.raises(FetchError) as info:
        await fetch(nginx, domain, **kwargs)
    assert reason in info.value.reason


@pytest.mark.parametrize("domain", ["drip.test", "silent.test"])
async def test_a_stalling_server_fails_within_the_bound(nginx, domain):
    with trio.socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await silent.bind((SILENT, 443))
        silent.listen(4)                     # accepted by the kernel, never read or answered
        start = time.monotonic()
        with pytest.raises(FetchError, match=r"no policy from mta-sts\.\S+ within 1 s"):
            await fetch(nginx, domain, timeout=1.0)
        elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 2.0
    if domain == "drip.test":      # nginx had begun to answer (a drip, not silence): its log
        with trio.fail_after(T):   # line comes when it notices the connection is gone
            while not (m := re.search(r'mta-sts\.drip\.test "GET \S+ HTTP/1\.1" 200 (\d+)',
                                      (nginx / "access.log").read_text())):
                await trio.sleep(0.05)
        assert int(m.group(1)) > 0


async def test_the_cache_over_real_fetches_keeps_a_policy_when_its_host_dies(nginx, store):
    cache = StsCache(store)
    live = lambda d: fetch_policy(d, resolve=RESOLVE, ca_file=str(nginx / "ca.crt"),
                                  timeout=5.0)
    dead = lambda d: fetch_policy(d, resolve=resolver({"mta-sts.example.test": [DEAD]}),
                                  ca_file=str(nginx / "ca.crt"), timeout=5.0)
    with trio.fail_after(T):
        got = await cache.policy_for("example.test", 1000.0, txt=["v=STSv1; id=1"], fetch=live)
        assert got.source == "fetched" and got.policy.policy.allows("x.mx.example.test")
        kept = await cache.policy_for("example.test", 2000.0, txt=["v=STSv1; id=2"],
                                      fetch=dead)
        assert (kept.source, kept.policy.policy_id) == ("cache", "1")
        assert "cannot connect" in kept.error
        gone = await cache.policy_for("example.test", 1000.0 + 86400, txt=["v=STSv1; id=2"],
                                      fetch=dead)
        assert (gone.policy, gone.source) == (None, "none")
