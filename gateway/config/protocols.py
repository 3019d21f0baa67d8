"""The protocols a listener speaks and what each can do: the one place that knows them.

A decision about a listener asks its protocol's capabilities (``listener.protocol.takes_rules``),
never its name: the names belong to this table and the configuration parser, and the serve
side maps each protocol to its session and its refusal (`gateway.serve.protocols`). Each
member is a `str` equal to its configuration word (``Protocol.SMTP == "smtp"``) and formats
as it, so logs, metrics labels and `gateway check` print the same words. The capabilities are
plain attributes of the member, set once here: reading one costs an attribute lookup.
"""
from __future__ import annotations

import enum


class Protocol(enum.StrEnum):
    # the configuration word, then what a listener of the protocol may have and does
    SMTP = "smtp", dict(
        takes_rules=True,          # [[listeners.rules]], encryption by sender/recipient (§4.3)
        takes_milters=True,        # [[listeners.milters]] (§4.7)
        takes_auth=True,           # auth = "optional" | "required" (§4.6)
        takes_pregreet=True,       # pregreet_wait: its greeting may be held back (§4.1)
        knows_sender=True,         # client rules by sender domain (MAIL FROM, §4.3)
        esmtp_switch=True,         # esmtp = false also takes STARTTLS away (§2)
        pools_legs=True,           # idle upstream legs go back to the worker's pool (§4.4)
        carries_messages=True,     # messages counted, TLS alerts mailed, `gateway policy` (§8, §10)
        outlives_reload=False,     # a retired worker's sessions drain, they are not kept (§9)
    )
    IMAP = "imap", dict(
        takes_rules=False, takes_milters=False, takes_auth=False, takes_pregreet=False,
        knows_sender=False, esmtp_switch=False,
        pools_legs=False,          # a leg carries the user's login: the session's alone (§5)
        carries_messages=False,
        outlives_reload=True,      # relayed sessions stay until reload_grace (§9)
    )

    def __new__(cls, word: str, capabilities: dict | None = None):
        member = str.__new__(cls, word)
        member._value_ = word
        for name, value in (capabilities or {}).items():
            setattr(member, name, value)
        return member

    takes_rules: bool
    takes_milters: bool
    takes_auth: bool
    takes_pregreet: bool
    knows_sender: bool
    esmtp_switch: bool
    pools_legs: bool
    carries_messages: bool
    outlives_reload: bool


PROTOCOLS = tuple(Protocol)
