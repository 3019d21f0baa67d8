"""The `gateway` command line (SPEC §12).

    gateway --version
    gateway check -c FILE [--syntax-only]
    gateway run (-c FILE | --demo) [--workers N | --single-process] [--log-format F]
    gateway sink [--listen HOST:PORT] [--starttls] [--cert F --key F] [--maildir DIR]
    gateway certs demo DIR [--hostname H]
    gateway track [-f FILE]... [-c CONFIG] [FILTERS] [--addr ADDR] [--json] [FILE...]
    gateway policy -c FILE --listener NAME --client IP [FACTS] --rcpt ADDR... [--json]
    gateway status [--url URL | -c FILE] [--json]

Exit status: 0 success, 1 runtime failure (e.g. a port cannot be bound), 2 configuration or
usage error; a command whose reader closed the pipe (`| head`) stops quietly with 1. Errors
are one line each on stderr (``error: <key path>: <message>``; every error of a configuration
file at once), never a traceback. The launch (supervisor, server), sink and certificate
modules are imported only by the subcommand that needs them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from typing import Sequence

from . import __version__
from .errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def backends() -> tuple[str, str]:
    """What the line scanner and the rule matcher use, "native" or "python" each (python
    where the compiled core cannot load); see gateway/native/backend.py."""
    try:
        from .native import backend
        return backend.SCANNER, backend.MATCHER
    except Exception:
        return "python", "python"


def version_line() -> str:
    scanner, matcher = backends()
    return f"gateway {__version__} (scanner: {scanner}, matcher: {matcher})"


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _config_error(exc: ConfigError, *, files: bool = False) -> int:
    """Every error of the file, one line each; with *files*, the file checks of what could
    be read too (certificates, keys, CA files, user, group), so a wrong value does not hide
    a missing certificate (SPEC §12)."""
    for err in getattr(exc, "errors", None) or [exc]:      # ConfigErrors: one line each
        _error(f"{err.path}: {err.message}" if err.path else err.message)
    partial = getattr(exc, "partial", None)
    if files and partial is not None:
        from .config import check_files
        for problem in check_files(partial):
            _error(problem)
    return EXIT_CONFIG


# ---------------------------------------------------------------------------------------------
# check


def summary_table(config) -> str:
    """The per-listener table `gateway check` prints."""
    from .config import format_hostport

    header = ("NAME", "TYPE", "BIND", "PROTOCOL", "TLS/CLIENT", "MAX CONN", "BACKLOG",
              "UPSTREAM", "UPSTREAM TLS", "RULES", "MILTERS")
    rows = [header]
    for lst in config.listeners:
        up = lst.upstream
        rules = str(len(lst.rules))
        if lst.client_rules:
            rules += f" (+{len(lst.client_rules)} client)"
        rows.append((
            lst.name, lst.type, format_hostport(lst.host, lst.port), lst.protocol,
            f"{lst.tls}/{lst.client_tls}", str(lst.max_connections), str(lst.backlog),
            format_hostport(up.host, up.port), f"{up.mode}/{up.tls}", rules,
            ",".join(m.name for m in lst.milters) or "-",
        ))
    return _table(rows)


def rules_listing(config) -> str:
    """The encryption and client rules of every listener, in evaluation order, with the
    rules that can never match flagged (`gateway check`)."""
    from .rules import shadowed_rules

    out = []
    for lst in config.listeners:
        if lst.rules:
            shadowed = dict(shadowed_rules(lst.rules))
            out.append(f"{lst.name}: encryption rules (first enabled match wins; "
                       f"default: sender optional, recipient {lst.upstream.tls})")
            rows = [("#", "ENABLED", "SENDER", "RECIPIENT", "SENDER ENC", "RECIPIENT ENC", "")]
            for i, r in enumerate(lst.rules):
                note = f"never matches: shadowed by rule {shadowed[i]}" if i in shadowed \
                    else ("" if r.enabled else "disabled")
                rows.append((str(i), "yes" if r.enabled else "no", r.sender, r.recipient,
                             r.sender_encryption, r.recipient_encryption, note))
            out.append(_table(rows, indent="  "))
        if lst.client_rules:
            out.append(f"{lst.name}: client rules (first match; networks at connect, "
                       "sender domains at MAIL FROM)")
            rows = [("#", "MATCH", "KIND", "CLIENT TLS", "CIPHER STRENGTH")]
            for i, r in enumerate(lst.client_rules):
                rows.append((str(i), r.match, "network" if r.is_network else "sender",
                             r.client_tls or "-", r.cipher_strength or "-"))
            out.append(_table(rows, indent="  "))
    return "\n".join(out)


def certificate_listing(config, *, read_files: bool = True) -> str:
    """Each listener's certificate entries with the names they answer to (SPEC §3.4): their
    key types and subjectAltName DNS names when *read_files* (an entry whose files cannot be
    read shows none; check_files reports why)."""
    from .tls.certs import dns_names, key_type, load_pairs

    described: dict[str, tuple[str, ...]] = {}

    def describe(name: str) -> tuple[str, ...]:
        if name not in described:
            cert = config.certificates[name]
            row: tuple[str, ...] = (name,)
            if read_files:
                try:
                    pairs = load_pairs(f"certificates.{name}", cert.cert, cert.key,
                                       cert.rsa_cert, cert.rsa_key)
                except ValueError:
                    row = (name, "?", "(cannot be read)")
                else:
                    names: list[str] = []
                    for chain, _key in pairs:
                        names += [n for n in dns_names(chain[0]) if n not in names]
                    row = (name, "+".join(key_type(k) for _c, k in pairs),
                           ", ".join(names) or "(no DNS names)")
            described[name] = row
        return described[name]

    out = []
    for lst in config.listeners:
        names = lst.certificate_names
        if not names:
            continue
        if lst.certificates:
            out.append(f"{lst.name}: certificates by SNI (no SNI or no match: {names[0]})")
        else:
            out.append(f"{lst.name}: certificate")
        out.append(_table([describe(n) for n in names], indent="  "))
    return "\n".join(out)


def shadowed_warnings(config) -> list[str]:
    from .rules import shadowed_rules

    out = []
    for i, lst in enumerate(config.listeners):
        for j, by in shadowed_rules(lst.rules):
            out.append(f"listeners[{i}].rules[{j}]: can never match, rule {by} before it "
                       "matches every pair it matches")
    return out


def wx_warnings(config) -> list[str]:
    """SPEC §3.3: without the native core, certificate verification uses a Python callback
    inside OpenSSL (write+execute memory), so W^X (the systemd unit's
    MemoryDenyWriteExecute=yes) will not hold. Names the listeners that verify."""
    from .tls.context import NATIVE_VERIFY

    if NATIVE_VERIFY:
        return []
    names = [lst.name for lst in config.listeners
             if lst.verifies_clients or lst.verifies_upstream]
    if not names:
        return []
    return [f"the native core is not in use, so certificate verification (listeners "
            f"{', '.join(names)}) runs a Python callback inside OpenSSL: W^X "
            f"(MemoryDenyWriteExecute=yes in the systemd unit) will not hold and the gateway "
            f"cannot start under it; install the native core or remove that setting"]


def _table(rows, indent: str = "") -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def cmd_check(args) -> int:
    from .config import check_files, load_config
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _config_error(exc, files=not args.syntax_only)
    for warning in [*config.warnings, *shadowed_warnings(config), *wx_warnings(config)]:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary_table(config))
    listing = rules_listing(config)
    if listing:
        print(listing)
    listing = certificate_listing(config, read_files=not args.syntax_only)
    if listing:
        print(listing)
    if not args.syntax_only:
        file_warnings: list[str] = []
        problems = check_files(config, file_warnings)
        for warning in file_warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if problems:
            for problem in problems:
                _error(problem)
            return EXIT_CONFIG
    checked = "syntax" if args.syntax_only else "syntax and files"
    print(f"{args.config}: OK ({len(config.listeners)} listeners, {checked} checked)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# run


def cmd_run(args) -> int:
    from .config import demo_config, load_config
    from .observe.logs import EventLog
    try:
        config = demo_config() if args.demo else load_config(args.config)
    except ConfigError as exc:
        return _config_error(exc, files=True)
    if args.single_process:
        config = dataclasses.replace(config, workers=1, single_process=True)
    elif args.workers is not None:
        config = dataclasses.replace(config, workers=args.workers)
    try:
        target = _log_target(config)
    except OSError as exc:
        _error(f"gateway.log_file: cannot open {config.log_file}: {exc.strerror or exc}")
        return EXIT_CONFIG
    log = EventLog(args.log_format or config.log_format, stream=target)
    for warning in config.warnings:
        log.event("config_warning", level="warning", message=warning)
    from .process import launch
    try:
        result = launch.run(config, log=log, demo=bool(args.demo))
    except ConfigError as exc:
        return _config_error(exc)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    return EXIT_OK if result is None else int(result)


def _log_target(config):
    """log_file's target (None: stderr); a file this process creates goes to the workers'
    user, so that they can reopen it after logrotate."""
    from .observe.logs import open_target
    owner = None
    if config.log_file and os.geteuid() == 0 and (config.user or config.group):
        from .process.worker import resolve_ids
        try:
            owner = resolve_ids(config.user, config.group)
        except KeyError:
            owner = None                 # an unknown user is reported by the start checks
    return open_target(config.log_file, owner)


# ---------------------------------------------------------------------------------------------
# sink


def cmd_sink(args) -> int:
    from .config import parse_hostport
    from .observe.logs import EventLog
    try:
        host, port = parse_hostport(args.listen, "--listen", port_zero_ok=True)
    except ConfigError as exc:
        return _config_error(exc)
    cert, key = args.cert, args.key
    if (cert is None) != (key is None):
        _error("--cert and --key go together")
        return EXIT_CONFIG
    if args.starttls and cert is None:
        import tempfile
        from .tls.certs import write_demo_certificate
        directory = tempfile.mkdtemp(prefix="gateway-sink-")
        cert, key = (str(p) for p in write_demo_certificate(directory, "localhost"))
    log = EventLog(args.log_format)
    from . import sink
    try:
        result = sink.main_sink(host, port, cert, key, args.maildir, log)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    return EXIT_OK if result is None else int(result)


# ---------------------------------------------------------------------------------------------
# certs


def cmd_certs_demo(args) -> int:
    from .tls.certs import write_demo_certificate
    hostname = args.hostname or socket.getfqdn()
    try:
        os.makedirs(args.directory, exist_ok=True)
        cert_path, key_path = write_demo_certificate(args.directory, hostname)
    except OSError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    print(f"certificate: {cert_path}")
    print(f"key:         {key_path}")
    print("this self-signed certificate is for demonstrations only")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# track


def cmd_track(args) -> int:
    from .observe import track_query
    files = list(args.file or ()) + list(args.files)
    if not files:
        if not args.config:
            _error("no tracking log: give FILE, -f FILE or -c CONFIG with gateway.tracking_log")
            return EXIT_CONFIG
        from .config import load_config
        try:
            path = load_config(args.config).tracking_log
        except ConfigError as exc:
            return _config_error(exc)
        if not path:
            _error(f"{args.config}: gateway.tracking_log is not set")
            return EXIT_CONFIG
        files = track_query.rotated_files(path)
    now = track_query.local_now()
    filters = track_query.Filters(mail_from=args.mail_from, rcpt=args.to, addr=args.addr,
                            tls=args.tls, client_tls=args.client_tls,
                            upstream_tls=args.upstream_tls)
    for name in ("since", "until"):
        text = getattr(args, name)
        if text is not None:
            try:
                setattr(filters, name, track_query.parse_time(text, now))
            except ValueError as exc:
                _error(f"--{name}: {exc}")
                return EXIT_CONFIG
    results = {r.strip() for value in args.result or () for r in value.split(",") if r.strip()}
    unknown = sorted(results - set(track_query.RESULTS))
    if unknown:
        _error(f"--result: unknown result {unknown[0]!r} (one of {', '.join(track_query.RESULTS)})")
        return EXIT_CONFIG
    filters.results = frozenset(results)
    try:
        records = track_query.query(files, filters, warn=lambda message: print(
            f"warning: {message}", file=sys.stderr))
    except track_query.TrackError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if args.json:
        for rec in records:
            print(track_query.format_json(rec))
    else:
        print(track_query.format_table(records))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# policy


def cmd_policy(args) -> int:
    """What the policy in FILE would do with the session the flags describe (SPEC §12): exit
    0 when every recipient would be accepted, 1 otherwise, 2 for a question that cannot be
    asked."""
    import json

    from .config import load_config
    from .policy import query
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _config_error(exc)
    sender = "" if args.sender in (None, "<>") else args.sender.strip("<>")
    question = query.Question(
        listener=args.listener, client=args.client, tls=args.tls,
        client_cert=args.client_cert, cipher=args.cipher, auth_user=args.auth,
        upstream_tls=args.upstream_tls, sender=sender, rcpts=list(args.rcpt))
    try:
        answer = query.ask(config, question)
    except query.QueryError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    print(json.dumps(answer, indent=2) if args.json else query.format_text(answer))
    return EXIT_OK if answer["accepted"] else EXIT_FAILURE


# ---------------------------------------------------------------------------------------------
# status


def cmd_status(args) -> int:
    """The running gateway's `/status` as tables (or its JSON): 0, or 1 when unreachable."""
    import json

    from .observe import status
    url = args.url
    if url is None and args.config:
        # only the metrics address is read from the file, so that status works while the
        # rest of it is broken (SPEC §11); a file that is not TOML: the default, warned
        metrics = _metrics_address(args.config)
        if metrics is None:
            return EXIT_CONFIG
        if not metrics:
            _error(f"{args.config}: gateway.metrics is off: no status endpoint")
            return EXIT_CONFIG
        url = status.url_for(metrics)
    try:
        data = status.fetch(url or status.DEFAULT_URL)
    except status.StatusError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    print(json.dumps(data, indent=2) if args.json else status.format_table(data))
    return EXIT_OK


def _metrics_address(path: str) -> str | None:
    """gateway.metrics of the file at *path*, read alone (its default when absent or when the
    file is not TOML, with a warning); None after an error line (unreadable, or a value that
    is not an address)."""
    import tomllib

    from .config import parse_hostport
    default = "127.0.0.1:9108"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        _error(f"{path}: cannot read the file: {exc.strerror or exc}")
        return None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        print(f"warning: {path} is not valid TOML ({exc}); trying the default metrics "
              f"address {default}", file=sys.stderr)
        return default
    section = data.get("gateway", {})
    value = section.get("metrics", default) if isinstance(section, dict) else default
    if not isinstance(value, str):
        _error("gateway.metrics: expected a string")
        return None
    if value:
        try:
            parse_hostport(value, "gateway.metrics", port_zero_ok=True)
        except ConfigError as exc:
            return _config_error(exc) and None
    return value


# ---------------------------------------------------------------------------------------------
# parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (one per CPU) or more")
    return value


TRACK_TIMES = "ISO 8601 (2026-11-24T10:00Z; UTC without an offset), 30m, 24h, 7d, today, " \
    "yesterday (local midnight)"


def _add_check_command(sub) -> None:
    """`gateway check`: validate a configuration file."""
    p = sub.add_parser("check", help="validate a configuration file and summarise it")
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    p.add_argument("--syntax-only", action="store_true",
                   help="skip the checks of certificate/key files and user/group")
    p.set_defaults(func=cmd_check)


def _add_run_command(sub) -> None:
    """`gateway run`: the configuration (or --demo), workers, log format."""
    p = sub.add_parser("run", help="run the gateway")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", metavar="FILE")
    source.add_argument("--demo", action="store_true",
                        help="run the embedded demonstration configuration with its sink")
    workers = p.add_mutually_exclusive_group()
    workers.add_argument("--workers", type=_positive_int, metavar="N",
                         help="worker processes (0 = one per CPU); overrides the file")
    workers.add_argument("--single-process", action="store_true",
                         help="serve in one process, without forking workers")
    p.add_argument("--log-format", choices=("logfmt", "json"),
                   help="override gateway.log_format")
    p.set_defaults(func=cmd_run)


def _add_sink_command(sub) -> None:
    """`gateway sink`: the test SMTP sink."""
    p = sub.add_parser("sink", help="run the test sink (an SMTP server that stores mail)")
    p.add_argument("--listen", default="127.0.0.1:2526", metavar="HOST:PORT")
    p.add_argument("--starttls", action="store_true",
                   help="offer STARTTLS (with a demo certificate unless --cert/--key)")
    p.add_argument("--cert", metavar="FILE")
    p.add_argument("--key", metavar="FILE")
    p.add_argument("--maildir", metavar="DIR", help="store received messages here")
    p.add_argument("--log-format", choices=("logfmt", "json"), default="logfmt")
    p.set_defaults(func=cmd_sink)


def _add_track_command(sub) -> None:
    """`gateway track`: the tracking-log query and its filters."""
    p = sub.add_parser(
        "track", help="query the message tracking log",
        description="Query message tracking files (rotated and gzip-compressed ones too). "
                    "Without FILE, -c CONFIG reads its gateway.tracking_log and the rotated "
                    "files beside it, oldest first.")
    p.add_argument("files", nargs="*", metavar="FILE", help="a tracking JSON-lines file")
    p.add_argument("-f", "--file", action="append", metavar="FILE",
                   help="a tracking JSON-lines file (repeatable)")
    p.add_argument("-c", "--config", metavar="CONFIG", help="use its gateway.tracking_log")
    p.add_argument("--from", dest="mail_from", metavar="ADDR|DOMAIN",
                   help="sender: an address, a domain (x.example or @x.example), <> for none")
    p.add_argument("--to", metavar="ADDR|DOMAIN", help="a recipient: an address or a domain")
    p.add_argument("--addr", metavar="ADDR|DOMAIN",
                   help="the sender or any recipient: everything for one address or domain")
    p.add_argument("--since", metavar="TIME", help="from TIME on (inclusive): " + TRACK_TIMES)
    p.add_argument("--until", metavar="TIME", help="before TIME (exclusive)")
    p.add_argument("--result", action="append", metavar="RESULT",
                   help="accepted, rejected, tempfail or discarded (repeatable, or a comma list)")
    for flag, dest, yes, no in (
            ("tls", "tls", "every leg that carried the message used TLS",
             "some leg that carried the message was plaintext"),
            ("client-tls", "client_tls", "the client leg used TLS",
             "the client leg was plaintext"),
            ("upstream-tls", "upstream_tls", "the upstream leg used TLS",
             "the upstream leg was plaintext (not: never reached the upstream)")):
        leg = p.add_mutually_exclusive_group()
        leg.add_argument(f"--{flag}", dest=dest, action="store_const", const=True, help=yes)
        leg.add_argument(f"--no-{flag}", dest=dest, action="store_const", const=False, help=no)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=cmd_track)


def _add_policy_command(sub) -> None:
    """`gateway policy`: a listener's policy over the facts given."""
    p = sub.add_parser(
        "policy", help="what the policy would do with a session, without sending mail",
        description="Run a listener's policy stages (client rules, MAIL FROM, encryption "
                    "rules per RCPT TO, the upstream leg the first recipient opens) over the "
                    "facts given, as a session would; milters are not consulted. Exit 0 when "
                    "every recipient would be accepted, 1 otherwise.")
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="the configuration to ask (the one a reload would load)")
    p.add_argument("--listener", required=True, metavar="NAME")
    p.add_argument("--client", required=True, metavar="IP", help="the client's address")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="tls", action="store_const", const=True, default=True,
                     help="the client uses TLS (default; TLS 1.3 unless --cipher says)")
    tls.add_argument("--no-tls", dest="tls", action="store_const", const=False,
                     help="the client stays in plaintext")
    p.add_argument("--client-cert", choices=("verified", "unverified", "none"), default="none",
                   help="the client's certificate (default none)")
    p.add_argument("--cipher", metavar="NAME",
                   help="the negotiated suite, OpenSSL name (a TLS 1.2 one means TLS 1.2)")
    p.add_argument("--auth", metavar="USER", help="the client authenticated (AUTH) as USER")
    p.add_argument("--upstream-tls", choices=("offered", "absent", "failed"),
                   default="offered",
                   help="the upstream's STARTTLS: offered (and verified), absent, or failed "
                        "(default offered)")
    p.add_argument("--sender", metavar="ADDR", help="MAIL FROM (default <>)")
    p.add_argument("--rcpt", required=True, action="extend", nargs="+", metavar="ADDR",
                   help="RCPT TO, in order (repeatable)")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=cmd_policy)


def _add_status_command(sub) -> None:
    """`gateway status`: the running gateway's /status."""
    p = sub.add_parser(
        "status", help="the running gateway's listeners, workers and certificates",
        description="Read /status from the metrics endpoint: per listener the open "
                    "connections, sessions and messages of the last minute and the upstream's "
                    "last result; the workers; the certificates and their expiry.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", metavar="URL",
                       help="the metrics endpoint (default http://127.0.0.1:9108)")
    where.add_argument("-c", "--config", metavar="FILE", help="use its gateway.metrics")
    p.add_argument("--json", action="store_true", help="the JSON as served")
    p.set_defaults(func=cmd_status)


def _add_certs_command(sub) -> None:
    """`gateway certs`: certificate helpers (demo)."""
    p = sub.add_parser("certs", help="certificate helpers")
    certs = p.add_subparsers(dest="certs_command", metavar="ACTION")
    demo = certs.add_parser("demo", help="write a self-signed demonstration certificate")
    demo.add_argument("directory", metavar="DIR")
    demo.add_argument("--hostname", metavar="H", help="default: this machine's FQDN")
    demo.set_defaults(func=cmd_certs_demo)
    p.set_defaults(func=None, subparser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="Mail TLS gateway: owns the TLS of SMTP and IMAP servers.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_check_command(sub)
    _add_run_command(sub)
    _add_sink_command(sub)
    _add_track_command(sub)
    _add_policy_command(sub)
    _add_status_command(sub)
    _add_certs_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A reader that goes away (`gateway track | head`) ends it quietly, as
    Python's documentation advises for SIGPIPE: stdout is flushed here, while the error can
    still be caught, and on a broken pipe the null device takes its place so that the flush
    at exit finds nothing to complain about; the exit status is then 1."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (AttributeError, OSError, ValueError):   # a stdout without a descriptor
            pass
        return EXIT_FAILURE
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "func", None) is cmd_track \
                and not any(a.startswith("-") for a in extra):
            args.files += extra       # `track A --from X B`: argparse takes only A positionally
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:     # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    if args.version:
        print(version_line())
        return EXIT_OK
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "subparser", None) or parser).print_usage(sys.stderr)
        return EXIT_CONFIG
    return func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
