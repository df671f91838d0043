"""SecAgg+ masks: ChaCha20 keystreams keyed by HKDF of the full secret.

A device adds to its quantized update one *self mask* (from its 256-bit seed, whose
Shamir shares its neighbours hold) and, per neighbour j, one *pairwise mask* (from the
ECDH secret of the two devices' first key pairs), added by the larger node id and
subtracted by the smaller, so pairwise masks cancel in the sum. Every mask is a vector
of values uniform in [0, 2^b) for the modulus 2^b:

    key   = HKDF-SHA256(ikm = secret, salt = none, info = DOMAIN ‖ purpose ‖ round)  (256 bits)
    nonce = 0⁴ (ChaCha20 block counter) ‖ purpose (1 byte) ‖ 0³ ‖ round (8 bytes, LE)
    mask  = little-endian uint32 words of ChaCha20(key, nonce) applied to zeros, & (2^b − 1)

``secret`` is the whole secret: the 48-byte raw ECDH output of P-384 (Flower's curve)
for pairwise masks, the 32-byte seed for self masks. Purpose and round enter both the
key and the nonce: two masks for different rounds or purposes never share a keystream,
even if a device were to reuse a key pair or seed. Taking the low b bits of a uniform
32-bit word is uniform for any b ≤ 32 (2^b divides 2^32).

Flower 1.39's ``pseudo_rand_gen`` XOR-folds the secret to 32 bits and seeds
``np.random.RandomState`` with it: 2³² possible masks (flower issue #7522), and its
``randint(0, 2^b − 1)`` never draws 2^b − 1.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlora.errors import UpdateError
from fedlora.secagg import shares

DOMAIN = b"fedlora/secagg/v1/mask/"
"""HKDF ``info`` prefix: keys for masks are never keys for anything else."""

KEY_BYTES = 32
MIN_SECRET_BYTES = 32
"""A mask's secret must carry at least 256 bits (a seed, or an ECDH secret)."""

MAX_MODULUS_BITS = 32

Shape = tuple[int, ...]


class Purpose(enum.IntEnum):
    """What a mask is for; part of its key and its nonce."""

    PAIRWISE = 1
    SELF = 2


def modulus_bits(mod_range: int) -> int:
    """b for a modulus 2^b (1 ≤ b ≤ 32); anything else is refused."""
    if (
        isinstance(mod_range, bool)
        or not isinstance(mod_range, int)
        or mod_range < 2
        or mod_range & (mod_range - 1)
        or mod_range.bit_length() - 1 > MAX_MODULUS_BITS
    ):
        raise UpdateError(f"the SecAgg+ modulus must be 2^b with 1 <= b <= 32, got {mod_range!r}")
    return mod_range.bit_length() - 1


def _check_round(server_round: int) -> int:
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise UpdateError(f"a mask's round must be an int >= 0, got {server_round!r}")
    return server_round


def mask_key(secret: bytes, purpose: Purpose, server_round: int) -> bytes:
    """The 256-bit ChaCha20 key of one mask: HKDF-SHA256 of the whole ``secret``."""
    if len(secret) < MIN_SECRET_BYTES:
        raise UpdateError(
            f"a mask secret needs at least {MIN_SECRET_BYTES} bytes, got {len(secret)}"
        )
    info = (
        DOMAIN
        + purpose.name.lower().encode()
        + b"/"
        + _check_round(server_round).to_bytes(8, "big")
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def mask_nonce(purpose: Purpose, server_round: int) -> bytes:
    """``cryptography``'s 16-byte ChaCha20 nonce: counter 0, then purpose and round."""
    return (
        bytes(4)
        + bytes([int(purpose)])
        + bytes(3)
        + _check_round(server_round).to_bytes(8, "little")
    )


def keystream(key: bytes, nonce: bytes, nbytes: int) -> bytes:
    """``nbytes`` of ChaCha20 keystream (the encryption of zeros)."""
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


def mask(
    secret: bytes, purpose: Purpose, server_round: int, shapes: Sequence[Shape], mod_range: int
) -> list[np.ndarray]:
    """One mask, as uint64 arrays of ``shapes`` with values uniform in [0, mod_range)."""
    bits = modulus_bits(mod_range)
    sizes = [math.prod(s) for s in shapes]
    stream = keystream(
        mask_key(secret, purpose, server_round), mask_nonce(purpose, server_round), 4 * sum(sizes)
    )
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint64)
    if bits < MAX_MODULUS_BITS:
        words &= np.uint64(mod_range - 1)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(words[start : start + size].reshape(shape))
        start += size
    return out


def pairwise_secret(private_key: shares.PrivateKey, public_key_pem: bytes) -> bytes:
    """The raw ECDH secret of a device's first private key (PEM, as Flower serializes it,
    or the 48-byte scalar the coordinator rebuilds from shares) and a neighbour's first
    public key (PEM): 48 bytes on P-384, the same from either side."""
    return shares.ecdh(private_key, public_key_pem)


def add(a: list[np.ndarray], b: list[np.ndarray], mod_range: int) -> list[np.ndarray]:
    """``a + b`` mod ``mod_range`` (uint64, element by element)."""
    m = np.uint64(mod_range - 1)
    return [(x + y) & m for x, y in zip(a, b, strict=True)]


def subtract(a: list[np.ndarray], b: list[np.ndarray], mod_range: int) -> list[np.ndarray]:
    """``a − b`` mod ``mod_range`` (uint64 wraps mod 2⁶⁴, a multiple of the modulus)."""
    m = np.uint64(mod_range - 1)
    return [(x - y) & m for x, y in zip(a, b, strict=True)]
