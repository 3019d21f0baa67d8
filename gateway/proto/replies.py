"""Reply texts the gateway originates itself (SPEC §4.1–§4.5).

Operators' scripts match on these codes and texts: change them only with the SPEC.
Each constant is (code, "enhanced-code text").
"""

READY_TLS = (220, "2.0.0 Ready to start TLS")
OK = (250, "2.0.0 Ok")
MAIL_OK = (250, "2.1.0 Ok")
BYE = (221, "2.0.0 Bye")

TOO_MANY_CONNECTIONS = (421, "4.7.0 Too many connections, try again later")
TOO_MANY_FROM_ADDRESS = (421, "4.7.0 Too many connections from your address")
TIMEOUT = (421, "4.4.2 Timeout exceeded")
SHUTTING_DOWN = (421, "4.3.2 Service shutting down")
UNVERIFIED_CLIENT_CERT = (421, "4.7.1 Unverified client certificate")
TOO_MANY_ERRORS = (421, "4.7.0 Too many errors")

UPSTREAM_UNAVAILABLE = (451, "4.4.1 Upstream server unavailable")
UPSTREAM_TLS_NOT_OFFERED = (451, "4.7.5 TLS is required, but was not offered by host")
UPSTREAM_TLS_FAILED = (451, "4.7.5 TLS handshake with upstream failed")
UPSTREAM_NOT_TRUSTED = (451, "4.7.5 Server certificate not trusted")
UPSTREAM_LOST = (451, "4.4.2 Upstream connection lost")
TOO_MANY_RECIPIENTS = (452, "4.5.3 Too many recipients")
NEEDS_OTHER_POLICY = (452, "4.5.3 Recipient needs a different TLS policy, send it in a new transaction")

LINE_TOO_LONG = (500, "5.5.2 Line too long")
UNRECOGNIZED = (500, "5.5.2 Error: command not recognized")
NUL_IN_COMMAND = (500, "5.5.2 Error: NUL character not allowed")
SYNTAX = (501, "5.5.4 Syntax error")
INVALID_EHLO = (501, "5.5.2 Invalid EHLO argument")     # a control character in it (§4.4)
BAD_SENDER = (501, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT = (501, "5.1.3 Bad recipient address syntax")
NOT_IMPLEMENTED = (502, "5.5.1 Command not implemented")
STARTTLS_UNAVAILABLE = (502, "5.5.1 STARTTLS not available")
HELO_ONLY = (502, "5.5.1 Error: command not implemented, use HELO")
NEED_HELO = (503, "5.5.1 Error: send HELO/EHLO first")
NESTED_MAIL = (503, "5.5.1 Error: nested MAIL command")
NEED_MAIL = (503, "5.5.1 Error: need MAIL command")
MUST_STARTTLS = (530, "5.7.0 Must issue a STARTTLS command first")
MUST_USE_TLS = (530, "5.7.0 Must use TLS")
STRONGER_CIPHER = (530, "5.7.0 Must use stronger TLS cipher")
BARE_NEWLINE = (550, "5.5.2 Bare CR or LF not allowed")
TOO_BIG = (552, "5.3.4 Message size exceeds fixed limit")
NO_SMTPUTF8_UPSTREAM = (553, "5.6.7 SMTPUTF8 not supported by the upstream server")
SYNC_ERROR = (554, "5.5.0 SMTP protocol synchronization error")
TLS_ACTIVE = (554, "5.5.1 Error: TLS already active")
NO_VALID_RECIPIENTS = (554, "5.5.1 No valid recipients")
UNSUPPORTED_PARAMETER = (555, "5.5.4 Unsupported parameter")

# AUTH for submission (SPEC §4.6, RFC 4954)
AUTH_TOO_MANY_FAILURES = (421, "4.7.0 Too many authentication failures")
AUTH_LEG_LOST = (421, "4.4.2 Upstream connection lost")    # an authenticated leg broke
AUTH_LINE_TOO_LONG = (500, "5.5.6 Authentication Exchange line is too long")
AUTH_BAD_RESPONSE = (501, "5.5.2 Syntax error in SASL response")   # bare CR, LF or NUL
AUTH_ALREADY = (503, "5.5.1 Error: already authenticated")
AUTH_IN_TRANSACTION = (503, "5.5.1 Error: MAIL transaction in progress")
AUTH_UNKNOWN_MECHANISM = (504, "5.5.4 Unrecognized authentication type")
AUTH_REQUIRED = (530, "5.7.0 Authentication required")
AUTH_NEEDS_TLS = (538, "5.7.11 Encryption required for requested authentication mechanism")


def render(code: int, lines) -> bytes:
    """Render a (possibly multi-line) reply: `250-a\\r\\n250 b\\r\\n`."""
    if isinstance(lines, str):
        if lines:                      # the common case: one line
            return f"{code} {lines}\r\n".encode("utf-8", "surrogateescape")
        lines = (lines,)
    lines = list(lines) or [""]
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{line}\r\n" if line else f"{code}{sep.strip()}\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")
