"""Running the gateway in-process for end-to-end tests: config from a dict, captured logs.

Import with `from harness import ...` (tests/ is put on sys.path by conftest.py).
"""
from __future__ import annotations

import json
import smtplib
import ssl
from contextlib import asynccontextmanager

import trio

from gateway.config import parse_config
from gateway.observe.logs import EventLog
from gateway.serve.server import serve
from gateway.sink import Sink


class LogCapture:
    """A stream for EventLog(fmt="json"): keeps every event as a dict."""

    def __init__(self):
        self.events: list[dict] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self.events.append(json.loads(line))
        return len(text)

    def flush(self) -> None:
        pass

    def of(self, event: str, **match) -> list[dict]:
        return [e for e in self.events if e.get("event") == event
                and all(str(e.get(k)) == str(v) for k, v in match.items())]


def listener_dict(name="smtp", *, upstream_port, tls="starttls", client_tls="optional",
                  upstream_tls="none", cert=None, profile=None, **extra) -> dict:
    d = {"name": name, "protocol": "smtp", "bind": "127.0.0.1:0", "tls": tls,
         "client_tls": client_tls,
         "upstream": {"address": f"127.0.0.1:{upstream_port}", "tls": upstream_tls}}
    if cert is not None:
        d["certificate"] = cert
    if profile is not None:
        d["profile"] = profile
    upstream_extra = extra.pop("upstream", {})
    d["upstream"].update(upstream_extra)
    d.update(extra)
    return d


def config_dict(listeners: list[dict], *, server_cert=None, ca_file=None, **gateway) -> dict:
    data = {"gateway": {"hostname": "mx.test", "metrics": "", **gateway},
            "listeners": listeners}
    if server_cert is not None:
        data["certificates"] = {"main": {"cert": str(server_cert.cert),
                                         "key": str(server_cert.key)}}
    if ca_file is not None:
        data["tls_profiles"] = {"testca": {"clone": "default", "ca_file": str(ca_file)}}
    return data


# --- a TOML writer for the shapes config_dict and tomllib make (tables, arrays of tables,
# scalars and arrays of scalars): `gateway run -c FILE` in a subprocess needs a file ---------

def _toml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"


def _toml_table_list(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def to_toml(data: dict, path: str = "", header: str | None = None, out=None) -> str:
    """*data* (a decoded TOML document) as TOML text: tomllib.loads(to_toml(d)) == d."""
    out = [] if out is None else out
    if header:
        out.append(header)
    for key, value in data.items():
        if not isinstance(value, dict) and not _toml_table_list(value):
            out.append(f"{json.dumps(key)} = {_toml_scalar(value)}")
    for key, value in data.items():
        sub = f"{path}.{json.dumps(key)}" if path else json.dumps(key)
        if isinstance(value, dict):
            to_toml(value, sub, f"[{sub}]", out)
        elif _toml_table_list(value):
            for item in value:
                to_toml(item, sub, f"[[{sub}]]", out)
    return "\n".join(out) + "\n"


@asynccontextmanager
async def running_gateway(data: dict):
    """Start the gateway on ephemeral ports; yields (gateway, logs)."""
    logs = LogCapture()
    config = parse_config(data)
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(serve, config, EventLog(fmt="json", stream=logs))
        try:
            yield gw, logs
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def running_sink(**kw):
    sink = Sink(**kw)
    async with trio.open_nursery() as nursery:
        sink.port = await nursery.start(sink.serve, "127.0.0.1", 0)
        try:
            yield sink
        finally:
            nursery.cancel_scope.cancel()


def client_context(ca_file) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    return ctx


def server_ssl_context(cert) -> ssl.SSLContext:
    """A stdlib server context for a test peer (e.g. the sink offering STARTTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


def smtp_send(port, *, starttls=False, implicit=False, ctx=None, mail_from="alice@client.test",
              rcpts=("bob@example.test",), body=b"Subject: test\r\n\r\nhello\r\n",
              host="localhost", timeout=20):
    """Send one message with smtplib; returns the reply of the end of DATA (code, text)."""
    cls = smtplib.SMTP_SSL if implicit else smtplib.SMTP
    kwargs = {"context": ctx} if implicit else {}
    with cls(host, port, timeout=timeout, **kwargs) as s:
        s.ehlo("client.test")
        if starttls:
            s.starttls(context=ctx)
            s.ehlo("client.test")
        code, text = s.mail(mail_from)
        if code != 250:
            return code, text
        for r in rcpts:
            code, text = s.rcpt(r)
            if code // 100 != 2:
                return code, text
        return s.data(body)


def raw_starttls(port: int, ctx, *, session=None, suppress_ragged_eofs: bool = True,
                 timeout: float = 20):
    """A socket that said EHLO and STARTTLS to 127.0.0.1:*port* and did the TLS handshake
    (stdlib ssl, server name "localhost", offering *session*); the caller closes it."""
    import socket
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        f = raw.makefile("rb", buffering=0)
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220 ")
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session,
                               suppress_ragged_eofs=suppress_ragged_eofs)
    except BaseException:
        raw.close()
        raise


def gateway_subprocess_env() -> dict:
    """Environment for `python -m gateway` subprocesses: they import the same `gateway` as
    this test process (the installed package in CI, never the source tree by accident)."""
    import os
    from pathlib import Path

    import gateway
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(gateway.__file__).resolve().parent.parent)
    return env


NEUTRAL_CWD = "/"      # `python -m` puts the cwd on sys.path: never run from the source tree
