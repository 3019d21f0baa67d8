"""Real DNSSEC for tests: signed, unsigned and bogus zones served by a private nsd and
resolved by a private validating unbound, both on ephemeral loopback ports (SPEC §4.8
"Tested as it runs").

How to use it
-------------
The session fixture ``dns_testbed`` (tests/conftest.py) starts one ``DNSTestbed`` with the
records below; a test module that needs records of its own (e.g. TLSA digests of a key it
generates) starts its own, module-scoped::

    from dnszones import DNSTestbed
    with DNSTestbed(instance_dir(pubdir, "dns"), extra={"sec.test": [
            "_25._tcp.mx.mine 300 IN TLSA 3 1 1 " + digest_hex]}) as bed:
        bed.resolver        # "127.0.0.1:PORT" of the validating unbound (use as `resolver`)
        bed.nsd             # "127.0.0.1:PORT" of the authoritative nsd (answers AA, no AD)

The zones (names relative to the zone; every zone has $TTL 300 and a negative TTL of 60):

``test.``
    Signed, the trust anchor (its KSK is unbound's only ``trust-anchor``).  Delegates
    ``sec.test.`` (with DS), ``plain.test.`` (no DS: insecure) and ``bogus.test.`` (with DS).
``sec.test.``, signed; ``plain.test.``, the SAME records unsigned (AD never set)
    ``multi``     MX 10 a.multi, MX 20 b1/b2/b3.multi (equal preferences), MX 30 c.multi;
                  each host has A 192.0.2.N and AAAA 2001:db8::N (a=1, b1=21, b2=22, b3=23,
                  c=3).
    ``implicit``  no MX; A 192.0.2.5, AAAA 2001:db8::5.
    ``nullmx``    MX 0 . (RFC 7505).
    ``own``       MX 10 mx1.own (192.0.2.11), MX 20 gw.own (192.0.2.12), MX 30 mx3.own
                  (192.0.2.13) — the gateway under test calls itself gw.own.
    ``loop``      MX 10 gw.own, MX 20 mx1.own (the gateway is the best MX).
    ``ownaddr``   MX 10 mx1.own, MX 20 nat.ownaddr (192.0.2.99: an "own address").
    ``cname``     MX 10 alias.cname; alias.cname CNAME real.cname; real.cname A 192.0.2.7;
                  TLSA at _25._tcp.real.cname.
    ``dane``      MX 10 mx.dane (192.0.2.8, 2001:db8::8); _25._tcp.mx.dane TLSA 3 1 1 <64×'a'>
                  and TLSA 2 1 1 <64×'b'>.
    ``nodane``    MX 10 mx.nodane (192.0.2.9), no TLSA (validated NODATA).
    ``badsig``    MX 10 mx.badsig (192.0.2.10); _25._tcp.mx.badsig TLSA 3 1 1 <64×'c'>
                  whose RRSIG is corrupted after signing (bogus in sec.test; plain.test has
                  no signatures to break).
    ``mixed``     MX 10 mx.dane.plain.test. (a validated MX answer, an unvalidated host).
    ``noaddr``    MX 10 none.noaddr (NXDOMAIN), MX 20 mx.dane.
    ``fcrdns``    A 192.0.2.7, AAAA 2001:db8::7 (the forward side of the PTR tests).
``bogus.test.``
    Signed with expired signatures (2020): every answer is bogus → SERVFAIL.  Holds
    ``bogus.test. MX 10 mx.bogus.test.``, ``mx A 192.0.2.40`` and a TLSA at _25._tcp.mx.
``2.0.192.in-addr.arpa.``, ``8.b.d.0.1.0.0.2.ip6.arpa.`` (unsigned)
    192.0.2.7 and 2001:db8::7 → fcrdns.sec.test (confirmed); 192.0.2.50 → liar.sec.test
    (no such name: unconfirmed); 192.0.2.51 → fcrdns.sec.test (whose A is .7: unconfirmed);
    192.0.2.60 has no PTR.

Lifetime: ``__enter__`` generates keys (ldns-keygen, ECDSA P-256), signs (ldns-signzone),
starts ``nsd -d`` and ``unbound -d`` (own config, pid and log files under the instance dir,
``username: ""``, ``chroot: ""``, no remote control, never port 53 and never the system
services' configs) and waits, bounded, until unbound answers a validated query;
``__exit__`` terminates both and waits for them.  ``unbound_log()`` returns unbound's log
(verbosity 1, val-log-level 2: the reason of each bogus answer).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from peers import require

SOA_TTL = 300
NEG_TTL = 60

DANE_EE = "a" * 64
DANE_TA = "b" * 64
BADSIG = "c" * 64
CNAME_TLSA = "d" * 64

_COMMON = f"""\
multi 300 IN MX 10 a.multi
multi 300 IN MX 20 b1.multi
multi 300 IN MX 20 b2.multi
multi 300 IN MX 20 b3.multi
multi 300 IN MX 30 c.multi
a.multi 300 IN A 192.0.2.1
a.multi 300 IN AAAA 2001:db8::1
b1.multi 300 IN A 192.0.2.21
b1.multi 300 IN AAAA 2001:db8::21
b2.multi 300 IN A 192.0.2.22
b2.multi 300 IN AAAA 2001:db8::22
b3.multi 300 IN A 192.0.2.23
b3.multi 300 IN AAAA 2001:db8::23
c.multi 300 IN A 192.0.2.3
c.multi 300 IN AAAA 2001:db8::3
implicit 300 IN A 192.0.2.5
implicit 300 IN AAAA 2001:db8::5
nullmx 300 IN MX 0 .
own 300 IN MX 10 mx1.own
own 300 IN MX 20 gw.own
own 300 IN MX 30 mx3.own
mx1.own 300 IN A 192.0.2.11
gw.own 300 IN A 192.0.2.12
mx3.own 300 IN A 192.0.2.13
loop 300 IN MX 10 gw.own
loop 300 IN MX 20 mx1.own
ownaddr 300 IN MX 10 mx1.own
ownaddr 300 IN MX 20 nat.ownaddr
nat.ownaddr 300 IN A 192.0.2.99
cname 300 IN MX 10 alias.cname
alias.cname 300 IN CNAME real.cname
real.cname 300 IN A 192.0.2.7
_25._tcp.real.cname 300 IN TLSA 3 1 1 {CNAME_TLSA}
dane 300 IN MX 10 mx.dane
mx.dane 300 IN A 192.0.2.8
mx.dane 300 IN AAAA 2001:db8::8
_25._tcp.mx.dane 300 IN TLSA 3 1 1 {DANE_EE}
_25._tcp.mx.dane 300 IN TLSA 2 1 1 {DANE_TA}
nodane 300 IN MX 10 mx.nodane
mx.nodane 300 IN A 192.0.2.9
badsig 300 IN MX 10 mx.badsig
mx.badsig 300 IN A 192.0.2.10
_25._tcp.mx.badsig 300 IN TLSA 3 1 1 {BADSIG}
mixed 300 IN MX 10 mx.dane.plain.test.
noaddr 300 IN MX 10 none.noaddr
noaddr 300 IN MX 20 mx.dane
fcrdns 300 IN A 192.0.2.7
fcrdns 300 IN AAAA 2001:db8::7
"""

_BOGUS = """\
@ 300 IN MX 10 mx
mx 300 IN A 192.0.2.40
_25._tcp.mx 300 IN TLSA 3 1 1 """ + "e" * 64 + "\n"

_REV4 = """\
7 300 IN PTR fcrdns.sec.test.
50 300 IN PTR liar.sec.test.
51 300 IN PTR fcrdns.sec.test.
"""

_REV6 = """\
7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 300 IN PTR fcrdns.sec.test.
"""

REVERSE_ZONES = ("2.0.192.in-addr.arpa", "8.b.d.0.1.0.0.2.ip6.arpa")
ZONES = ("test", "sec.test", "plain.test", "bogus.test") + REVERSE_ZONES


class DNSTestbedError(RuntimeError):
    pass


def _free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise DNSTestbedError("no free port for UDP and TCP")


def _run(args, cwd, timeout=30) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DNSTestbedError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _soa(zone: str) -> str:
    return (f"$ORIGIN {zone}.\n$TTL {SOA_TTL}\n"
            f"@ {SOA_TTL} IN SOA ns.test. hostmaster.test. 1 3600 600 86400 {NEG_TTL}\n"
            f"@ {SOA_TTL} IN NS ns.test.\n")


class DNSTestbed:
    """nsd + validating unbound over the test zones; see the module docstring."""

    def __init__(self, directory: os.PathLike | str, *, extra: dict[str, list[str]] | None = None,
                 start_timeout: float = 20.0):
        self.dir = Path(directory).resolve()
        self.extra = extra or {}
        self.start_timeout = start_timeout
        self.nsd_port = 0
        self.unbound_port = 0
        self._procs: list[subprocess.Popen] = []

    # addresses for the code under test
    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.unbound_port}"

    @property
    def nsd(self) -> str:
        return f"127.0.0.1:{self.nsd_port}"

    def unbound_log(self) -> str:
        try:
            return (self.dir / "unbound" / "unbound.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # zone building -------------------------------------------------------------------
    def _keygen(self, zone: str, keydir: Path) -> str:
        base = _run([require("ldns-keygen"), "-a", "ECDSAP256SHA256", "-k", zone], keydir).strip()
        return str(keydir / base)

    def _sign(self, zone: str, text: str, key: str, zonedir: Path, *,
              inception: str | None = None, expiration: str | None = None) -> None:
        src = zonedir / f"{zone}.zone"
        src.write_text(text)
        args = [require("ldns-signzone"), "-f", str(zonedir / f"{zone}.signed")]
        if inception:
            args += ["-i", inception]
        if expiration:
            args += ["-e", expiration]
        _run(args + [str(src), key], zonedir)

    def _build_zones(self) -> dict[str, Path]:
        zonedir = self.dir / "zones"
        keydir = self.dir / "keys"
        zonedir.mkdir()
        keydir.mkdir()
        files: dict[str, Path] = {}

        def body(zone: str, records: str) -> str:
            return _soa(zone) + records + "".join(line + "\n" for line in self.extra.get(zone, ()))

        keys = {z: self._keygen(z, keydir) for z in ("test", "sec.test", "bogus.test")}
        # sec.test signed, then one RRSIG broken (the TLSA of mx.badsig)
        self._sign("sec.test", body("sec.test", _COMMON), keys["sec.test"], zonedir)
        signed = zonedir / "sec.test.signed"
        signed.write_text(_break_rrsig(signed.read_text(), "_25._tcp.mx.badsig.sec.test.", "TLSA"))
        files["sec.test"] = signed
        # bogus.test signed with signatures that expired in 2020
        self._sign("bogus.test", body("bogus.test", _BOGUS), keys["bogus.test"], zonedir,
                   inception="20190101000000", expiration="20200101000000")
        files["bogus.test"] = zonedir / "bogus.test.signed"
        # the same records, unsigned
        plain = zonedir / "plain.test.zone"
        plain.write_text(body("plain.test", _COMMON))
        files["plain.test"] = plain
        # the parent, with DS for the signed children only
        ds = "".join(_run([require("ldns-key2ds"), "-n", "-2", keys[z] + ".key"], keydir)
                     for z in ("sec.test", "bogus.test"))
        parent = body("test", "ns 300 IN A 127.0.0.1\n"
                      "sec 300 IN NS ns.test.\nplain 300 IN NS ns.test.\nbogus 300 IN NS ns.test.\n"
                      + ds)
        self._sign("test", parent, keys["test"], zonedir)
        files["test"] = zonedir / "test.signed"
        for zone, records in zip(REVERSE_ZONES, (_REV4, _REV6)):
            path = zonedir / f"{zone}.zone"
            path.write_text(body(zone, records))
            files[zone] = path
        self.trust_anchor = Path(keys["test"] + ".key").read_text().strip()
        return files

    # servers -------------------------------------------------------------------------
    def _nsd_conf(self, files: dict[str, Path]) -> Path:
        d = self.dir / "nsd"
        d.mkdir()
        zones = "".join(f'zone:\n    name: "{z}."\n    zonefile: "{p}"\n' for z, p in files.items())
        conf = d / "nsd.conf"
        conf.write_text(f"""server:
    ip-address: 127.0.0.1@{self.nsd_port}
    port: {self.nsd_port}
    do-ip6: no
    username: ""
    chroot: ""
    server-count: 1
    database: ""
    zonelistfile: "{d}/zone.list"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd.pid"
    logfile: "{d}/nsd.log"
    zonesdir: "{self.dir / 'zones'}"
    verbosity: 1
    hide-version: yes
remote-control:
    control-enable: no
{zones}""")
        return conf

    def _unbound_conf(self) -> Path:
        d = self.dir / "unbound"
        d.mkdir()
        (d / "anchor.key").write_text(self.trust_anchor + "\n")
        stubs = "".join(f'stub-zone:\n    name: "{z}."\n    stub-addr: 127.0.0.1@{self.nsd_port}\n'
                        for z in ZONES)
        nodefault = "".join(f'    local-zone: "{z}." nodefault\n' for z in ("test",) + REVERSE_ZONES)
        conf = d / "unbound.conf"
        conf.write_text(f"""server:
    interface: 127.0.0.1
    port: {self.unbound_port}
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    logfile: "{d}/unbound.log"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    num-threads: 1
    outgoing-range: 64
    do-not-query-localhost: no
    module-config: "validator iterator"
    trust-anchor-file: "{d}/anchor.key"
    val-permissive-mode: no
    harden-dnssec-stripped: yes
    access-control: 127.0.0.0/8 allow
{nodefault}remote-control:
    control-enable: no
{stubs}""")
        return conf

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.stderr", "wb")
        try:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def _wait_ready(self, deadline: float) -> None:
        import dns.flags
        import dns.message
        import dns.query
        last = None
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise DNSTestbedError(
                        f"{proc.args[0]} exited {proc.returncode}: "
                        + (self.dir / f"{Path(proc.args[0]).name}.stderr").read_text(errors="replace")
                        + self.unbound_log()[-2000:])
            try:
                q = dns.message.make_query("dane.sec.test.", "MX", want_dnssec=True)
                r = dns.query.udp(q, "127.0.0.1", timeout=0.5, port=self.unbound_port)
                if r.rcode() == 0 and r.flags & dns.flags.AD:
                    return
                last = f"rcode {r.rcode()} flags {dns.flags.to_text(r.flags)}"
            except Exception as e:  # not up yet
                last = repr(e)
            time.sleep(0.05)
        raise DNSTestbedError(f"unbound not validating within the start timeout ({last}): "
                              + self.unbound_log()[-2000:])

    def __enter__(self) -> "DNSTestbed":
        deadline = time.monotonic() + self.start_timeout
        try:
            files = self._build_zones()
            self.nsd_port = _free_udp_tcp_port()
            self.unbound_port = _free_udp_tcp_port()
            while self.unbound_port == self.nsd_port:
                self.unbound_port = _free_udp_tcp_port()
            nsd_conf = self._nsd_conf(files)
            _run([require("nsd-checkconf"), str(nsd_conf)], self.dir)
            ub_conf = self._unbound_conf()
            _run([require("unbound-checkconf"), str(ub_conf)], self.dir)
            self._spawn([require("nsd"), "-d", "-c", str(nsd_conf)], "nsd")
            self._spawn([require("unbound"), "-d", "-c", str(ub_conf)], "unbound")
            self._wait_ready(deadline)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        # each server is the leader of its own process group (nsd forks its server process):
        # the whole group is stopped, and waited for until none of it remains
        for proc in self._procs:
            _signal_group(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while _signal_group(proc.pid, 0):
                if time.monotonic() > deadline:
                    _signal_group(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        self._procs.clear()


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _break_rrsig(text: str, owner: str, covered: str) -> str:
    """Flip characters in the signature of the RRSIG over ``owner``/``covered``."""
    out = []
    broken = False
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if (not broken and len(fields) > 5 and fields[0] == owner and fields[3] == "RRSIG"
                and fields[4] == covered):
            sig = fields[-1]
            flipped = ("B" if sig[10] == "A" else "A")
            fields[-1] = sig[:10] + flipped + sig[11:]
            line = "\t".join(fields) + "\n"
            broken = True
        out.append(line)
    if not broken:
        raise DNSTestbedError(f"no RRSIG {covered} at {owner} to break")
    return "".join(out)
