"""`gateway check` beyond syntax: the files a configuration names, and its user and group."""
from __future__ import annotations

import os
import stat

from ..tls.certs import load_pairs
from .model import GatewayConfig
from .table import key_path


def check_files(config: GatewayConfig, warnings: list[str] | None = None) -> list[str]:
    """Checks `gateway check` makes beyond syntax: certificate/key/CA files readable, the key
    matching its certificate, `user`/`group` existing. Returns the problems found; findings
    that do not stop the gateway (a private key readable by group or others) are appended to
    *warnings* when it is given."""
    problems: list[str] = []
    warnings = warnings if warnings is not None else []

    def private(path_key: str, filename: str) -> None:
        try:
            mode = os.stat(filename).st_mode
        except OSError:
            return                         # reported by readable()
        if mode & 0o044:
            who = " and ".join(w for w, bit in (("group", 0o040), ("others", 0o004))
                               if mode & bit)
            warnings.append(f"{path_key}: the private key {filename} is readable by {who} "
                            f"(mode {stat.S_IMODE(mode):04o}; chmod 600 it)")

    def readable(path_key: str, filename: str) -> bool:
        try:
            with open(filename, "rb") as f:
                head = f.read(1 << 16)
        except OSError as exc:
            problems.append(f"{path_key}: cannot read {filename}: {exc.strerror or exc}")
            return False
        if b"-----BEGIN" not in head:
            problems.append(f"{path_key}: {filename} holds no PEM data")
            return False
        return True

    for name, cert in config.certificates.items():
        base = key_path("certificates", name)
        files = [("cert", cert.cert), ("key", cert.key)]
        if cert.rsa_cert is not None and cert.rsa_key is not None:
            files += [("rsa_cert", cert.rsa_cert), ("rsa_key", cert.rsa_key)]
        ok = True
        for key, filename in files:
            ok = readable(f"{base}.{key}", filename) and ok
            if key.endswith("key"):
                private(f"{base}.{key}", filename)
        if not ok:
            continue
        try:                              # key types of the pairs (§3.4), each key its cert
            load_pairs(base, cert.cert, cert.key, cert.rsa_cert, cert.rsa_key)
        except ValueError as exc:
            text = str(exc)
            problems.append(text if text.startswith(base) else f"{base}: {text}")
            continue
        for cert_file, key_file in cert.pairs():
            try:
                from OpenSSL import SSL
                ctx = SSL.Context(SSL.TLS_METHOD)
                ctx.use_certificate_chain_file(cert_file)
                ctx.use_privatekey_file(key_file)
                ctx.check_privatekey()
            except ImportError:  # pragma: no cover
                pass
            except Exception as exc:
                problems.append(f"{base}: the certificate and key cannot be used together "
                                f"({exc})")
    for name, profile in config.profiles.items():
        if profile.predefined:
            continue
        base = key_path("tls_profiles", name)
        if profile.ca_file:
            readable(f"{base}.ca_file", profile.ca_file)
        if profile.ca_path and not os.path.isdir(profile.ca_path):
            problems.append(f"{base}.ca_path: {profile.ca_path} is not a directory")
    if config.user is not None:
        import pwd
        try:
            pwd.getpwnam(config.user)
        except KeyError:
            problems.append(f'gateway.user: no such user "{config.user}"')
    if config.group is not None:
        import grp
        try:
            grp.getgrnam(config.group)
        except KeyError:
            problems.append(f'gateway.group: no such group "{config.group}"')
    if config.tracking_log:
        directory = os.path.dirname(os.path.abspath(config.tracking_log))
        if not os.path.isdir(directory):
            problems.append(f"gateway.tracking_log: directory {directory} does not exist")
    if config.alert_recipients:             # the alert limiter lives there (§8)
        problem = _state_dir_problem(config.state_dir)
        if problem:
            problems.append(f"gateway.state_dir: {problem}")
    return problems


def _state_dir_problem(path: str) -> str | None:
    """Why the gateway could not keep its state database in *path* (created at start when
    missing, then given to the workers' user), or None."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return f"{path} is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        database = os.path.join(path, "state.sqlite")
        if os.path.lexists(database) and (not os.path.isfile(database)
                                          or not os.access(database, os.R_OK | os.W_OK)):
            return f"{database} is not a writable file"
        return None
    parent = os.path.dirname(path.rstrip("/")) or "/"
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None
