"""`gateway status`: the metrics endpoint's `/status` as tables (SPEC §11).

`fetch()` reads the JSON `gateway.observe.metrics.status()` serves; `format_table()` prints it: one
row per listener (open connections, sessions and messages in the last minute, the upstream's
last result and how long ago), the workers as the supervisor reports them, the certificates
with their expiry.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9108"


class StatusError(Exception):
    """The endpoint cannot be read."""


def url_for(metrics: str) -> str:
    """The base URL of a `[gateway] metrics` address (`host:port`, `[v6]:port`)."""
    host, _, port = metrics.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "[::]":
        host = "[::1]"
    return f"http://{host}:{port}"


def fetch(base_url: str, timeout: float = 10) -> dict:
    url = base_url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"{url}: {reason}") from None


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _table(rows) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def format_table(data: dict) -> str:
    out = [f"status at {data['time']}"]
    if "last_reload_successful" in data:
        ok = "ok" if data["last_reload_successful"] else "FAILED (the previous one runs)"
        out.append(f"last reload: {ok}; last good one {data.get('last_reload_success_utc', '-')}")
    out.append("")
    rows = [("LISTENER", "ACTIVE", "SESSIONS/MIN", "MESSAGES/MIN", "UPSTREAM LAST RESULT")]
    for lst in data["listeners"]:
        last = lst["upstream_last_result"]
        up = "-" if last is None else f"{last['result']} {_ago(last['age_seconds'])} " \
                                      f"({last['at_utc']})"
        rows.append((lst["name"], str(lst["active_connections"]),
                     str(lst["sessions_last_minute"]), str(lst["messages_last_minute"]), up))
    out += _table(rows)
    out.append("")
    if data["workers"]:
        rows = [("WORKER PID", "GENERATION", "HEARTBEAT AGE")]
        for w in data["workers"]:
            age = w.get("heartbeat_age_seconds")
            rows.append((str(w.get("pid", "-")), str(w.get("generation", "-")),
                         "-" if age is None else f"{age:.1f}s"))
        out += _table(rows)
    else:
        out.append("workers: not reported by the supervisor")
    out.append("")
    if data["certificates"]:
        rows = [("CERTIFICATE", "KEY", "NOT AFTER (UTC)", "EXPIRES IN")]
        for c in data["certificates"]:
            days = c["expires_in_days"]
            rows.append((c["name"], c["key_type"], c["not_after_utc"],
                         f"{days:.1f} days" if days >= 0 else f"EXPIRED {-days:.1f} days ago"))
        out += _table(rows)
    else:
        out.append("certificates: none loaded")
    if data.get("demo_certificate"):
        out.append("warning: the generated demonstration certificate is in use (insecure)")
    return "\n".join(out)
