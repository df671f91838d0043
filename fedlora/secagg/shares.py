"""What a device sends its neighbours at key sharing: compact, authenticated shares.

Flower 1.39 Shamir-shares the PEM encoding of the device's first private key (about
300 bytes, so about 320 bytes a share) and encrypts each neighbour's shares with Fernet
(AES-128-CBC + HMAC, base64: about 590 bytes a neighbour). fedlora shares the key's raw
48-byte P-384 scalar instead (the coordinator rebuilds the key from it,
:func:`private_key`) and seals the shares with ChaCha20-Poly1305 under a 256-bit key
derived by HKDF-SHA256 from the raw ECDH secret of the two devices' second key pairs,
domain-separated from the mask keys, with the round, sender and receiver as associated
data: about 170 bytes a neighbour, which keeps the round's uplink near the fp32 update.
The plaintext layout is Flower's (``share_keys_plaintext_concat``).
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlora.errors import UpdateError

DOMAIN = b"fedlora/secagg/v1/share-encryption/"
NONCE_BYTES = 12
SCALAR_BYTES = 48
"""A P-384 private scalar."""


def private_scalar(private_key_pem: bytes) -> bytes:
    """The 48-byte big-endian private scalar of a PEM-encoded P-384 key (Flower's format)."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise UpdateError("SecAgg+ key pairs must be P-384 (Flower's curve)")
    return key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


PrivateKey = bytes | ec.EllipticCurvePrivateKey
"""A private key as Flower keeps it (PEM), as the coordinator rebuilds it (48-byte
scalar), or already parsed: a caller that uses one key with many neighbours parses it
once (:func:`private_key`), not once a neighbour."""


def private_key(secret: PrivateKey) -> ec.EllipticCurvePrivateKey:
    """A P-384 private key from its PEM encoding or its 48-byte scalar (a parsed key as is)."""
    if isinstance(secret, ec.EllipticCurvePrivateKey):
        return secret
    if secret.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(secret, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UpdateError("SecAgg+ key pairs must be elliptic-curve keys")
        return key
    if len(secret) != SCALAR_BYTES:
        raise UpdateError(f"a P-384 private scalar is {SCALAR_BYTES} bytes, got {len(secret)}")
    return ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP384R1())


def public_key(public_key_pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UpdateError("SecAgg+ key pairs must be elliptic-curve keys")
    return key


def ecdh(private: PrivateKey, public_key_pem: bytes) -> bytes:
    """The raw ECDH secret (48 bytes on P-384) of a private key (PEM or scalar) and a
    public key (PEM); the same from either side."""
    return private_key(private).exchange(ec.ECDH(), public_key(public_key_pem))


def _aad(server_round: int, src: int, dst: int) -> bytes:
    return DOMAIN + b"".join(v.to_bytes(8, "big") for v in (server_round, src, dst))


def channel_key(private_key_pem: PrivateKey, public_key_pem: bytes) -> bytes:
    """The 256-bit key two devices seal shares with (HKDF of their second pair's ECDH)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN).derive(
        ecdh(private_key_pem, public_key_pem)
    )


def seal(key: bytes, plaintext: bytes, server_round: int, src: int, dst: int) -> bytes:
    """nonce ‖ ChaCha20-Poly1305(plaintext), bound to (round, sender, receiver)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(server_round, src, dst))


def open_sealed(key: bytes, blob: bytes, server_round: int, src: int, dst: int) -> bytes:
    """The plaintext of :func:`seal`, or :class:`UpdateError` if it was altered or misrouted."""
    from cryptography.exceptions import InvalidTag

    try:
        return ChaCha20Poly1305(key).decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(server_round, src, dst)
        )
    except InvalidTag:
        raise UpdateError(
            f"a key share from node {src} to node {dst} does not authenticate for round "
            f"{server_round}: altered, replayed or misrouted"
        ) from None
