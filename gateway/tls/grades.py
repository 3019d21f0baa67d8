"""Cipher grades (SPEC §3.3): `cipher_strength` only ever narrows a TLS ≤ 1.2 list.

A grade (`medium`: OpenSSL's ``HIGH:MEDIUM``, `high`: ``HIGH``, never aNULL/eNULL) filters
the list a profile already has down to the suites of that grade, in the profile's order and
with its ``@SECLEVEL``; it never adds a suite. Both lists are expanded by OpenSSL itself, so
what is compared is what OpenSSL would offer. TLS 1.3 suites are not touched (every one of
them meets either grade).
"""
from __future__ import annotations

import re
from functools import lru_cache

from OpenSSL import SSL

from ..levels import CipherGrade

_SECLEVEL_RE = re.compile(r"@SECLEVEL=(\d+)")


@lru_cache(maxsize=64)
def expand(ciphers: str) -> tuple[str, ...]:
    """The OpenSSL names of the TLS ≤ 1.2 suites *ciphers* selects, in OpenSSL's order.

    ValueError when OpenSSL cannot apply the string."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ValueError(f'OpenSSL cannot apply ciphers = "{ciphers}"') from None
    ctx.set_tls13_ciphersuites(b"")           # leave only the TLS ≤ 1.2 suites in the list
    return tuple(SSL.Connection(ctx, None).get_cipher_list())


@lru_cache(maxsize=8)
def grade_suites(grade: CipherGrade | str) -> frozenset[str]:
    """The TLS ≤ 1.2 suites of *grade*."""
    return frozenset(expand(CipherGrade(grade).openssl))


def narrow(ciphers: str, grade: CipherGrade | str) -> str:
    """The cipher string that keeps of *ciphers* only the suites of *grade*, in order, with
    the ``@SECLEVEL`` of *ciphers* (the last one, as OpenSSL reads it).

    ValueError when no suite is left (or OpenSSL cannot apply *ciphers*)."""
    grade = CipherGrade(grade)
    allowed = grade_suites(grade)
    kept = [name for name in expand(ciphers) if name in allowed]
    if not kept:
        raise ValueError(f'cipher_strength = "{grade}" leaves no suite of the TLS 1.2 list '
                         f'"{ciphers}" (a grade only narrows the list, it never adds a suite)')
    seclevel = _SECLEVEL_RE.findall(ciphers)
    if seclevel:
        kept.append(f"@SECLEVEL={seclevel[-1]}")
    return ":".join(kept)
