"""Key material: NIST EC keys, their file formats, fingerprints and device key files.

Devices use EC P-384 keys, since Flower's SuperNode authentication accepts only
NIST EC curves. A private key is written in OpenSSH format because
``flower-supernode --auth-supernode-private-key`` loads it with
``load_ssh_private_key`` (a PKCS8 PEM file is refused there); a public key is one
OpenSSH line, what ``flwr supernode register`` loads. Private keys are written
0600, every file atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.errors import ConfigError
from fedlora.runfiles import write_bytes_atomic

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def check_device_id(device_id: str) -> str:
    """``device_id`` if it is a usable id (also a file name), else :class:`ConfigError`."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ConfigError(
            f"device id {device_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, via a temp file in the same dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(data, path, mode=mode)


def refuse_existing(paths: Sequence[Path], force: bool, what: str) -> None:
    """:class:`ConfigError` naming the files of ``paths`` that exist, unless ``force``."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(p.name for p in existing)
        raise ConfigError(
            f"{existing[0].parent} already has {names}: pass --force to replace {what}"
        )


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh NIST P-384 key (the curve Flower's own key helpers use)."""
    return ec.generate_private_key(ec.SECP384R1())


def private_key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key, unencrypted: the format ``flower-supernode`` loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public_key(key: ec.EllipticCurvePublicKey) -> str:
    """The key as one OpenSSH line without a comment (``ecdsa-sha2-nistp384 AAAA...``)."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def flower_public_key_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """The bytes Flower's Control API wants in ``RegisterNodeRequest(public_key=...)``.

    PEM SubjectPublicKeyInfo, as ``flwr.supercore.primitives.asymmetric.public_key_to_bytes``
    writes it (``flwr supernode register`` sends exactly this).
    """
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of the key's DER SubjectPublicKeyInfo: how the audit log names keys.

    The same as ``openssl pkey -pubin -in KEY.pem -outform DER | sha256sum``.
    """
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"sha256:{hashlib.sha256(spki).hexdigest()}"


def ssh_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH key blob: what ``ssh-keygen -lf KEY.pub`` prints
    (and what the device registry lists)."""
    blob = base64.b64decode(openssh_public_key(key).split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def check_nist_ec(key: object, source: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.replace("PublicKey", "").lstrip("_") or "non-EC"
        raise ConfigError(
            f"{source} is an {kind} key, not an EC key: Flower device authentication needs "
            "a NIST EC key (create one with `fedlora keys device`)"
        )
    if not isinstance(key.curve, _NIST_CURVES):
        raise ConfigError(
            f"{source} is an EC key on curve {key.curve.name}, not a NIST curve: create a "
            "P-384 key with `fedlora keys device`"
        )
    return key


def parse_public_key(data: bytes | str, source: str = "public key") -> ec.EllipticCurvePublicKey:
    """An OpenSSH line, a PEM or a DER public key → an EC key on a NIST curve.

    Anything else (malformed, RSA, Ed25519, another curve) is one :class:`ConfigError`
    naming ``source``.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    text = raw.strip()
    key: object
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        elif text[:4] in (b"ssh-", b"ecds") or text.startswith(b"sk-"):
            key = serialization.load_ssh_public_key(text)
        else:
            key = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{source} is not a public key in OpenSSH, PEM or DER format: pass the ID.pub "
            "file `fedlora keys device` wrote"
        ) from None
    return check_nist_ec(key, source)


def load_public_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePublicKey:
    """Read and check a public key file (see :func:`parse_public_key`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read public key {p}: {err.strerror or err}") from None
    return parse_public_key(data, str(p))


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted EC private key (OpenSSH, or PEM PKCS8/SEC1); refuse anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read private key {p}: {err.strerror or err}") from None
    key: object
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{p} is not an unencrypted private key in OpenSSH or PEM format: pass the ID.key "
            "file `fedlora keys device` wrote"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{p} is not an EC private key: create one with `fedlora keys device`")
    check_nist_ec(key.public_key(), str(p))
    return key


def write_key_pair(
    key: ec.EllipticCurvePrivateKey, key_path: Path, pub_path: Path, name: str
) -> None:
    """``key_path`` (OpenSSH private, 0600) and ``pub_path`` (one OpenSSH line, 0644)."""
    write_atomic(key_path, private_key_bytes(key), 0o600)
    line = f"{openssh_public_key(key.public_key())} {name}\n"
    write_atomic(pub_path, line.encode("ascii"), 0o644)


def generate_device_key(
    out_dir: str | os.PathLike[str], device_id: str, *, force: bool = False
) -> tuple[Path, Path]:
    """Write ``out_dir/ID.key`` and ``out_dir/ID.pub`` for a new device; return both paths."""
    check_device_id(device_id)
    out = Path(out_dir)
    key_path, pub_path = out / f"{device_id}.key", out / f"{device_id}.pub"
    refuse_existing([key_path, pub_path], force, f"device {device_id}'s key")
    write_key_pair(generate_key(), key_path, pub_path, device_id)
    return key_path, pub_path
