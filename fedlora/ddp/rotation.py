"""The randomized Walsh–Hadamard rotation of distributed DP, in blocks.

Before a device rounds its clipped update onto the integer grid, it rotates it: a
random rotation spreads the update's norm evenly over the coordinates (Kairouz et al.
2021, "The distributed discrete Gaussian mechanism"), so no single coordinate of the
modular sum is likely to wrap around, and the rounding error is spread too. The
rotation is ``H·D`` per block: ``D`` multiplies by random signs ±1, ``H`` is the
orthonormal Walsh–Hadamard transform (entries ±1/√B). Every device of a round uses the
same signs (a public seed), so the coordinator undoes the rotation on the *sum*.

Blocks, not one transform over the next power of two: a flat vector of length d is
split into blocks of ``block`` values; the rest is rounded up to a multiple of
:data:`MIN_TAIL_BLOCK` and split into the powers of two of its binary form (768 = 512 +
256), so at most 255 values are padding. Padded values travel on the wire (2 bytes each
at b = 16), so the overhead is what matters: one transform of an adapter of d = 86,784
values would pad to 2¹⁷ (+51 %); these blocks take it as it is (21 · 4096 + 512 + 256),
and the embedded default adapter (d = 39,040) pads to 39,168 (+0.33 %).

Why :data:`DEFAULT_BLOCK` = 2¹²: after the rotation a coordinate of block B is
sub-Gaussian with variance proxy ‖x‖²/B (Hoeffding over the signs), so larger blocks
flatten better; 4096 values already bring a clipped update's per-coordinate spread to
1/64 of its norm, below the DP noise of any useful ε. :data:`MIN_TAIL_BLOCK` = 256 keeps
a short tail from becoming the coordinate that wraps (the wrap bound takes the smallest
block's proxy, 16× a full block's) at a cost of at most 255 padded values.

numpy only: the transform is the iterative butterfly, O(B log B) per block, all blocks
of one size at once. The signs are ChaCha20 keystream bits of a domain-separated hash
of the seed (:class:`fedlora.privacy.noise.SeededRandom`), the same on every platform.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from fedlora.errors import ConfigError
from fedlora.privacy.noise import SeededRandom

DEFAULT_BLOCK = 1 << 12
"""The size of every block but the last (see the module docstring)."""

MIN_TAIL_BLOCK = 256
"""The smallest the last block is padded to (unless ``block`` itself is smaller)."""

MAX_BLOCK = 1 << 24

_SIGN_DOMAIN = b"fedlora.ddp.rotation.signs.v1\x00"


def check_block(block: int) -> int:
    """``block`` if it is a power of two in [2, 2²⁴], else :class:`ConfigError`."""
    if (
        isinstance(block, bool)
        or not isinstance(block, (int, np.integer))
        or not 2 <= block <= MAX_BLOCK
        or block & (block - 1)
    ):
        raise ConfigError(f"a rotation block must be a power of two in [2, 2^24], got {block!r}")
    return int(block)


def _check_dimension(dimension: int) -> int:
    if isinstance(dimension, bool) or not isinstance(dimension, (int, np.integer)) or dimension < 1:
        raise ConfigError(f"a rotated vector's dimension must be an int >= 1, got {dimension!r}")
    return int(dimension)


def block_sizes(dimension: int, block: int = DEFAULT_BLOCK) -> tuple[int, ...]:
    """The sizes of the blocks a vector of ``dimension`` values is rotated in, in order."""
    dimension, block = _check_dimension(dimension), check_block(block)
    full, rest = divmod(dimension, block)
    if rest == 0:
        return (block,) * full
    # The rest, rounded up to a whole number of MIN_TAIL_BLOCKs (at most one block), in
    # the powers of two its binary form names, largest first: 768 = 512 + 256, no padding.
    smallest = min(MIN_TAIL_BLOCK, block)
    tail = min(block, -(-rest // smallest) * smallest)
    parts = tuple(1 << i for i in range(tail.bit_length() - 1, -1, -1) if tail >> i & 1)
    return (block,) * full + parts


def padded_dimension(dimension: int, block: int = DEFAULT_BLOCK) -> int:
    """How many values a rotated vector of ``dimension`` values has (what goes on the wire)."""
    return sum(block_sizes(dimension, block))


def smallest_block(dimension: int, block: int = DEFAULT_BLOCK) -> int:
    """The size of the smallest block: the worst coordinate's spread is ‖x‖²/this."""
    return min(block_sizes(dimension, block))


def signs(seed: int, size: int) -> np.ndarray:
    """``size`` float64 signs ±1 from ``seed``: the same for every device and the coordinator."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"a rotation seed must be an int >= 0, got {seed!r}")
    seed_bytes = int(seed).to_bytes((int(seed).bit_length() + 7) // 8 or 1, "big")
    key = int.from_bytes(hashlib.sha256(_SIGN_DOMAIN + seed_bytes).digest(), "big")
    raw = SeededRandom(key).random_bytes((size + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:size]
    return 1.0 - 2.0 * bits.astype(np.float64)


def fwht(blocks: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh–Hadamard transform (H/√B) of each row of ``blocks`` (m × B).

    H/√B is symmetric and orthogonal, so it is its own inverse.
    """
    out = np.array(blocks, dtype=np.float64, copy=True)
    rows, size = out.shape
    half = 1
    while half < size:
        view = out.reshape(rows, size // (2 * half), 2, half)
        left = view[:, :, 0, :].copy()
        right = view[:, :, 1, :]
        view[:, :, 0, :] += right
        view[:, :, 1, :] = left - right
        half *= 2
    out /= math.sqrt(size)
    return out


def _transform_blocks(x: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """:func:`fwht` over consecutive blocks of ``sizes``, each run of equal sizes at once."""
    out = np.empty_like(x)
    at = 0
    for size in dict.fromkeys(sizes):  # distinct sizes, in order (runs are contiguous)
        n = sizes.count(size) * size
        out[at : at + n] = fwht(x[at : at + n].reshape(-1, size)).reshape(-1)
        at += n
    return out


def rotate(x: np.ndarray, seed: int, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """``x`` (flat, length d) zero-padded to :func:`padded_dimension` and rotated: H·D·x."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ConfigError(f"rotate takes a flat vector, got shape {x.shape}")
    sizes = block_sizes(x.size, block)
    padded = np.zeros(sum(sizes))
    padded[: x.size] = x
    return _transform_blocks(padded * signs(seed, padded.size), sizes)


def unrotate(y: np.ndarray, seed: int, dimension: int, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """The inverse of :func:`rotate`: D·H·y, cut to the first ``dimension`` values."""
    y = np.asarray(y, dtype=np.float64)
    sizes = block_sizes(dimension, block)
    if y.shape != (sum(sizes),):
        raise ConfigError(
            f"a rotated vector of dimension {dimension} has {sum(sizes)} values, got {y.shape}"
        )
    return (_transform_blocks(y, sizes) * signs(seed, y.size))[:dimension]
