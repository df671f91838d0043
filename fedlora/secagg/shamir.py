"""Shamir sharing of SecAgg+ secrets, fast, in Flower's format: split on a device,
rebuilt at unmasking.

Flower 1.39 shares a secret with PyCryptodome's ``Shamir`` over GF(2^128): the secret,
padded to 16-byte chunks, each chunk shared on its own; a share is a 4-byte
little-endian index followed by the chunks' shares. Flower's ``combine_shares`` hands
PyCryptodome *every* share the coordinator received (PyCryptodome asks for exactly the
threshold), and PyCryptodome multiplies bit by bit through string operations: at 100
devices a round's unmasking spent 12 s of the coordinator's single thread there while
every device waited (py-spy, 2026-12-02).

:func:`combine_shares` returns the same secret from the same shares (tested against
Flower's): Lagrange interpolation at 0 of the ``threshold`` shares with the lowest
indices, the secret being Σ λ_i · y_i. The coefficients λ_i depend only on the indices,
which are public and the same for most devices of a round, so they are computed once per
index set (one batched inversion) and cached; each secret then costs ``threshold``
multiplications per chunk. Multiplication loops over the bits of the public λ and
reduces without branching on the secret share.

:func:`create_shares` is the device's side, Flower's ``create_shares`` in its format
(PyCryptodome's ``Shamir.split`` per chunk: a random polynomial of degree threshold − 1
with the chunk as its constant term, evaluated at 1..num by Horner's rule). Through
PyCryptodome that cost a device 73 ms of its key-sharing message at 100 devices (35
shares, threshold 18, 7 chunks: 4,000 field multiplications), 3.6 s of every round on
two workers; here each multiplication is by a public index of a few bits. The
coefficients come from the OS CSPRNG (``secrets``), as PyCryptodome draws them.
"""

from __future__ import annotations

import functools
import secrets

from fedlora.errors import UpdateError

_IRREDUCIBLE = (1 << 128) | 0x87
"""x^128 + x^7 + x^2 + x + 1, PyCryptodome's (and GCM's) field polynomial."""

_CHUNK = 16
_INDEX_BYTES = 4


def _mul(value: int, public: int) -> int:
    """``value`` · ``public`` in GF(2^128) (bit i of an int is the coefficient of x^i)."""
    out = 0
    while public:
        if public & 1:
            out ^= value
        public >>= 1
        value <<= 1
        value ^= _IRREDUCIBLE & -(value >> 128)  # reduce when x^128 appears
    return out


def _inverse(value: int) -> int:
    """value^(2^128 - 2), the inverse of a non-zero element."""
    if value == 0:
        raise ZeroDivisionError("zero has no inverse in GF(2^128)")
    result, square, exponent = 1, value, (1 << 128) - 2
    while exponent:
        if exponent & 1:
            result = _mul(result, square)
        square = _mul(square, square)
        exponent >>= 1
    return result


@functools.lru_cache(maxsize=256)
def lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """λ_i = Π_{m≠i} x_m / (x_i + x_m): the secret is Σ λ_i · p(x_i) (addition is XOR)."""
    if len(set(indices)) != len(indices) or any(x <= 0 for x in indices):
        raise UpdateError(f"Shamir share indices must be distinct and positive, got {indices}")
    numerators, denominators = [], []
    for i, x_i in enumerate(indices):
        num = den = 1
        for m, x_m in enumerate(indices):
            if m != i:
                num = _mul(num, x_m)
                den = _mul(den, x_i ^ x_m)
        numerators.append(num)
        denominators.append(den)
    # One inversion for all denominators (Montgomery's trick).
    prefix = [1]
    for den in denominators:
        prefix.append(_mul(prefix[-1], den))
    inv = _inverse(prefix[-1])
    inverses = [0] * len(denominators)
    for i in range(len(denominators) - 1, -1, -1):
        inverses[i] = _mul(inv, prefix[i])
        inv = _mul(inv, denominators[i])
    return tuple(_mul(n, d) for n, d in zip(numerators, inverses, strict=True))


def _unpad(padded: bytes) -> bytes:
    """PKCS#7 padding to 16 bytes removed, as Flower's ``unpad`` checks it."""
    pad = padded[-1] if padded else 0
    if not 1 <= pad <= _CHUNK or padded[-pad:] != bytes([pad]) * pad:
        raise UpdateError("the Shamir shares do not combine to a secret (bad padding)")
    return padded[:-pad]


def combine_shares(shares: list[bytes], threshold: int) -> bytes:
    """The secret behind ``shares`` (Flower's format), from ``threshold`` of them.

    Raises :class:`UpdateError` for fewer than ``threshold`` distinct shares, shares of
    unequal length, or shares that do not combine to a padded secret.
    """
    by_index: dict[int, bytes] = {}
    for share in shares:
        if len(share) < _INDEX_BYTES + _CHUNK or (len(share) - _INDEX_BYTES) % _CHUNK:
            raise UpdateError(f"a Shamir share is 4 + 16·k bytes, got {len(share)}")
        by_index.setdefault(int.from_bytes(share[:_INDEX_BYTES], "little"), share)
    if len(by_index) < threshold or threshold < 1:
        raise UpdateError(f"{len(by_index)} distinct share(s), need {threshold} to rebuild")
    indices = tuple(sorted(by_index)[:threshold])
    chosen = [by_index[x] for x in indices]
    size = len(chosen[0])
    if any(len(s) != size for s in chosen):
        raise UpdateError("Shamir shares of one secret must have the same length")
    lambdas = lagrange_at_zero(indices)
    out = bytearray()
    for start in range(_INDEX_BYTES, size, _CHUNK):
        value = 0
        for share, lam in zip(chosen, lambdas, strict=True):
            value ^= _mul(int.from_bytes(share[start : start + _CHUNK], "big"), lam)
        out += value.to_bytes(_CHUNK, "big")
    return _unpad(bytes(out))


def _pad(secret: bytes) -> bytes:
    """PKCS#7 padding to a multiple of 16 bytes, as Flower pads before sharing."""
    pad = _CHUNK - len(secret) % _CHUNK
    return secret + bytes([pad]) * pad


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``, any ``threshold`` of which rebuild it (Flower's format:
    a 4-byte little-endian index 1..num, then one 16-byte share per padded chunk)."""
    if not 1 <= threshold <= num or num >= 1 << (8 * _INDEX_BYTES):
        raise UpdateError(f"Shamir sharing needs 1 <= threshold <= num, got {threshold}, {num}")
    padded = _pad(secret)
    parts = [bytearray(x.to_bytes(_INDEX_BYTES, "little")) for x in range(1, num + 1)]
    for start in range(0, len(padded), _CHUNK):
        # Highest degree first, the chunk last: p(x) = (..(c_{t-1}·x + c_{t-2})·x ..)·x + chunk
        coeffs = [int.from_bytes(secrets.token_bytes(_CHUNK), "big") for _ in range(threshold - 1)]
        coeffs.append(int.from_bytes(padded[start : start + _CHUNK], "big"))
        for x, part in zip(range(1, num + 1), parts, strict=True):
            value = 0
            for c in coeffs:
                value = _mul(value, x) ^ c
            part += value.to_bytes(_CHUNK, "big")
    return [bytes(p) for p in parts]
