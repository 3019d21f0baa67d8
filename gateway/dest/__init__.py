"""Destinations: where a transaction goes, and what it must prove there (SPEC §4.8).

Groundwork for §4.8: the modules here are complete and tested on their own but not wired
into the configuration or the sessions yet. `dns` resolves through dnspython's trio backend
(MX per RFC 5321 §5.1, TLSA, client names with forward confirmation), asking for DNSSEC and
reading AD.

Nothing is imported here, so importing one module of the package does not load the others.
"""
