"""TLS for NATS: a private CA and one certificate for the fleet's servers, and the client's context.

`fleetd up --cluster N` and `fleetd tls ensure` write them into `<home>/tls/`: `ca.pem` (what clients
and routes trust), `server.pem` and `server-key.pem` (0600), valid for loopback and the names given.
The same certificate serves clients and routes, where each node presents it to the others (mutual
TLS), so it carries both server and client usage. On real boxes an operator may bring a lab CA's
files instead and name them in `fleetd.toml` (docs/operations.md); nothing here is then needed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest server lifetime browsers and most TLS stacks still accept


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def tls_dir(home: Path) -> Path:
    return Path(home) / "tls"


def files(home: Path) -> TlsFiles:
    d = tls_dir(home)
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server-key.pem")


def ensure(home: Path, names: tuple[str, ...] = ()) -> TlsFiles:
    """The home's CA and server certificate, created on first use and kept after (clients trust the CA)."""
    out = files(home)
    if out.ca.is_file() and out.cert.is_file() and out.key.is_file():
        return out
    out.ca.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bem-fleet CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bem-fleet nats")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(
        out.key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private=True,
    )
    _write(out.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out.ca, ca.public_bytes(serialization.Encoding.PEM), private=False)
    return out  # the CA's key is not kept: a new name means a new CA (`fleetd tls ensure` on a fresh dir)


def names(cert: Path) -> set[str]:
    """The host names and addresses a certificate is valid for."""
    found = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    sans = found.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in sans.get_values_for_type(x509.DNSName)} | {
        str(v) for v in sans.get_values_for_type(x509.IPAddress)
    }


def _write(path: Path, data: bytes, *, private: bool) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def find_ca(home: Path, explicit: str | Path | None = None) -> Path | None:
    """The CA a client trusts: the file it was given, else the home's `tls/ca.pem` if there is one
    (None: the system's trust store, for a server whose certificate a public CA signed)."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such CA file (nats.tls_ca_file / --tls-ca)")
        return path
    default = files(home).ca
    return default if default.is_file() else None


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """What a fleet client trusts: the fleet's CA only where one is given, with host names checked."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
