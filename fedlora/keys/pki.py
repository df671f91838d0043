"""The coordinator's TLS PKI: a self-signed CA, the server certificate it signs, the operator key.

``DIR/tls/`` holds ``ca.crt``/``ca.key`` (devices trust ``ca.crt``),
``server.crt``/``server.key`` (a SAN for every host devices use) and
``operator.key``/``operator.pub`` (signs operator-only calls). All keys are EC
P-384; the server key is PKCS8 PEM, which gRPC and Flower's SuperLink load.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import ConfigError
from fedlora.keys.material import generate_key, refuse_existing, write_atomic, write_key_pair
from fedlora.keys.signing import OPERATOR_ID

TLS_DIR = "tls"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CERT_DAYS = 3650
"""CA and server certificate lifetime. An internal CA whose only relying parties are the
fleet; there is no renewal command yet, so a short-lived certificate would only strand
devices when it expires."""


@dataclass(frozen=True)
class TlsFiles:
    """The coordinator's TLS files: the CA devices trust and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(ca, cert, key)`` bytes, as ``grpc.ssl_server_credentials`` takes them."""
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read TLS file: {err}") from None


def tls_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / TLS_DIR


def operator_key_files(data_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(operator.key, operator.pub)`` under ``DIR/tls``."""
    tls = tls_dir(data_dir)
    return tls / "operator.key", tls / "operator.pub"


def tls_files(data_dir: str | os.PathLike[str]) -> TlsFiles:
    """The TLS files of ``data_dir``; :class:`ConfigError` if ``fedlora keys init`` has not run."""
    tls = tls_dir(data_dir)
    files = TlsFiles(ca=tls / "ca.crt", cert=tls / "server.crt", key=tls / "server.key")
    missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{tls} has no {', '.join(missing)}: run `fedlora keys init --data-dir {data_dir}` "
            "first"
        )
    return files


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or not all(re.fullmatch(r"(\*|[A-Za-z0-9-]{1,63})", label) for label in labels):
        raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _cert(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA384())


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def init_pki(
    data_dir: str | os.PathLike[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    force: bool = False,
) -> TlsFiles:
    """Create the CA, the server certificate (a SAN per host) and the operator key pair.

    Refuses to replace existing files unless ``force``: a new CA means every device
    needs the new ``ca.crt``.
    """
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    sans = [_san(h) for h in hosts]
    tls = tls_dir(data_dir)
    files = TlsFiles(ca=tls / "ca.crt", cert=tls / "server.crt", key=tls / "server.key")
    op_key, op_pub = operator_key_files(data_dir)
    ca_key_path = tls / "ca.key"
    refuse_existing(
        [files.ca, ca_key_path, files.cert, files.key, op_key, op_pub],
        force,
        "the coordinator's keys (devices will then need the new ca.crt)",
    )
    ca_key, server_key = generate_key(), generate_key()
    ca = _cert(
        "fedlora coordinator CA",
        ca_key.public_key(),
        None,
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_key_usage(sign_certs=True), True),
        ],
    )
    server = _cert(
        hosts[0],
        server_key.public_key(),
        ca.subject,
        ca_key,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(sign_certs=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName(sans), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ],
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem, plain = serialization.Encoding.PEM, serialization.NoEncryption()
    write_atomic(ca_key_path, ca_key.private_bytes(pem, pkcs8, plain), 0o600)
    write_atomic(files.key, server_key.private_bytes(pem, pkcs8, plain), 0o600)
    write_atomic(files.ca, ca.public_bytes(pem), 0o644)
    write_atomic(files.cert, server.public_bytes(pem), 0o644)
    write_key_pair(generate_key(), op_key, op_pub, OPERATOR_ID)
    return files
