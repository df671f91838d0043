"""Masked vectors on the wire: little-endian unsigned integers at the modulus' width.

Values mod 2^b travel as uint8 (b ≤ 8), uint16 (b ≤ 16) or uint32 (b ≤ 32), one
``bytes`` per array in Flower's ``masked_parameters`` list, with no header: the
coordinator knows every array's shape (the weight, then the adapter's tensors), so a
payload whose array count or byte length differs, or that holds a value ≥ 2^b, is
refused. For the default modulus 2³² that is 4 bytes a value, the size of the fp32
update (Flower 1.39 sends int64 ``.npy`` arrays: 8 bytes a value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedlora.errors import UpdateError
from fedlora.secagg.masks import Shape, modulus_bits


def wire_dtype(mod_range: int) -> np.dtype:
    """The narrowest little-endian unsigned dtype that holds every value mod ``mod_range``."""
    bits = modulus_bits(mod_range)
    for dtype in ("<u1", "<u2", "<u4"):
        if bits <= 8 * np.dtype(dtype).itemsize:
            return np.dtype(dtype)
    raise UpdateError(f"no wire dtype for a {bits}-bit modulus")  # pragma: no cover


def pack(vector: Sequence[np.ndarray], mod_range: int) -> list[bytes]:
    """One ``bytes`` per array; every value must already be reduced mod ``mod_range``."""
    dtype = wire_dtype(mod_range)
    out = []
    for arr in vector:
        if arr.size and int(arr.max()) >= mod_range:
            raise UpdateError(f"a masked value {int(arr.max())} is not reduced mod {mod_range}")
        out.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return out


def unpack(blobs: Sequence[bytes], shapes: Sequence[Shape], mod_range: int) -> list[np.ndarray]:
    """The arrays of ``shapes`` (uint64) from :func:`pack`'s output, or :class:`UpdateError`."""
    dtype = wire_dtype(mod_range)
    if len(blobs) != len(shapes):
        raise UpdateError(f"the masked vector has {len(blobs)} arrays, expected {len(shapes)}")
    out = []
    for i, (blob, shape) in enumerate(zip(blobs, shapes, strict=True)):
        want = math.prod(shape) * dtype.itemsize
        if not isinstance(blob, bytes) or len(blob) != want:
            got = len(blob) if isinstance(blob, bytes) else type(blob).__name__
            raise UpdateError(
                f"masked array {i} is {got} bytes, expected {want} "
                f"({math.prod(shape)} values of {dtype.itemsize} bytes)"
            )
        arr = np.frombuffer(blob, dtype=dtype).astype(np.uint64).reshape(shape)
        if arr.size and int(arr.max()) >= mod_range:
            raise UpdateError(f"masked array {i} holds a value >= the modulus {mod_range}")
        out.append(arr)
    return out
