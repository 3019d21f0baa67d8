"""TLS profiles (SPEC §3.3): the predefined read-only ones and cloning.

A Profile is pure data; gateway.tls.context turns it into an OpenSSL context.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..levels import CipherGrade

TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

# Mozilla server-side TLS recommendations (v5.7).
MOZILLA_INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
MOZILLA_OLD = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:"
    "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"
    "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:DHE-RSA-AES128-SHA256:"
    "DHE-RSA-AES256-SHA256:AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:"
    "AES256-SHA256:AES128-SHA:AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0"
)
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
DEFAULT_GROUPS = "X25519MLKEM768:X25519:prime256v1:secp384r1"

# cipher_strength → OpenSSL grade, as Postfix maps it (gateway.levels.CipherGrade).
CIPHER_STRENGTH = {grade: grade.openssl for grade in CipherGrade}


@dataclass(frozen=True)
class Profile:
    name: str
    min_version: str = "TLSv1.2"
    max_version: str = "TLSv1.3"
    ciphers: str = MOZILLA_INTERMEDIATE      # the OpenSSL cipher string actually used (TLS ≤ 1.2)
    cipher_strength: CipherGrade | None = None   # when set by the operator (ciphers narrowed)
    ciphersuites: str = TLS13_SUITES         # TLS 1.3 suites
    groups: str = DEFAULT_GROUPS
    ca_file: str | None = None
    ca_path: str | None = None
    verify_depth: int = 9
    session_resumption: bool = True
    predefined: bool = False


PREDEFINED: dict[str, Profile] = {
    "default": Profile(name="default", predefined=True),
    "strict": Profile(name="strict", min_version="TLSv1.3", predefined=True),
    "compatible": Profile(
        name="compatible", min_version="TLSv1", ciphers=MOZILLA_OLD, predefined=True
    ),
}


def clone(base: Profile, name: str, **overrides) -> Profile:
    """A new operator profile from *base* with *overrides* (already validated values).

    `cipher_strength` narrows the TLS ≤ 1.2 list the profile has — its own `ciphers` when
    given with it, else the list of *base* — to the suites of that grade (gateway.tls.grades;
    it never adds a suite). ValueError when the grade leaves no suite.
    """
    grade = overrides.get("cipher_strength")
    if grade is not None:
        from .grades import narrow
        overrides["ciphers"] = narrow(overrides.get("ciphers", base.ciphers), grade)
    return dataclasses.replace(base, name=name, predefined=False, **overrides)


def validate_profile(profile: Profile) -> None:
    """Check the data of *profile* (not what OpenSSL thinks of it: context.py does that).

    Raises ValueError with a message that names the offending field.
    """
    for field in ("min_version", "max_version"):
        value = getattr(profile, field)
        if value not in TLS_VERSIONS:
            allowed = ", ".join(f'"{v}"' for v in TLS_VERSIONS)
            raise ValueError(f'profile {profile.name}: {field} = "{value}" is not one of '
                             f"{allowed} (SSLv3 and older are never enabled)")
    if TLS_VERSIONS.index(profile.min_version) > TLS_VERSIONS.index(profile.max_version):
        raise ValueError(f"profile {profile.name}: min_version {profile.min_version} is above "
                         f"max_version {profile.max_version}")
    if profile.cipher_strength is not None and profile.cipher_strength not in CIPHER_STRENGTH:
        allowed = ", ".join(f'"{v}"' for v in CIPHER_STRENGTH)
        raise ValueError(f'profile {profile.name}: cipher_strength = '
                         f'"{profile.cipher_strength}" is not one of {allowed}')
    for field in ("ciphers", "ciphersuites", "groups"):
        value = getattr(profile, field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"profile {profile.name}: {field} must be a non-empty string")
        if "\0" in value:
            raise ValueError(f"profile {profile.name}: {field} contains a NUL character")
    if (not isinstance(profile.verify_depth, int) or isinstance(profile.verify_depth, bool)
            or profile.verify_depth < 0):
        raise ValueError(f"profile {profile.name}: verify_depth must be an integer at least 0, "
                         f"got {profile.verify_depth!r}")
    if not isinstance(profile.session_resumption, bool):
        raise ValueError(f"profile {profile.name}: session_resumption must be true or false")
