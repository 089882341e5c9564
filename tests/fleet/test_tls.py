"""fleet.tls: the home's CA and the servers' certificate, and `fleetd tls ensure`."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from fleet import tls
from tests.fleet.conftest import REPO


def test_the_certificate_covers_loopback_and_the_names_and_the_key_is_private(tmp_path: Path) -> None:
    found = tls.ensure(tmp_path, ("host1.lab", "10.0.0.2"))
    assert tls.names(found.cert) == {"localhost", "127.0.0.1", "::1", "host1.lab", "10.0.0.2"}
    assert found.key.stat().st_mode & 0o077 == 0 and found.cert.stat().st_mode & 0o077 == 0o044
    ca = x509.load_pem_x509_certificate(found.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(found.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    # The same certificate serves clients and routes (mutual TLS), so it is good for both ends.
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usage} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    # Kept on a second call: clients already trust this CA.
    assert tls.ensure(tmp_path).ca.read_bytes() == found.ca.read_bytes()
    ctx = tls.client_context(found.ca)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_fleetd_tls_ensure_refuses_a_name_its_certificate_lacks(tmp_path: Path) -> None:
    def run(*names: str) -> subprocess.CompletedProcess[str]:
        flags = [f"--name={n}" for n in names]
        cmd = [sys.executable, "-m", "fleetd", "--home", str(tmp_path), "tls", "ensure", *flags]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)

    first = run("host1.lab")
    assert first.returncode == 0 and "ca.pem" in first.stdout, first.stderr
    again = run("host2.lab")
    assert again.returncode == 2 and "does not cover host2.lab" in again.stderr
    assert run("host1.lab").returncode == 0
