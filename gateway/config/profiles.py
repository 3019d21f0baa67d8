"""The ``[tls_profiles]`` section (SPEC §3.3): operator profiles cloned from the predefined
ones or from each other, with the OpenSSL probe that rejects strings OpenSSL cannot apply."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..levels import CipherGrade
from ..tls.profiles import PREDEFINED, TLS_VERSIONS, Profile, clone
from .table import Collector, Table, describe, key_path, quoted

CIPHER_STRENGTHS = tuple(CipherGrade)

_PROFILE_KEYS = ("clone", "min_version", "max_version", "cipher_strength", "ciphers",
                 "ciphersuites", "groups", "ca_file", "ca_path", "verify_depth",
                 "session_resumption")


def _check_openssl(path: str, key: str, value: str) -> None:
    """Reject cipher strings, TLS 1.3 suites and group lists OpenSSL cannot apply."""
    from OpenSSL import SSL

    from ..tls._ossl import groups_list_ok
    try:
        if key == "ciphers":
            SSL.Context(SSL.TLS_METHOD).set_cipher_list(value.encode())
        elif key == "ciphersuites":
            SSL.Context(SSL.TLS_METHOD).set_tls13_ciphersuites(value.encode())
        elif key == "groups" and not groups_list_ok(value):
            raise ValueError("unknown group")
    except Exception:
        raise ConfigError(key_path(path, key),
                          f'OpenSSL cannot apply {key} = "{value}"') from None


class _Broken(Exception):
    """A profile clones one in error (whose error is already recorded)."""


def _profile_table(name: str, value: Any) -> Table:
    path = key_path("tls_profiles", name)
    if name in PREDEFINED:
        raise ConfigError(path, f'the predefined profile "{name}" is read-only; clone it: '
                                f'[tls_profiles.my_{name}] with clone = "{name}"')
    t = Table(value, path, _PROFILE_KEYS)
    if not t.has("clone"):
        raise ConfigError(path, 'a profile must start with clone = "<name>" '
                                f"(predefined: {quoted(PREDEFINED)})")
    if next(iter(t.data)) != "clone":
        raise ConfigError(t.p("clone"), f'must be the first key of [{path}]')
    t.str("clone")
    return t


def parse_profiles(top: Table, errors: Collector | None = None) -> dict[str, Profile]:
    """The predefined profiles and the operator's. With *errors*, each profile in error is
    recorded there (a profile cloning it is not checked) and stands in the result as a
    placeholder, so that the listeners naming it are checked without a second error."""
    profiles = dict(PREDEFINED)
    if not top.has("tls_profiles"):
        return profiles
    section = top.data["tls_profiles"]
    if not isinstance(section, dict):
        raise ConfigError("tls_profiles", f"expected a table of profiles "
                                          f"([tls_profiles.NAME]), got {describe(section)}")
    own = errors is None
    errors = errors if errors is not None else Collector()
    tables: dict[str, Table] = {}
    broken: set[str] = set()
    for name, value in section.items():
        t = errors.attempt(_profile_table, name, value)
        if t is None:
            broken.add(name)
        else:
            tables[name] = t

    resolving: list[str] = []

    def resolve(name: str) -> Profile:
        if name in profiles:
            return profiles[name]
        if name in broken:
            raise _Broken()
        t = tables[name]
        base_name = t.data["clone"]
        if base_name not in profiles and base_name not in tables:
            known = sorted(set(profiles) | set(tables))
            raise ConfigError(t.p("clone"), f'unknown profile "{base_name}" '
                                            f"(known: {quoted(known)})")
        if base_name in resolving or base_name == name:
            raise ConfigError(t.p("clone"),
                              "profiles clone each other in a cycle: "
                              + " -> ".join(resolving + [name, base_name]))
        resolving.append(name)
        base = resolve(base_name)
        resolving.pop()
        overrides: dict[str, Any] = {}
        for key in ("min_version", "max_version"):
            if t.has(key):
                overrides[key] = t.str(key, choices=TLS_VERSIONS)
        if t.has("ciphers"):
            # the profile's own list; a grade beside it narrows it (below), none: no grade
            overrides["ciphers"] = t.str("ciphers")
            overrides["cipher_strength"] = None
            _check_openssl(t.path, "ciphers", overrides["ciphers"])
        if t.has("cipher_strength"):
            overrides["cipher_strength"] = t.choice("cipher_strength", CipherGrade)
        for key in ("ciphersuites", "groups"):
            if t.has(key):
                overrides[key] = t.str(key)
                _check_openssl(t.path, key, overrides[key])
        for key in ("ca_file", "ca_path"):
            if t.has(key):
                overrides[key] = t.str(key)
        if t.has("verify_depth"):
            overrides["verify_depth"] = t.int("verify_depth", minimum=0, maximum=100)
        if t.has("session_resumption"):
            overrides["session_resumption"] = t.bool("session_resumption")
        try:
            profile = clone(base, name, **overrides)
        except ValueError as exc:          # a grade that leaves no suite of the list
            raise ConfigError(t.p("cipher_strength"), str(exc)) from None
        lo, hi = (TLS_VERSIONS.index(profile.min_version),
                  TLS_VERSIONS.index(profile.max_version))
        if lo > hi:
            key = "min_version" if t.has("min_version") else "max_version"
            raise ConfigError(t.p(key), f"min_version {profile.min_version} is above "
                                        f"max_version {profile.max_version}")
        profiles[name] = profile
        return profile

    for name in tables:
        if name in profiles or name in broken:
            continue
        try:
            resolve(name)
        except (ConfigError, _Broken) as exc:
            if isinstance(exc, ConfigError):
                errors.errors.append(exc)
            broken.update(resolving)       # they clone the profile in error
            broken.add(name)
            resolving.clear()
    for name in broken:
        if name not in profiles and name not in PREDEFINED:
            # never used to build a context: the configuration is refused with its error
            profiles[name] = Profile(name=name, ca_file="<profile in error>")
    if own:
        errors.raise_all()
    return profiles
