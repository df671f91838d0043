"""Signed calls: how a device (or the operator) proves who it is to fedlora's gRPC services.

Every call carries four metadata entries: the caller's id, a Unix timestamp, a
fresh random nonce, and an ECDSA (SHA-256) signature with the caller's key over
``method|device-id|timestamp|nonce``, where method is the full gRPC name
(``/fedlora.v1.ModelService/ListModels``). Binding the method stops a signature
for one RPC being replayed against another; the timestamp bounds how long a
captured one is good for; the nonce makes each signed call good for one call
only: the coordinator remembers every (caller, nonce) it accepted for as long
as the timestamp would still be accepted, and refuses a second use (see
``fedlora.server.service.auth``). TLS keeps calls from being captured at all; the nonce
covers a call that is captured anyway (a TLS-terminating proxy, a log of
metadata). The key is the one the device already uses for Flower's SuperNode
authentication, so a device has one secret, not two.
"""

from __future__ import annotations

import re
import secrets
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

OPERATOR_ID = "operator"
"""The identity operator-only calls are signed as; no device may be registered under it."""

METADATA_DEVICE = "fedlora-device-id"
METADATA_TIMESTAMP = "fedlora-timestamp"
METADATA_NONCE = "fedlora-nonce"
METADATA_SIGNATURE = "fedlora-signature-bin"  # "-bin": gRPC carries it as raw bytes
MAX_CLOCK_SKEW_S = 300
"""A signed call whose timestamp is further than this from the coordinator's clock is refused."""

NONCE_BYTES = 16
"""A fresh nonce is this many random bytes (128 bits), sent as lowercase hex."""
_NONCE = re.compile(r"[0-9a-f]{32,64}")


def new_nonce() -> str:
    """A fresh nonce from the OS's CSPRNG: 32 lowercase hex digits."""
    return secrets.token_hex(NONCE_BYTES)


def valid_nonce(nonce: object) -> bool:
    """Whether ``nonce`` has a nonce's form: 128 to 256 bits as lowercase hex."""
    return isinstance(nonce, str) and _NONCE.fullmatch(nonce) is not None


def call_payload(method: str, device_id: str, timestamp: int, nonce: str) -> bytes:
    """What a call's signature covers: ``method|device-id|timestamp|nonce``."""
    return f"{method}|{device_id}|{timestamp}|{nonce}".encode()


def sign_call(
    key: ec.EllipticCurvePrivateKey,
    method: str,
    device_id: str,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> tuple[tuple[str, str | bytes], ...]:
    """The gRPC metadata that authenticates one call to ``method`` (full name,
    ``/fedlora.v1.ModelService/ListModels``) as ``device_id``.

    Call it once per call: the metadata carries a fresh nonce, and the coordinator
    accepts each nonce once. ``timestamp`` and ``nonce`` are for tests.
    """
    ts = int(time.time()) if timestamp is None else timestamp
    n = new_nonce() if nonce is None else nonce
    signature = key.sign(call_payload(method, device_id, ts, n), ec.ECDSA(hashes.SHA256()))
    return (
        (METADATA_DEVICE, device_id),
        (METADATA_TIMESTAMP, str(ts)),
        (METADATA_NONCE, n),
        (METADATA_SIGNATURE, signature),
    )


def verify_call(
    key: ec.EllipticCurvePublicKey,
    method: str,
    device_id: str,
    timestamp: int,
    nonce: str,
    signature: bytes,
) -> bool:
    """Whether ``signature`` is ``key``'s over this call's payload."""
    try:
        key.verify(
            signature, call_payload(method, device_id, timestamp, nonce), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        return False
    return True
