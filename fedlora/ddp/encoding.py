"""A device's update as the distributed discrete Gaussian's integers mod 2^b, and back.

The encoding of Kairouz, Liu & Steinke (2021, "The distributed discrete Gaussian
mechanism for federated learning with secure aggregation"), as TFF's
``DistributedDpSumFactory`` implements it. A device with a flat float update x:

1. clips x to ‖x‖₂ ≤ C (scaling it down);
2. rotates it (:mod:`fedlora.ddp.rotation`, a seed shared by the round) and scales by
   s/C, so its norm is ≤ s in integer units (the grid step is γ = C/s);
3. rounds every coordinate to ⌊·⌋ or ⌈·⌉ unbiasedly, resampling the whole rounding
   until the integer vector's norm is ≤ Δ₂ (:attr:`DDPParams.l2_sensitivity`; the
   *conditional* rounding of the paper, which with β > 0 bounds Δ₂ ≈ s rather than
   s + √d);
4. adds N_ℤ(0, σ²) per coordinate (:mod:`fedlora.ddp.discrete_gaussian`);
5. reduces mod 2^b: SecAgg+ masks and sums these values.

The coordinator gets Σ mod 2^b, reads it as signed in [−2^(b−1), 2^(b−1)), scales by
C/s, unrotates and divides by the number of survivors (:func:`decode`): the mean of the
clipped updates plus Gaussian-like noise of std σ·√n·C/s / n per coordinate. That is
exact unless a coordinate of the true integer sum left the signed range (wrap-around);
:func:`fedlora.ddp.params.wrap_probability` bounds how likely that is and
:func:`fedlora.ddp.params.choose_params` picks s to keep it negligible.
"""

from __future__ import annotations

import math

import numpy as np

from fedlora.ddp import rotation
from fedlora.ddp.discrete_gaussian import sample_discrete_gaussian
from fedlora.ddp.params import (  # re-exported: the encoding's parameters live beside it
    DDPParams,
    bytes_per_value,
    choose_params,
    wrap_probability,
)
from fedlora.errors import UpdateError
from fedlora.secagg.quantize import UniformSource, stochastic_round

__all__ = [
    "DDPParams",
    "bytes_per_value",
    "choose_params",
    "clip",
    "conditional_round",
    "decode",
    "encode",
    "integer_vector",
    "rounding_error_bound",
    "to_signed",
    "wrap_probability",
]

MAX_ROUNDING_ATTEMPTS = 100
"""Conditional rounding is accepted with probability ≥ 1 − β (≈ 0.39 at the default β),
so 100 rejections in a row (probability < 10⁻²⁰) mean something is wrong, not bad luck."""

_NORM_SLACK = 1e-9
"""Accept a rounding only if its float64 squared norm is ≤ Δ₂²·(1 − this): the float sum of
d squares is off by at most ~d·2⁻⁵³ relatively, so Δ₂ is a hard bound, not a rounded one."""


def clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``clip_norm`` if it is longer (float64 copy)."""
    x = np.array(update, dtype=np.float64, copy=True)
    norm = float(np.linalg.norm(x))
    if norm > clip_norm:
        x *= clip_norm / norm
    return x


def conditional_round(y: np.ndarray, bound: float, source: UniformSource) -> np.ndarray:
    """Unbiased stochastic rounding of ``y``, redrawn until its L2 norm is ≤ ``bound`` (int64)."""
    limit = bound * bound * (1.0 - _NORM_SLACK)
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        rounded = stochastic_round(y, source)
        as_float = rounded.astype(np.float64)
        if float(np.dot(as_float, as_float)) <= limit:
            return rounded
    raise UpdateError(
        f"conditional rounding failed {MAX_ROUNDING_ATTEMPTS} times: a vector of norm "
        f"{float(np.linalg.norm(y)):.6g} does not round within the sensitivity bound "
        f"{bound:.6g} (is the update clipped to the configured norm?)"
    )


def integer_vector(
    update: np.ndarray, params: DDPParams, rotation_seed: int, source: UniformSource
) -> np.ndarray:
    """Steps 1–4 of the module docstring: the device's noisy integers, before mod 2^b (int64)."""
    x = np.asarray(update)
    if x.shape != (params.dimension,):
        raise UpdateError(
            f"a DDP update must be a flat vector of {params.dimension} values, got shape {x.shape}"
        )
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise UpdateError("a DDP update holds NaN or infinite values")
    scaled = rotation.rotate(clip(x, params.clip), rotation_seed, params.block)
    scaled *= params.scale / params.clip
    rounded = conditional_round(scaled, params.l2_sensitivity, source)
    return rounded + sample_discrete_gaussian(params.noise_stddev, rounded.size, source)


def encode(
    update: np.ndarray, params: DDPParams, rotation_seed: int, source: UniformSource
) -> np.ndarray:
    """One device's vector for SecAgg+: :func:`integer_vector` mod 2^b, as uint64 in [0, 2^b)."""
    noisy = integer_vector(update, params, rotation_seed, source)
    return np.mod(noisy, params.modulus).astype(np.uint64)


def to_signed(total: np.ndarray, bits: int) -> np.ndarray:
    """Values mod 2^b as the signed integers in [−2^(b−1), 2^(b−1)) they stand for (int64)."""
    signed = np.asarray(total).astype(np.int64)
    signed[signed >= 1 << (bits - 1)] -= 1 << bits
    return signed


def decode(total: np.ndarray, params: DDPParams, rotation_seed: int, survivors: int) -> np.ndarray:
    """The noisy mean update (float64, length d) from the sum mod 2^b of ``survivors`` vectors."""
    if isinstance(survivors, bool) or not isinstance(survivors, (int, np.integer)) or survivors < 1:
        raise UpdateError(f"a DDP sum needs at least one survivor, got {survivors!r}")
    total = np.asarray(total)
    if total.shape != (params.padded_dimension,):
        raise UpdateError(
            f"a DDP sum has {params.padded_dimension} values, got shape {total.shape}"
        )
    if total.size and (
        not np.issubdtype(total.dtype, np.integer)
        or int(total.min()) < 0
        or int(total.max()) >= params.modulus
    ):
        raise UpdateError(f"a DDP sum must hold integers in [0, 2^{params.bits})")
    summed = to_signed(total, params.bits).astype(np.float64) * (params.clip / params.scale)
    return rotation.unrotate(summed, rotation_seed, params.dimension, params.block) / survivors


def rounding_error_bound(params: DDPParams) -> float:
    """A hard bound on ‖decode(Σ, noise off) − mean of the clipped updates‖₂, any n.

    Each device's rounding moves every one of the d_pad rotated coordinates by less than
    one grid step, so its error has norm < √d_pad·C/s; rotations preserve norms, cutting
    the padding can only shorten a vector, and the mean of n errors is no longer than
    the longest.
    """
    return math.sqrt(params.padded_dimension) * params.clip / params.scale
