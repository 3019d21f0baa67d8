"""Alert e-mail when TLS that a destination requires cannot be had (SPEC §8, optional).

With `[gateway] alert_recipients` set, a short plain-text report goes through the listener's
upstream (STARTTLS when offered: the report names domains, not mail) at most once per
(domain, reason) per `alert_interval` seconds (default one hour), across every worker, listener
and reload: each send is claimed first in the shared state database (gateway.serve.state, under
`state_dir`), and only the worker whose claim succeeds sends. The `tls_alert` log event and
`gateway_tls_alerts_total` are raised for every failure regardless; the e-mail is the
operator's nudge, never a flood. Claiming and sending run in the background (the claim, a
blocking SQLite call, in a thread): the client's reply never waits for them, and a failure to
send is logged (`alert_mail_error`) and forgotten. Each worker also remembers what it claimed
or was told, so the database is asked at most once per pair and interval per worker; if it
cannot be used (`alert_state_error`, logged once), that memory alone limits the alerts.
"""
from __future__ import annotations

import datetime
import email.utils
import sqlite3
import time

import trio

from ..levels import UpstreamLevel
from ..relay.upstream import UpstreamFailure, UpstreamLeg, UpstreamSettings

SEND_TIMEOUT = 60.0          # the whole delivery of one alert, connect to final reply


class AlertMailer:
    def __init__(self, settings: UpstreamSettings, *, sender: str, recipients, hostname: str,
                 listener: str, log, interval: float = 3600.0, clock=time.time, store=None):
        self.settings = settings
        self.sender = sender
        self.recipients = tuple(recipients)
        self.hostname = hostname
        self.listener = listener
        self.log = log
        self.interval = interval
        self.clock = clock
        self.store = store                           # gateway.serve.state.StateStore, shared
        self.nursery: trio.Nursery | None = None     # set by serve(): where sends run
        self._last: dict[tuple[str, str], float] = {}
        self._store_failed = False
        self.sent = 0

    def due(self, domain: str, reason: str) -> bool:
        """True (and the slot is taken here) if, as far as this process knows, no alert for
        this pair went out in the interval."""
        now = self.clock()
        last = self._last.get((domain, reason))
        if last is not None and 0 <= now - last < self.interval:
            return False
        self._remember(domain, reason, now)
        return True

    def _remember(self, domain: str, reason: str, when: float) -> None:
        self._last[(domain, reason)] = when
        if len(self._last) > 10000:                 # bounded: forget the oldest entries
            for key, _ in sorted(self._last.items(), key=lambda kv: kv[1])[:5000]:
                del self._last[key]

    def notify(self, domains, reason: str, detail: str) -> None:
        """Queue one e-mail for the domains whose (domain, reason) slot is free (here, then
        in the shared store)."""
        fresh = [d for d in domains if self.due(d, reason)]
        if not fresh or self.nursery is None:
            return
        self.nursery.start_soon(self._claim_and_send, fresh, reason, detail)

    async def _claim_and_send(self, domains, reason: str, detail: str) -> None:
        if self.store is not None:
            domains = await self.claim(domains, reason)
            if not domains:
                return
        await self._send_logged(domains, reason, detail)

    async def claim(self, domains, reason: str) -> list[str]:
        """The domains whose alert this worker may send, claimed in the shared store (in a
        thread: SQLite blocks); the others are remembered as the store dates them. Without
        a usable store: all of them (this process' own limit still holds)."""
        try:
            claimed, held = await trio.to_thread.run_sync(
                self.store.claim_alerts, domains, reason, self.interval, self.clock())
        except (sqlite3.Error, OSError) as exc:
            if not self._store_failed:
                self._store_failed = True
                self.log.event("alert_state_error", level="warning", path=self.store.path,
                               message=f"{exc}; alerts are limited per worker only")
            return list(domains)
        for domain, last in held.items():
            self._remember(domain, reason, last)
        return claimed

    def message(self, domains, reason: str, detail: str) -> bytes:
        date = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc))
        msgid = email.utils.make_msgid("tls-alert", domain=self.hostname)
        body = [
            f"The mail TLS gateway {self.hostname} (listener {self.listener}) could not",
            "negotiate the TLS that the policy requires for these destination domains:",
            "",
            *(f"    {d}" for d in domains),
            "",
            f"reason: {reason}",
            f"detail: {detail}",
            "",
            "The senders got a temporary failure (451 4.7.5) and will retry; nothing was",
            "sent in plaintext. Further alerts for the same domain and reason are held back",
            f"for {int(self.interval)} seconds.",
        ]
        headers = [
            f"From: <{self.sender}>",
            "To: " + ", ".join(f"<{r}>" for r in self.recipients),
            f"Subject: TLS alert: {reason} for {', '.join(domains)}"[:900],
            f"Date: {date}",
            f"Message-ID: {msgid}",
            "Auto-Submitted: auto-generated",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
        ]
        lines = headers + [""] + body
        text = "\r\n".join("." + ln if ln.startswith(".") else ln for ln in lines) + "\r\n"
        return text.encode("utf-8", "replace")

    async def _send_logged(self, domains, reason: str, detail: str) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT):
                reply = await self.send(domains, reason, detail)
        except (UpstreamFailure, trio.TooSlowError) as exc:
            self.log.event("alert_mail_error", level="warning", domains=",".join(domains),
                           reason=str(exc) or "timeout")
            return
        self.sent += 1
        self.log.event("alert_mail", domains=",".join(domains), reason=reason,
                       recipients=",".join(self.recipients), reply=reply)

    async def send(self, domains, reason: str, detail: str) -> str:
        leg = await UpstreamLeg.open(self.settings, UpstreamLevel.PREFERRED)
        try:
            reply = await leg.command(f"MAIL FROM:<{self.sender}>")
            if reply.code != 250:
                raise UpstreamFailure((451, ""), f"MAIL refused: {reply.code} {reply.text}")
            accepted = 0
            for rcpt in self.recipients:
                reply = await leg.command(f"RCPT TO:<{rcpt}>")
                accepted += reply.code // 100 == 2
            if not accepted:
                raise UpstreamFailure((451, ""), f"RCPT refused: {reply.code} {reply.text}")
            reply = await leg.command("DATA")
            if reply.code != 354:
                raise UpstreamFailure((451, ""), f"DATA refused: {reply.code} {reply.text}")
            await leg.send_data(self.message(domains, reason, detail))
            reply = await leg.finish_data()
            if reply.code // 100 != 2:
                raise UpstreamFailure((451, ""), f"message refused: {reply.code} {reply.text}")
            return f"{reply.code} {reply.text}"
        finally:
            await leg.quit()
