"""MTA-STS (RFC 8461) for destinations — groundwork for SPEC §4.8, not wired into the
configuration or the sessions yet (no `sts` level, no `sts_fetch`/`sts_ca_file` keys so far).

What is here, each piece usable on its own:

- `parse_txt(records)`: the `_mta-sts.DOMAIN` TXT answer → the policy id, or None when there
  is no usable record (none or several starting `v=STSv1`, or one that is invalid: RFC 8461
  §3.1 — then there is no *new* policy, a cached one still holds).
- `parse_policy(body)`: the policy file (§3.2) → `Policy`, or `PolicyError`. Lines end in
  CRLF or LF (blank lines are skipped), `version: STSv1`, `mode` one of enforce/testing/none,
  one or more `mx` (may be absent only with `mode: none`, the way a domain withdraws its
  policy, §8.3), `max_age` of at most 10 digits clamped to 31,557,600; unknown keys with a
  valid name are ignored; a repeated `version`/`mode`/`max_age` or anything else outside the
  grammar makes the whole file invalid (→ no policy).
- `mx_matches(pattern, host)`: §4.1 — a pattern `*.example.net` matches exactly one leftmost
  label (`mail.example.net`, not `example.net` nor `a.b.example.net`); case-insensitive;
  trailing dots ignored. Not the rules' subdomain patterns (§4.3).
- `fetch_policy(domain, resolve=..., ca_file=..., timeout=...)`: GET
  `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` on port 443; the certificate verified for
  `mta-sts.DOMAIN` against the Web PKI (`ca_file`, default the system bundle — never a
  listener profile's CA); no redirects, HTTP 200 only, `Content-Type: text/plain`, at most
  64 KiB, no HTTP caching; the whole fetch (every address tried, TLS, HTTP) bounded by
  `timeout`. Any failure is a `FetchError` with a short reason. The addresses come from
  `resolve(name) -> list[str]` (the DNS module's, or a test's mapping).
- `StsCache`: the policy cache in the shared state database (gateway.state, table
  `sts_policies`) and `policy_for(domain, now, txt=..., fetch=...)`, the §4.8 decision: an
  unexpired cached policy is used while the TXT id is the same; a new id fetches; a missing
  TXT record, a DNS failure or a failed fetch keeps an unexpired cached policy; with nothing
  (unexpired) cached there is no policy — never a temporary failure. `due_for_refresh` lists
  the domains a refresher should fetch ahead of expiry.

HTTP is h11 over the gateway's own TLS client stream (gateway.tls.stream.TLSStream with a
client context of gateway.tls.context), not httpx: one TLS stack for every leg the gateway
opens, whose certificate check is the native C verify callback (no Python callback inside
OpenSSL, so W^X holds, SPEC §3.3, §10) and the same service_identity name check as the
upstream `verify` level; httpx would bring the stdlib ssl module, a second stack with its
own defaults, plus anyio/httpcore for one GET. h11 is the sans-IO HTTP/1.1 parser httpx
itself uses underneath (via httpcore); here it parses one response with our bounds.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import h11
import trio

from ..errors import TLSError
from ..net.sockstream import open_tcp
from ..serve.state import StateStore, StsRow
from ..tls.context import client_context
from ..tls.profiles import Profile
from ..tls.stream import TLSStream

MAX_AGE_LIMIT = 31_557_600          # RFC 8461 §3.2: max_age is at most a year
MAX_POLICY_SIZE = 64 * 1024         # RFC 8461 §3.3: senders may limit the body to 64 KiB
HTTPS_PORT = 443
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
DEFAULT_FETCH_TIMEOUT = 30.0        # SPEC §4.8 sts_fetch's default
MODES = ("enforce", "testing", "none")

_RECEIVE_SIZE = 16384
_MAX_HEADER_BYTES = 16384           # the response head (h11's incomplete-event bound)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MX_PATTERN_RE = re.compile(rf"(?:\*\.)?{_DOMAIN_RE.pattern}\.?")    # a final dot: tolerated
_EXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_POLICY_VALUE_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_TXT_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXT_VALUE_RE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_WSP = " \t"


class PolicyError(ValueError):
    """A policy file that is not a valid STSv1 policy."""


class FetchError(Exception):
    """The policy could not be fetched; `reason` says why (for logs and `--resolve`)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Policy:
    """A parsed policy (RFC 8461 §3.2)."""

    mode: str
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether the MX host *host* matches one of the policy's mx patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


@dataclass(frozen=True)
class CachedPolicy:
    """A policy as cached: which TXT id it was fetched under, when, and until when."""

    domain: str
    policy_id: str
    policy: Policy
    fetched_at: float
    expires_at: float

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True)
class Lookup:
    """What `StsCache.policy_for` decided: the policy in force (None: no policy, deliver as
    `preferred`), where it came from — "cache", "fetched", or "none" — and the reason a
    TXT lookup, fetch or the store failed (for the log; the decision already allows for it)."""

    policy: CachedPolicy | None
    source: str
    error: str | None = None


# --------------------------------------------------------------------------- names

def normalize_name(name: str) -> str:
    """A DNS name for comparison: lower case, without the trailing dot."""
    return name.rstrip(".").lower()


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: *host* is *pattern*, or *pattern* is `*.REST` and *host* is one label
    followed by REST. Case-insensitive; trailing dots ignored."""
    pattern = normalize_name(pattern)
    host = normalize_name(host)
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


# --------------------------------------------------------------------------- TXT record

def _txt_text(record) -> str | None:
    if isinstance(record, (bytes, bytearray)):
        try:
            return bytes(record).decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(record, str):
        return record
    # a sequence of character-strings (one TXT record split in 255-byte pieces): joined
    try:
        parts = [_txt_text(part) for part in record]
    except TypeError:
        return None
    return None if any(p is None for p in parts) else "".join(parts)


def _starts_stsv1(text: str) -> bool:
    return text.startswith("v=STSv1") and (len(text) == 7 or text[7] in _WSP + ";")


def _parse_txt_record(text: str) -> str | None:
    """The id of one record that starts `v=STSv1` (RFC 8461 §3.1's grammar), or None."""
    fields = [f.strip(_WSP) for f in text.split(";")]
    if fields and fields[-1] == "":          # an optional final delimiter
        fields.pop()
    if not fields or fields[0] != "v=STSv1":
        return None
    ident = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if not eq:
            return None
        if name == "id":
            if ident is not None or not _TXT_ID_RE.fullmatch(value):
                return None
            ident = value
        elif not (_EXT_NAME_RE.fullmatch(name) and _TXT_EXT_VALUE_RE.fullmatch(value)):
            return None
    return ident


def parse_txt(records: Sequence) -> str | None:
    """The policy id from the TXT records of `_mta-sts.DOMAIN` (str, bytes, or a record's
    character-strings), or None: records not starting `v=STSv1` are discarded, and unless
    exactly one is left and it is valid with an `id`, there is no (new) policy."""
    candidates = []
    for record in records:
        text = _txt_text(record)
        if text is None:
            continue
        if _starts_stsv1(text):
            candidates.append(text)
    if len(candidates) != 1:
        return None
    return _parse_txt_record(candidates[0])


# --------------------------------------------------------------------------- policy file

def parse_policy(body: bytes | str) -> Policy:
    """The policy file → Policy; PolicyError (the reason) when it is not a valid policy."""
    if isinstance(body, (bytes, bytearray)):
        try:
            text = bytes(body).decode("ascii")
        except UnicodeDecodeError:
            raise PolicyError("the policy is not ASCII text") from None
    else:
        text = body
    version = mode = max_age = None
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip(_WSP):
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"line {number}: not a key: value pair")
        value = value.strip(_WSP)
        if key == "version":
            if version is not None:
                raise PolicyError("version given twice")
            if value != "STSv1":
                raise PolicyError(f"version {value!r} is not STSv1")
            version = value
        elif key == "mode":
            if mode is not None:
                raise PolicyError("mode given twice")
            if value not in MODES:
                raise PolicyError(f"mode {value!r} is not enforce, testing or none")
            mode = value
        elif key == "max_age":
            if max_age is not None:
                raise PolicyError("max_age given twice")
            if not (value.isascii() and value.isdigit() and len(value) <= 10):
                raise PolicyError(f"max_age {value!r} is not an integer of 1 to 10 digits")
            max_age = min(int(value), MAX_AGE_LIMIT)
        elif key == "mx":
            if not _MX_PATTERN_RE.fullmatch(value) or len(value) > 253:
                raise PolicyError(f"mx {value!r} is not a host name or *.domain pattern")
            mx.append(normalize_name(value))
        elif _EXT_NAME_RE.fullmatch(key):
            if not _POLICY_VALUE_RE.fullmatch(value):
                raise PolicyError(f"line {number}: the value of {key} is not printable text")
        else:
            raise PolicyError(f"line {number}: {key[:40]!r} is not a field name")
    if version is None:
        raise PolicyError("no version")
    if mode is None:
        raise PolicyError("no mode")
    if max_age is None:
        raise PolicyError("no max_age")
    if not mx and mode != "none":
        raise PolicyError(f"mode {mode} without any mx")
    return Policy(mode=mode, mx=tuple(dict.fromkeys(mx)), max_age=max_age)


# --------------------------------------------------------------------------- HTTPS fetch

Resolver = Callable[[str], Awaitable[Sequence[str]]]

_contexts: dict[str | None, object] = {}


def fetch_context(ca_file: str | None = None):
    """The TLS client context of policy fetches: TLS 1.2+, the chain verified against
    *ca_file* (None: the system's default CA store). Built once per CA file."""
    ctx = _contexts.get(ca_file)
    if ctx is None:
        profile = Profile(name="mta-sts-fetch", ca_file=ca_file, session_resumption=False)
        ctx = _contexts[ca_file] = client_context(profile, verify=True)
    return ctx


def policy_host(domain: str) -> str:
    return "mta-sts." + normalize_name(domain)


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip(b" \t").decode("latin-1").lower()


async def _connect(host: str, resolve: Resolver):
    try:
        addresses = list(await resolve(host))
    except trio.Cancelled:
        raise
    except Exception as exc:        # the DNS module's error, whatever it is: a failed fetch
        raise FetchError(f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise FetchError(f"{host} has no address")
    errors = []
    for address in addresses:
        try:
            return await open_tcp(address, HTTPS_PORT)
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise FetchError(f"cannot connect to {host} port {HTTPS_PORT} ({'; '.join(errors)})")


async def _request(stream: TLSStream, host: str) -> bytes:
    """GET the policy over *stream*; the body, or FetchError."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADER_BYTES)
    request = h11.Request(method="GET", target=WELL_KNOWN_PATH, headers=[
        ("Host", host), ("User-Agent", "mail-tls-gateway"), ("Accept", "text/plain"),
        ("Cache-Control", "no-cache"), ("Connection", "close")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise FetchError(f"bad HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data and stream.unclean_eof and conn.their_state is h11.SEND_BODY:
                raise FetchError("the connection was cut before the end of the policy")
            conn.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            if 300 <= event.status_code < 400:
                raise FetchError(f"HTTP {event.status_code}: redirects are not followed")
            if event.status_code != 200:
                raise FetchError(f"HTTP {event.status_code}")
            headers = dict(event.headers)          # h11 gives names in lower case
            ctype = headers.get(b"content-type")
            if ctype is None or _media_type(ctype) != "text/plain":
                shown = "none" if ctype is None else ctype.decode("latin-1")[:60]
                raise FetchError(f"Content-Type {shown}, not text/plain")
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > MAX_POLICY_SIZE:
                raise FetchError(f"the policy is larger than {MAX_POLICY_SIZE} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_POLICY_SIZE:
                raise FetchError(f"the policy is larger than {MAX_POLICY_SIZE} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:                                       # ConnectionClosed before the response
            raise FetchError("the connection closed without a response")


async def fetch_policy(domain: str, *, resolve: Resolver, ca_file: str | None = None,
                       timeout: float = DEFAULT_FETCH_TIMEOUT) -> Policy:
    """Fetch and parse the policy of *domain* (see the module docstring); FetchError when
    it cannot be had, a valid policy or nothing, all within *timeout* seconds."""
    host = policy_host(domain)
    context = fetch_context(ca_file)
    with trio.move_on_after(timeout) as scope:
        tcp = stream = None
        try:
            tcp = await _connect(host, resolve)
            stream = TLSStream(tcp, context, server_side=False, server_hostname=host,
                               verify_hostname=True)
            try:
                await stream.do_handshake()
            except TLSError as exc:
                raise FetchError(f"TLS with {host}: {exc.reason}") from None
            if not stream.info.verified:
                raise FetchError(f"the certificate of {host} is not valid: "
                                 f"{stream.info.verify_error}")
            try:
                body = await _request(stream, host)
            except (trio.BrokenResourceError, TLSError) as exc:
                raise FetchError(f"connection to {host} lost: {exc}") from None
        finally:
            if stream is not None:
                stream.abandon()                # closes tcp too
            elif tcp is not None:
                tcp.abandon()
        try:
            return parse_policy(body)
        except PolicyError as exc:
            raise FetchError(f"invalid policy: {exc}") from None
    assert scope.cancelled_caught
    raise FetchError(f"no policy from {host} within {timeout:g} s")


# --------------------------------------------------------------------------- the cache

def _from_row(row: StsRow) -> CachedPolicy:
    return CachedPolicy(domain=row.domain, policy_id=row.policy_id,
                        policy=Policy(mode=row.mode, mx=row.mx, max_age=row.max_age),
                        fetched_at=row.fetched_at, expires_at=row.expires_at)


def _to_row(entry: CachedPolicy) -> StsRow:
    p = entry.policy
    return StsRow(entry.domain, entry.policy_id, p.mode, p.mx, p.max_age, entry.fetched_at,
                  entry.expires_at)


Fetcher = Callable[[str], Awaitable[Policy]]
TXT_FAILED = None     # `txt` for policy_for when the TXT lookup failed (SERVFAIL, timeout)


class StsCache:
    """MTA-STS policies in the shared state database (gateway.state.StateStore; open it with
    read_only=True in commands run as root). The store's calls block: they run in a thread."""

    def __init__(self, store: StateStore):
        self.store = store

    async def get(self, domain: str) -> CachedPolicy | None:
        row = await trio.to_thread.run_sync(self.store.get_sts_policy, normalize_name(domain))
        return _from_row(row) if row is not None else None

    async def put(self, entry: CachedPolicy) -> None:
        await trio.to_thread.run_sync(self.store.put_sts_policy, _to_row(entry))

    async def due_for_refresh(self, now: float, ahead: float) -> list[str]:
        """The domains whose cached policy expires before *now* + *ahead* (or has),
        soonest first: what a refresher fetches ahead of expiry."""
        rows = await trio.to_thread.run_sync(self.store.sts_due_for_refresh, now, ahead)
        return [row.domain for row in rows]

    async def policy_for(self, domain: str, now: float, *, txt: Sequence | None,
                         fetch: Fetcher, refresh: bool = False) -> Lookup:
        """SPEC §4.8's decision for *domain* at *now* (time.time()).

        *txt*: the TXT records of `_mta-sts.DOMAIN` ([] when there are none, NXDOMAIN
        included), or TXT_FAILED (None) when the lookup failed. *fetch*(domain) returns the
        Policy or raises FetchError. *refresh* (the refresher, ahead of expiry) fetches even
        when the id is the one cached. A fetched policy is stored under the TXT id."""
        domain = normalize_name(domain)
        cached, store_error = None, None
        try:
            cached = await self.get(domain)
        except (sqlite3.Error, OSError) as exc:
            store_error = f"policy cache {self.store.path}: {exc}"
        usable = cached if cached is not None and not cached.expired(now) else None

        def keep(error: str | None) -> Lookup:
            if usable is not None:
                return Lookup(usable, "cache", error)
            return Lookup(None, "none", error)

        if txt is TXT_FAILED:
            return keep(store_error or "the TXT lookup failed")
        policy_id = parse_txt(txt)
        if policy_id is None:
            return keep(store_error or (None if not txt else
                                        "no single valid v=STSv1 TXT record"))
        if usable is not None and usable.policy_id == policy_id and not refresh:
            return Lookup(usable, "cache", store_error)
        try:
            policy = await fetch(domain)
        except FetchError as exc:
            return keep(exc.reason)
        entry = CachedPolicy(domain=domain, policy_id=policy_id, policy=policy,
                             fetched_at=now, expires_at=now + policy.max_age)
        if not self.store.read_only:
            try:
                await self.put(entry)
            except (sqlite3.Error, OSError) as exc:
                store_error = f"policy cache {self.store.path}: {exc}"
        return Lookup(entry, "fetched", store_error)
