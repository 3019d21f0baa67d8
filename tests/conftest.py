"""Shared fixtures: a test CA (trustme) and certificates written to a world-readable dir.

Helpers for real peers live in tests/peers.py; keep this file small.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import trustme

# Test helper modules (peers.py, harness.py) import as top-level modules; the package under
# test is NOT put on the path: tests import the installed `gateway`.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def pubdir():
    """A 0755 scratch directory that postfix/dovecot users can reach (tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="gwtest-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ca():
    return trustme.CA()


class CertFiles:
    def __init__(self, directory: Path, name: str, issued: trustme.LeafCert, ca: trustme.CA):
        self.cert = directory / f"{name}.crt"     # chain PEM
        self.key = directory / f"{name}.key"
        self.ca = directory / "ca.crt"
        issued.private_key_pem.write_to_path(str(self.key))
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        for extra in issued.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert), append=True)
        ca.cert_pem.write_to_path(str(self.ca))
        for p in (self.cert, self.key, self.ca):
            os.chmod(p, 0o644)


@pytest.fixture(scope="session")
def server_cert(ca, pubdir):
    """Certificate for the gateway / test servers: names localhost, mx.test, 127.0.0.1."""
    return CertFiles(pubdir, "server", ca.issue_cert("localhost", "mx.test", "127.0.0.1"), ca)


@pytest.fixture(scope="session")
def upstream_cert(ca, pubdir):
    """Certificate for upstream servers (e.g. Postfix): names upstream.test, localhost, 127.0.0.1."""
    return CertFiles(pubdir, "upstream", ca.issue_cert("upstream.test", "localhost", "127.0.0.1"), ca)


@pytest.fixture(scope="session")
def client_cert(ca, pubdir):
    """A client certificate issued by the test CA (for client_tls = verify)."""
    return CertFiles(pubdir, "client", ca.issue_cert("client.test"), ca)


@pytest.fixture(scope="session")
def dns_testbed(pubdir):
    """Signed, unsigned and bogus test zones: a private nsd behind a private validating
    unbound (tests/dnszones.py says what is in them); `.resolver` is "127.0.0.1:PORT"."""
    from dnszones import DNSTestbed
    from peers import instance_dir
    with DNSTestbed(instance_dir(pubdir, "dns")) as bed:
        yield bed
