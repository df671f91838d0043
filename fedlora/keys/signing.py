"""Signed calls: how a device (or the operator) proves who it is to fedlora's gRPC services.

Every call carries three metadata entries: the caller's id, a Unix timestamp,
and an ECDSA (SHA-256) signature with the caller's key over
``method|device-id|timestamp``, where method is the full gRPC name
(``/fedlora.v1.ModelService/ListModels``). Binding the method stops a signature
for one RPC being replayed against another; the timestamp bounds how long a
captured one is good for (TLS keeps them from being captured at all). The key is
the one the device already uses for Flower's SuperNode authentication, so a
device has one secret, not two.
"""

from __future__ import annotations

import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

OPERATOR_ID = "operator"
"""The identity operator-only calls are signed as; no device may be registered under it."""

METADATA_DEVICE = "fedlora-device-id"
METADATA_TIMESTAMP = "fedlora-timestamp"
METADATA_SIGNATURE = "fedlora-signature-bin"  # "-bin": gRPC carries it as raw bytes
MAX_CLOCK_SKEW_S = 300
"""A signed call whose timestamp is further than this from the coordinator's clock is refused."""


def call_payload(method: str, device_id: str, timestamp: int) -> bytes:
    """What a call's signature covers: ``method|device-id|timestamp``."""
    return f"{method}|{device_id}|{timestamp}".encode()


def sign_call(
    key: ec.EllipticCurvePrivateKey, method: str, device_id: str, timestamp: int | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    """The gRPC metadata that authenticates one call to ``method`` (full name,
    ``/fedlora.v1.ModelService/ListModels``) as ``device_id``."""
    ts = int(time.time()) if timestamp is None else timestamp
    signature = key.sign(call_payload(method, device_id, ts), ec.ECDSA(hashes.SHA256()))
    return (
        (METADATA_DEVICE, device_id),
        (METADATA_TIMESTAMP, str(ts)),
        (METADATA_SIGNATURE, signature),
    )


def verify_call(
    key: ec.EllipticCurvePublicKey, method: str, device_id: str, timestamp: int, signature: bytes
) -> bool:
    """Whether ``signature`` is ``key``'s over this call's payload."""
    try:
        key.verify(signature, call_payload(method, device_id, timestamp), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
