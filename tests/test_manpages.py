"""The manual pages describe what the code does, both ways (SPEC §12): gateway.toml(5) has an
entry for every key the parser accepts and none for a key it does not, with the parser's
defaults; every metric, the label values the code emits from fixed sets, every reply the
gateway originates, every log event with its fields and every tracking field appear in it;
gateway(8) has every command and option of the command line; both render with
`man --warnings -l` and nothing on stderr; pip installs them; and nothing shipped sends the
reader to a file the repository does not contain.

What the code emits is read from the code itself: its tables (replies, metrics, keys), and
for values written inline at the call sites, the calls found in the source with `ast`.
"""
from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway.observe import metrics as M
from gateway.cli import build_parser
from gateway.config import parse_config
from gateway.config import parse as P
from gateway.config.profiles import _PROFILE_KEYS
from gateway.proto import imap_server, milter, replies
from gateway.proto.smtp_server import SMTPServer
from gateway.relay import upstream
from gateway.relay.milter_client import MilterError
from gateway.relay.smtp_session import _COUNTED_CODES
from gateway.observe.track_query import RESULTS
from gateway.observe.tracking_log import TrackingRecord

from peers import require

ROOT = Path(__file__).resolve().parent.parent
MAN8 = ROOT / "man" / "gateway.8"
MAN5 = ROOT / "man" / "gateway.toml.5"
# the installed package's sources: what the tests run is what is checked
SOURCE = Path(gateway.__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Reading the pages


_ESCAPES = {r"\(dq": '"', r"\(aq": "'", r"\(en": "-", r"\(em": "-", r"\-": "-",
            r"\e": "\\", r"\&": "", r"\:": "", r"\|": "", r"\^": "", "\\ ": " "}
_ESCAPE_RE = re.compile(r"\\f(?:\(..|\[[^\]]*\]|.)|"
                        + "|".join(re.escape(k) for k in sorted(_ESCAPES, key=len, reverse=True)))


def unescape(text: str) -> str:
    """roff text as it reads: font changes dropped, the escapes this project uses resolved."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(0), ""), text)


def macro_args(rest: str) -> list[str]:
    """The arguments of a macro line, with roff's double quotes ("" is a quote inside)."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] == " ":
            i += 1
        elif rest[i] == '"':
            j, arg = i + 1, ""
            while j < len(rest):
                if rest[j] == '"' and rest[j + 1:j + 2] == '"':
                    arg, j = arg + '"', j + 2
                elif rest[j] == '"':
                    j += 1
                    break
                else:
                    arg, j = arg + rest[j], j + 1
            args.append(arg)
            i = j
        else:
            j = rest.find(" ", i)
            j = len(rest) if j < 0 else j
            args.append(rest[i:j])
            i = j
    return args


_JOINED = {"B", "I", "SM", "SB", "SH", "SS"}          # arguments joined with spaces
_ALTERNATING = {"BI", "IB", "BR", "RB", "IR", "RI"}   # fonts alternate, no space between


def line_text(line: str) -> str | None:
    """The text a line contributes, or None for a control line that prints nothing."""
    if line.startswith(('.\\"', "'\\\"")):
        return None
    if line.startswith("."):
        name, _, rest = line[1:].partition(" ")
        if name in _JOINED:
            return unescape(" ".join(macro_args(rest)))
        if name in _ALTERNATING:
            return unescape("".join(macro_args(rest)))
        return None
    return unescape(line)


def plain(lines) -> str:
    return " ".join(" ".join(t for t in map(line_text, lines) if t is not None).split())


@dataclasses.dataclass
class Entry:
    """One `.TP` item: its section, subsection, tags (`.TQ` adds more) and body text."""
    sh: str
    ss: str | None
    tags: list[str]
    body: list[str] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        return plain(self.body)


def read_page(path: Path) -> tuple[list[str], list[Entry], list[tuple[str, str | None]]]:
    """(lines, .TP entries, (section, subsection) headings in order)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    entries: list[Entry] = []
    headings: list[tuple[str, str | None]] = []
    sh, ss, cur = "", None, None
    i = 0
    while i < len(lines):
        line = lines[i]
        name = line[1:].split(" ", 1)[0] if line.startswith(".") else None
        if name == "SH":
            sh, ss, cur = line_text(line), None, None
            headings.append((sh, None))
        elif name == "SS":
            ss, cur = line_text(line), None
            headings.append((sh, ss))
        elif name == "TP":
            cur = Entry(sh, ss, [line_text(lines[i + 1])])
            entries.append(cur)
            i += 2
            while i < len(lines) and lines[i] == ".TQ":
                cur.tags.append(line_text(lines[i + 1]))
                i += 2
            continue
        elif name in ("PP", "P", "LP"):
            cur = None
        elif cur is not None:
            cur.body.append(line)
        i += 1
    return lines, entries, headings


PAGE5 = read_page(MAN5)
PAGE8 = read_page(MAN8)
TEXT5 = plain(PAGE5[0])
TEXT8 = plain(PAGE8[0])


def entries_of(page, sh: str, ss: str | None = None) -> dict[str, Entry]:
    """Each tag of the `.TP` entries of one section (and subsection) -> its entry."""
    out = {}
    for entry in page[1]:
        if entry.sh == sh and (ss is None or entry.ss == ss):
            for tag in entry.tags:
                out[tag] = entry
    return out


def words(text: str) -> set[str]:
    """The words of *text*, `key=value` also as its two halves."""
    out = {w.rstrip(".") for w in re.findall(r"[\w.+=/*-]+", text)}
    return out | {half for w in out if "=" in w for half in w.split("=")}


# ---------------------------------------------------------------------------------------------
# Reading the code


def _sources():
    for path in sorted(SOURCE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


SOURCES = list(_sources())


def _name(func) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _index_calls() -> dict[str, list]:
    out: dict[str, list] = {}
    for path, tree in SOURCES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                out.setdefault(_name(node.func), []).append((path, node))
    return out


CALLS = _index_calls()


def calls(name: str, files=None):
    """Every call of a function or method called *name* in the package (or in *files*, names
    relative to the package)."""
    for path, node in CALLS.get(name, ()):
        if files is None or str(path.relative_to(SOURCE)) in files:
            yield path, node


def constants(node) -> set[str]:
    """The string values an argument can take when they are written at the call: a constant,
    either branch of a conditional expression, any operand of `or` / `and`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return constants(node.body) | constants(node.orelse)
    if isinstance(node, ast.BoolOp):                  # `result or ("a" if x else "b")`
        return set().union(*(constants(v) for v in node.values))
    return set()


def label_values(attribute: str, position: int) -> set[str]:
    """The values written at the call sites `<...>.<attribute>.labels(...)` for one label."""
    out: set[str] = set()
    for _, node in calls("labels"):
        receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
        if _name(receiver) == attribute and len(node.args) > position:
            out |= constants(node.args[position])
    return out


def arg_values(name: str, position: int, files=None) -> set[str]:
    out: set[str] = set()
    for _, node in calls(name, files):
        if len(node.args) > position:
            out |= constants(node.args[position])
    return out


def reply_of(node, module) -> tuple[int, str] | None:
    """A reply named at a call: `R.NAME`, a module constant, or a literal (code, text)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id == "R":
        return getattr(replies, node.attr, None)
    if isinstance(node, ast.Name):
        value = getattr(module, node.id, None)
        return value if isinstance(value, tuple) else None
    if isinstance(node, ast.Tuple) and len(node.elts) == 2 \
            and all(isinstance(e, ast.Constant) for e in node.elts):
        return tuple(e.value for e in node.elts)
    return None


# ---------------------------------------------------------------------------------------------
# (a) keys


SECTIONS = {
    "[gateway]": P._GATEWAY_KEYS,
    "[certificates.name]": P._CERT_KEYS,
    "[tls_profiles.name]": _PROFILE_KEYS,
    "[[listeners]]": P._LISTENER_KEYS,
    "[listeners.timeouts]": P._TIMEOUT_KEYS,
    "[listeners.upstream]": P._UPSTREAM_KEYS,
    "[[listeners.client_rules]]": P._CLIENT_RULE_KEYS,
    "[[listeners.rules]]": P._RULE_KEYS,
    "[[listeners.milters]]": P._MILTER_KEYS,
}
KEYS_SH = "SECTIONS AND KEYS"


def documented_keys(section: str) -> set[str]:
    return {tag for tag in entries_of(PAGE5, KEYS_SH, section)
            if re.fullmatch(r"[a-z0-9_]+", tag)}


def test_every_table_has_a_subsection():
    subsections = {ss for sh, ss in PAGE5[2] if sh == KEYS_SH and ss is not None}
    assert subsections == set(SECTIONS)
    # every top-level table and every table of a listener is one of them
    for key in P._TOP_KEYS:
        assert any(s.strip("[]").split(".")[0] == key for s in SECTIONS), key
    for key in ("timeouts", "upstream", "client_rules", "rules", "milters"):
        assert key in P._LISTENER_KEYS
        assert f"[listeners.{key}]" in SECTIONS or f"[[listeners.{key}]]" in SECTIONS, key


@pytest.mark.parametrize("section", list(SECTIONS))
def test_keys_documented_both_ways(section):
    accepted = set(SECTIONS[section])
    documented = documented_keys(section)
    assert sorted(accepted - documented) == [], f"{section}: keys the parser accepts that " \
                                                "gateway.toml(5) does not describe"
    unbuilt = documented - accepted
    assert sorted(unbuilt) == [], f"{section}: keys gateway.toml(5) describes that the " \
                                  "parser does not accept"


def _default_text(value) -> list[str] | None:
    """How the page writes a default value (alternatives); None: not a written value."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return [value] if value else ['""']
    if isinstance(value, (int, float)):
        return [str(int(value)) if float(value).is_integer() else str(value)]
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ["[" + ", ".join(f'"{v}"' for v in value) + "]"] + (["none"] if not value else [])
    return None


# a minimal file: each table present with only its required keys
_MINIMAL = {"listeners": [{
    "name": "a", "bind": "127.0.0.1:2525", "upstream": {"address": "127.0.0.1:25"},
    "rules": [{}], "milters": [{"name": "m", "address": "inet:127.0.0.1:8891"}]}]}
_GIVEN = {"name", "bind", "address"}
_TABLES = {"timeouts", "upstream", "client_rules", "rules", "milters"}   # not values


@functools.cache
def _parsed_defaults():
    """The values the parser gives the keys the minimal file leaves out, per section."""
    config = parse_config(_MINIMAL)
    listener = config.listeners[0]
    return {"[gateway]": config, "[[listeners]]": listener,
            "[listeners.timeouts]": listener.timeouts,
            "[listeners.upstream]": listener.upstream,
            "[[listeners.rules]]": listener.rules[0],
            "[[listeners.milters]]": listener.milters[0]}


# defaults the page states in words, not as the value a minimal file gets
_DEFAULT_IN_WORDS = {"hostname",                  # the machine's FQDN
                     "recipient_encryption"}      # the upstream's tls


@pytest.mark.parametrize("section", list(_parsed_defaults()))
def test_defaults_are_the_parsers(section):
    obj = _parsed_defaults()[section]
    entries = entries_of(PAGE5, KEYS_SH, section)
    checked = 0
    for key in SECTIONS[section]:
        if key in _DEFAULT_IN_WORDS | _GIVEN | _TABLES or not hasattr(obj, key):
            continue
        texts = _default_text(getattr(obj, key))
        if texts is None or getattr(obj, key) is None:
            continue
        body = entries[key].text
        pattern = "|".join(re.escape(t) for t in texts)
        assert re.search(rf"Default: (?:{pattern})(?![\w/-]|\.\w)", body), \
            f"{section} {key}: the parser's default is {texts[0]}; the page says: {body}"
        checked += 1
    assert checked


# ---------------------------------------------------------------------------------------------
# (b) metrics and their label values


METRIC_ENTRIES = entries_of(PAGE5, "METRICS")


def test_every_metric_with_its_labels():
    for spec in M.METRICS:
        assert spec.name in METRIC_ENTRIES, f"{spec.name} is not in gateway.toml(5)"
        text = METRIC_ENTRIES[spec.name].text
        assert spec.kind in text.lower(), (spec.name, spec.kind)
        for label in spec.labels:
            assert label in words(text), (spec.name, label)


def _milter_results() -> set[str]:
    results = {a.value for a in milter.Action}
    results |= arg_values("_failure", 1, {"relay/milter_hook.py"})
    results |= arg_values("_fail", 2, {"relay/milter_client.py"})
    import inspect
    results.add(inspect.signature(MilterError).parameters["result"].default)
    return results


def _policy_labels() -> set[str]:
    """gateway_policy_rejections_total's reasons for the gateway's own replies: what a policy
    stage refuses with (the rules, AUTH's checks, a failed milter's default action), and the
    refusals with a counted code that the SMTP core and session send themselves."""
    def label(reply):
        code, text = reply
        return f"{code}_{text.split(' ')[0]}"

    from gateway.policy import stages
    from gateway.proto import smtp_server
    from gateway.relay import milter_data, milter_hook, smtp_session
    out = set()
    for module, name, counted_only in (
            (stages, "refuse", False), (milter_hook, "refuse", False),
            (smtp_server, "_reply", True), (smtp_session, "_refuse", True),
            (milter_data, "_refuse", True)):
        rel = str(Path(module.__file__).resolve().relative_to(SOURCE))
        for _, node in calls(name, {rel}):
            reply = reply_of(node.args[0], module) if node.args else None
            if reply and (not counted_only or reply[0] in _COUNTED_CODES):
                out.add(label(reply))
    # the replies the session gives the final dot itself (size, bare CR/LF)
    path = SOURCE / "relay" / "smtp_session.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(_name(t) == "reply" for t in node.targets):
            reply = reply_of(node.value, smtp_session)
            if reply and reply[0] in _COUNTED_CODES:
                out.add(label(reply))
    # a milter's refusals: milter_<result>, whatever its words
    out |= _milter_policy_labels()
    # IMAP's login gate: the labels of the login stage's verdicts, asked of the stage itself
    from types import SimpleNamespace
    for tls in (None, SimpleNamespace(verified=False)):
        facts = stages.Facts("imap", "192.0.2.1", client_level="verify", tls=tls)
        out.add(stages.StagePolicy.login(None, facts).label)
    return out


def _milter_policy_labels() -> set[str]:
    """The labels the milter hook gives the refusals it returns, asked of the hook itself:
    for every verdict a milter can answer, and for every way it can fail (the results of
    its failures) under a default_action that refuses; plus the session's own deadline."""
    from types import SimpleNamespace

    from gateway.policy.stages import Action
    from gateway.relay.milter_hook import MilterHook
    out: set[str] = set()
    stub = SimpleNamespace(name="m", _new_body=None, added=(), off=False, failed=None,
                           _record=lambda *args, **kwargs: None)
    for action in milter.Action:
        answer = milter.Verdict(action, "mail", reply=(550, "5.7.1 Whatever the milter says"))
        verdict = MilterHook._verdict(stub, "mail", answer)
        if verdict.action is Action.REFUSE:
            out.add(verdict.label)
    results = arg_values("_failure", 1, {"relay/milter_hook.py"})
    results |= arg_values("_fail", 2, {"relay/milter_client.py"})
    import inspect
    results.add(inspect.signature(MilterError).parameters["result"].default)
    for default_action in ("tempfail", "reject"):
        stub.spec = SimpleNamespace(default_action=default_action)
        for result in results:
            out.add(MilterHook._failure(stub, "mail", result, "why").label)
    # `reply, label = MILTER_TEMPFAIL, "milter_timeout"`: the deadline after the final dot
    for path, tree in SOURCES:
        if path.name == "milter_data.py":
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple) \
                        and isinstance(node.value, ast.Tuple):
                    for target, value in zip(node.targets[0].elts, node.value.elts):
                        if _name(target) == "label":
                            out |= constants(value)
    return out


@functools.cache
def fixed_label_values() -> dict[tuple[str, str], set[str]]:
    """(metric name, label) -> the values the code emits from fixed sets."""
    by_attr = {spec.attribute: spec for spec in M.METRICS}
    out: dict[tuple[str, str], set[str]] = {}

    def add(attribute, label, values):
        spec = by_attr[attribute]
        assert label in spec.labels, (attribute, label)
        out.setdefault((spec.name, label), set()).update(values)

    # every label value written at a `.labels(...)` call
    for spec in M.METRICS:
        for i, label in enumerate(spec.labels):
            values = label_values(spec.attribute, i)
            if values:
                add(spec.attribute, label, values)
    add("connections_rejected_total", "reason", arg_values("rejected", 0, {"net/proxy_stream.py"}))
    add("connections_rejected_total", "reason", M.REJECT_REASONS)    # each at 0 from the start
    for attribute in ("connections_total", "connections_active", "connections_rejected_total",
                      "messages_total", "message_bytes_total"):
        add(attribute, "type", P.LISTENER_TYPES)                     # the listener's `type`
    add("reload_sessions_cut_total", "reason", arg_values("cut_imap", 0))
    add("messages_total", "result", RESULTS)
    add("tls_alerts_total", "reason", upstream.TLS_ALERT_REASONS)
    fallbacks = {v for _, node in calls("get") if _name(node.func.value) == "FAILURE_KINDS"
                 and len(node.args) > 1 for v in constants(node.args[1])}
    add("upstream_errors_total", "reason", set(upstream.FAILURE_KINDS.values()) | fallbacks)
    add("auth_total", "result", arg_values("_auth_done", 0, {"relay/smtp_session.py"}))
    add("milter_results_total", "result", _milter_results())
    add("policy_rejections_total", "reason", _policy_labels())
    add("upstream_last_result", "result", upstream.UPSTREAM_RESULTS)
    add("connections_total", "protocol", P.PROTOCOLS)
    add("session_seconds", "protocol", P.PROTOCOLS)
    add("certificate_expiry", "certificate", arg_values("loaded_certificate", 0))
    key_types = set()
    for path, tree in SOURCES:
        if path.name == "certs.py":
            for fn in ast.walk(tree):
                if isinstance(fn, ast.FunctionDef) and fn.name == "key_type":
                    for ret in ast.walk(fn):
                        if isinstance(ret, ast.Return):
                            key_types |= constants(ret.value)
    add("certificate_expiry", "key_type", key_types)
    return out


def test_label_values_found_in_the_code():
    """The test's own reading of the code finds what SPEC §11 lists (it could fail)."""
    values = fixed_label_values()
    assert {"max_connections", "per_ip", "pregreet"} <= \
        values["gateway_connections_rejected_total", "reason"]
    assert {"accepted", "rejected", "tempfail", "discarded"} == \
        values["gateway_messages_total", "result"]
    assert {"tls_not_offered", "tls_failed", "not_trusted"} == \
        values["gateway_tls_alerts_total", "reason"]
    assert {"success", "failure", "cancelled", "error"} == \
        values["gateway_auth_total", "result"]
    assert {"accept", "continue", "reject", "tempfail", "replycode", "discard",
            "quarantine", "error", "timeout"} == values["gateway_milter_results_total", "result"]
    assert {"530_5.7.0", "421_4.7.1", "452_4.5.3", "imap_tls_required", "milter_reject",
            "milter_tempfail", "milter_replycode", "milter_error", "milter_timeout"} <= \
        values["gateway_policy_rejections_total", "reason"]
    assert {"reload_grace", "generation_cap"} == \
        values["gateway_reload_sessions_cut_total", "reason"]
    assert {"public", "private"} == values["gateway_messages_total", "type"]
    assert {"proxy_untrusted", "proxy_malformed"} <= \
        values["gateway_connections_rejected_total", "reason"]
    assert {"unavailable", "lost", "other"} <= values["gateway_upstream_errors_total", "reason"]
    assert {"client", "upstream"} == values["gateway_tls_handshakes_total", "side"]
    assert {"ok", "error"} == values["gateway_tls_handshakes_total", "result"]


@pytest.mark.parametrize("metric,label", sorted(fixed_label_values()))
def test_label_values_documented(metric, label):
    text = words(METRIC_ENTRIES[metric].text)
    missing = sorted(v for v in fixed_label_values()[metric, label] if v not in text)
    assert missing == [], f"{metric}{{{label}}}: values the code emits that " \
                          f"gateway.toml(5) does not list"


# ---------------------------------------------------------------------------------------------
# (c) replies


@functools.cache
def smtp_replies() -> frozenset[str]:
    """Every SMTP reply the gateway writes itself: the replies table, every (code, "text")
    literal in the package (milter defaults, the held DATA's 354, ...), and the greeting,
    EHLO and HELO answers as the core writes them (the host name shown as `hostname`)."""
    out = {f"{c} {t}" for c, t in (v for v in vars(replies).values()
                                   if isinstance(v, tuple) and len(v) == 2
                                   and isinstance(v[0], int))}
    for path, tree in SOURCES:
        if path.name in ("sink.py",):           # `gateway sink`, the test upstream
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and len(node.elts) == 2 \
                    and all(isinstance(e, ast.Constant) for e in node.elts):
                code, text = (e.value for e in node.elts)
                if isinstance(code, int) and 200 <= code < 600 and isinstance(text, str) \
                        and text:
                    out.add(f"{code} {text}")
    core = SMTPServer(hostname="HOSTNAME")
    core.greeting()
    core.pregreeting()
    core.receive_data(b"HELO client.example\r\n")
    core.next_event()
    for line in core.data_to_send().decode().split("\r\n"):
        if line:
            out.add(line.replace("HOSTNAME", "hostname"))
    return frozenset(out)


def test_the_reply_collection_works():
    found = smtp_replies()
    assert {"220 hostname ESMTP", "220-hostname ESMTP", "250 hostname",
            "451 4.7.5 TLS handshake with upstream failed",
            "553 5.6.7 Must declare SMTPUTF8 to send unicode address",
            "550 5.7.1 Message content rejected"} <= found


@pytest.mark.parametrize("reply", sorted(smtp_replies()))
def test_smtp_reply_documented(reply):
    assert " ".join(reply.split()) in section_text("REPLIES"), \
        f"gateway.toml(5) REPLIES does not have {reply!r}"


@functools.cache
def section_text(sh: str) -> str:
    """The tags and bodies of the `.TP` entries of one section of gateway.toml(5)."""
    return " ".join(" ".join(e.tags) + " " + e.text for e in PAGE5[1] if e.sh == sh)


def test_ehlo_keywords_documented():
    text = section_text("REPLIES")
    seen = set()
    for tls in (False, True):
        core = SMTPServer(hostname="HOSTNAME", dsn=True, auth_mechanisms=("PLAIN",),
                          tls_active=tls)
        core.receive_data(b"EHLO client.example\r\n")
        core.next_event()
        for line in core.data_to_send().decode().split("\r\n")[1:]:
            if line:
                keyword = line[4:].split(" ")[0]
                seen.add(keyword)
                assert keyword in words(text), keyword
    assert {"STARTTLS", "AUTH", "DSN", "SMTPUTF8", "SIZE", "PIPELINING"} <= seen


_IMAP_FILES = {"proto/imap_server.py", "proto/imap_wire.py", "relay/imap_session.py",
               "serve/protocols.py"}


@functools.cache
def imap_responses() -> frozenset[str]:
    """Every IMAP response the gateway writes itself: the status responses (OK, NO, BAD,
    BYE) and continuations written in its IMAP modules, without the tag or `* `."""
    out: set[str] = set()

    def take(text: str) -> None:
        text = text.replace("\r\n", "").strip()
        text = re.sub(r"^(?:\* )", "", text)
        if re.match(r"(OK|NO|BAD|BYE)\b", text) or text.startswith("+ ") and len(text) > 2:
            out.add(text)

    for path, tree in SOURCES:
        rel = str(path.relative_to(SOURCE))
        if rel not in _IMAP_FILES:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                take(node.value.decode("ascii", "replace") if isinstance(node.value, bytes)
                     else node.value)
            elif isinstance(node, ast.JoinedStr):
                parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
                if parts:                     # f"{tag} BAD ...": the text after the tag
                    take(parts[0])
    for reason in arg_values("Fatal", 0, {"proto/imap_wire.py"}):
        out.add(f"BYE {reason}")
    return frozenset(out)


def test_the_imap_collection_works():
    found = imap_responses()
    assert {"NO [PRIVACYREQUIRED] TLS is required", "BAD Invalid arguments",
            "BYE Too many connections from your address", "NO [UNAVAILABLE]",
            "BYE [UNAVAILABLE] Server shutting down", "+ Ready for literal data"} <= found


@pytest.mark.parametrize("response", sorted(imap_responses()))
def test_imap_response_documented(response):
    text = section_text("REPLIES")
    assert " ".join(response.split()) in text, f"gateway.toml(5) does not have {response!r}"


def test_imap_capabilities_documented():
    text = words(TEXT5)
    for kw in ({}, {"require_tls": True}, {"tls_active": True}):
        for cap in imap_server.IMAPServer(hostname="h", **kw).capabilities().split():
            assert cap in text, cap


# ---------------------------------------------------------------------------------------------
# log events and tracking records


def log_events() -> dict[str, set[str]]:
    """Event name -> the fields its calls give (`level` aside)."""
    out: dict[str, set[str]] = {}
    for path, node in calls("event"):
        if node.args and isinstance(node.args[0], ast.Constant):
            fields = out.setdefault(node.args[0].value, set())
            if path.name != "sink.py":            # `gateway sink`'s own: see gateway(8)
                fields |= {k.arg for k in node.keywords if k.arg and k.arg != "level"}
    for path, tree in SOURCES:                    # the line a failed event becomes
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                pairs = {k.value: v for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant)}
                if isinstance(pairs.get("event"), ast.Constant):
                    out.setdefault(pairs["event"].value, set()).update(
                        k for k in pairs if k not in ("ts", "level", "event"))
    return out


def test_log_events_documented_with_their_fields():
    events = log_events()
    assert {"conn_open", "tls", "message", "tls_alert", "milter", "log_error"} <= set(events)
    documented = entries_of(PAGE5, "LOG EVENTS")
    for event, fields in sorted(events.items()):
        assert event in documented, f"event {event} is not in gateway.toml(5)"
        text = words(documented[event].text)
        missing = sorted(f for f in fields if f not in text)
        assert missing == [], f"event {event}: fields not described: {missing}"


def test_tracking_fields_documented():
    documented = entries_of(PAGE5, "MESSAGE TRACKING")
    for field in dataclasses.fields(TrackingRecord):
        assert field.name in documented, field.name


# ---------------------------------------------------------------------------------------------
# gateway(8): the command line


def _parsers():
    parser = build_parser()
    todo = [((), parser)]
    while todo:
        path, p = todo.pop()
        yield path, p
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    todo.append((path + (name,), sub))


def test_every_command_and_option_in_gateway_8():
    text = words(TEXT8)
    seen = 0
    for path, p in _parsers():
        command = " ".join(("gateway",) + path)
        assert command in TEXT8, command
        for action in p._actions:
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                assert option in text, f"{command} {option}"
                seen += 1
            for choice in action.choices or ():
                if isinstance(choice, str) and action.option_strings:
                    assert choice in text, f"{command} {action.option_strings[0]} {choice}"
    assert seen > 30


def test_gateway_8_sections():
    sections = [sh for sh, ss in PAGE8[2] if ss is None]
    for name in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "SIGNALS", "EXIT STATUS",
                 "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert name in sections
    for word in ("SIGHUP", "SIGTERM", "SIGINT", "SIGUSR1", "GATEWAY_PURE_PYTHON",
                 "GATEWAY_REQUIRE_NATIVE", "NOTIFY_SOCKET", "pid_file", "log_file",
                 "tracking_log", "spool_dir", "READY=1", "RELOADING=1", "STOPPING=1"):
        assert word in TEXT8, word
    assert "gateway.toml (5)" in TEXT8 or "gateway.toml(5)" in TEXT8


# ---------------------------------------------------------------------------------------------
# (d) rendering, installing, shipping


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_renders_without_warnings(page):
    man = require("man")
    env = dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8",
               MAN_DISABLE_SECCOMP="1")      # man-db's groff sandbox: not in every container
    out = subprocess.run([man, "--warnings", "-l", str(page)], capture_output=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stderr.decode() == ""
    assert b"NAME" in out.stdout and len(out.stdout) > 2000


def test_installed_with_the_package():
    """pip puts the pages under the environment's share/man (the README's manpath)."""
    for page, section in ((MAN8, "man8"), (MAN5, "man5")):
        installed = Path(sys.prefix) / "share" / "man" / section / page.name
        assert installed.is_file(), f"{installed} missing: reinstall the package"
        assert installed.read_bytes() == page.read_bytes(), \
            f"{installed} differs from {page}: reinstall the package"


def shipped_files():
    yield ROOT / "README.md"
    for top in ("deploy", "man"):
        yield from (p for p in sorted((ROOT / top).rglob("*")) if p.is_file())


def test_nothing_shipped_cites_a_file_the_repository_lacks():
    for path in shipped_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            assert not re.search(r"SPEC\b|§", line), f"{path.relative_to(ROOT)}:{n}: {line}"
