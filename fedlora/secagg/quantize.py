"""From a weighted float update to SecAgg+'s integers, and from their sum back to the mean.

The arithmetic is Flower 1.39's (``secaggplus_mod`` / ``SecAggPlusWorkflow``), so the
vector layout is unchanged: ``[[w], q_1, …, q_m]`` where ``w = round(n / max_weight · T)``
for a device with ``n`` examples and ``T`` = ``quantization_range`` levels, and
``q_i`` the update scaled by ``w / T``, clipped to ±clipping_range and stochastically
rounded onto ``T`` levels. The sum over the devices in it, decoded, is their mean
weighted by ``w`` (≈ by ``n``), within one level per device over Σ w / T.

What changes is where stochastic rounding's randomness comes from: an injected
:class:`UniformSource` (the device's OS CSPRNG, or a generator seeded per device and
round under ``privacy.reproducible_noise``), not numpy's global RNG. And a weight above
``max_weight`` is refused (Flower logs a warning and overflows the sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fedlora.errors import UpdateError


class UniformSource(Protocol):
    """Where stochastic rounding draws from (``fedlora.privacy.noise`` sources fit)."""

    def uniform(self, n: int) -> np.ndarray: ...


def stochastic_round(x: np.ndarray, source: UniformSource) -> np.ndarray:
    """⌊x⌋ + 1 with probability x − ⌊x⌋, else ⌊x⌋ (unbiased), as int64."""
    x = np.asarray(x, dtype=np.float64)
    low = np.floor(x)
    up = source.uniform(x.size).reshape(x.shape) < (x - low)
    return (low + up).astype(np.int64)


def weight_of(num_examples: int, max_weight: float, target_range: int) -> int:
    """The integer weight a device's vector carries: round(n / max_weight · T)."""
    ratio = num_examples / max_weight
    if not 0 <= ratio <= 1:
        raise UpdateError(
            f"a SecAgg+ weight must be in [0, max_weight={max_weight:g}], got {num_examples}: "
            "a larger one would overflow the masked sum"
        )
    return round(ratio * target_range)


def encode(
    update: Sequence[np.ndarray],
    num_examples: int,
    *,
    max_weight: float,
    clipping_range: float,
    target_range: int,
    source: UniformSource,
) -> list[np.ndarray]:
    """``[[w], q_1, …]`` (uint64) for one device's update; every value in [0, T]."""
    w = weight_of(num_examples, max_weight, target_range)
    scale = w / target_range
    levels = target_range / (2 * clipping_range)
    out = [np.array([w], dtype=np.uint64)]
    for arr in update:
        scaled = np.asarray(arr, dtype=np.float64) * scale
        pre = (np.clip(scaled, -clipping_range, clipping_range) + clipping_range) * levels
        out.append(stochastic_round(pre, source).astype(np.uint64))
    return out


def decode(
    total: Sequence[np.ndarray], count: int, *, clipping_range: float, target_range: int
) -> list[np.ndarray]:
    """The weighted mean (float64) from the unmasked sum of ``count`` devices' vectors."""
    weight = int(total[0].reshape(-1)[0])
    if count < 1 or weight <= 0:
        raise UpdateError(
            f"a SecAgg+ sum of {count} vector(s) with total weight {weight} has no mean"
        )
    step = 2 * clipping_range / target_range
    return [
        (arr.astype(np.float64) * step - count * clipping_range) * (target_range / weight)
        for arr in total[1:]
    ]


def fits(count: int, target_range: int, mod_range: int) -> bool:
    """Whether ``count`` vectors of values ≤ T sum below the modulus (no wrap-around)."""
    return count * target_range < mod_range
