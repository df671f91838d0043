"""The parameters of the distributed discrete Gaussian encoding, and how to choose them.

:class:`DDPParams` holds what every device and the coordinator of a round must agree
on (clip norm C, modulus 2^b, scale s, per-device σ, dimension, rotation block, β).
:func:`wrap_probability` bounds the chance that the modular sum wraps around, and
:func:`choose_params` picks the finest grid (largest s) that keeps it below a bound,
with σ from the caller's calibration (``sigma_for``, e.g. the exact one of
``fedlora.privacy``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedlora.ddp import rotation
from fedlora.errors import ConfigError
from fedlora.secagg.packing import wire_dtype

DEFAULT_BETA = math.exp(-0.5)
"""Conditional rounding's β, TFF's default: Δ₂² ≤ s² + d/4 + √(2 ln(1/β))·(s + √d/2) with
√(2 ln(1/β)) = 1, and a rounding is accepted with probability ≥ 1 − β ≈ 0.39."""

DEFAULT_WRAP_BOUND = 1e-9
"""What :func:`choose_params` allows :func:`wrap_probability` to be, per round.

A wrapped coordinate is off by 2^b grid steps, which at b = 16 is tens of clip norms:
it ruins the round's aggregate, and after secure aggregation nobody can tell which
device's value it was. 10⁻⁹ a round keeps it below 10⁻⁵ over 10⁴ rounds, and it costs
little: the bound enters s only through √ln(2·d_pad/bound), so 10⁻⁶ would buy a scale
(and accuracy) about 12 % larger at d ≈ 87,000, 10⁻¹² costs about 9 %. The bound is a
union of sub-Gaussian tails, itself loose, so the true rate is far lower."""

MIN_BITS, MAX_BITS = 2, 32


def l2_sensitivity(scale: float, padded_dimension: int, beta: float) -> float:
    """The L2 norm bound Δ₂ of one device's rounded vector (Kairouz et al. 2021, Thm 1).

    min(s + √d, √(s² + d/4 + √(2 ln(1/β))·(s + √d/2))) with d the padded dimension; for
    β = 0 (plain rounding) only the first, which holds for any rounding.
    """
    root = math.sqrt(padded_dimension)
    plain = scale + root
    if beta == 0:
        return plain
    slack = math.sqrt(2 * math.log(1 / beta)) * (scale + root / 2)
    return min(plain, math.sqrt(scale * scale + padded_dimension / 4 + slack))


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"DDP {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"DDP {name} must be finite, got {value!r}")
    return float(value)


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"DDP {name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"DDP {name} must be {where}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DDPParams:
    """What the devices and the coordinator of a DDP round share; checked when made.

    ``scale`` s is the clip norm in integer units (grid step γ = C/s); ``noise_stddev`` σ
    is each device's discrete Gaussian, in integer units, and 0 means no noise (no DP:
    for measuring the rounding alone).
    """

    clip: float
    bits: int
    scale: float
    noise_stddev: float
    dimension: int
    block: int = rotation.DEFAULT_BLOCK
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if _real("clip", self.clip) <= 0:
            raise ConfigError(f"DDP clip must be > 0, got {self.clip!r}")
        _int("bits", self.bits, MIN_BITS, MAX_BITS)
        half = 1 << (self.bits - 1)
        if not 0 < _real("scale", self.scale) < half:
            raise ConfigError(
                f"DDP scale must be in (0, 2^{self.bits - 1}) for {self.bits} bits, got "
                f"{self.scale!r}: one device's coordinate can reach the scale"
            )
        if _real("noise_stddev", self.noise_stddev) < 0:
            raise ConfigError(f"DDP noise_stddev must be >= 0, got {self.noise_stddev!r}")
        _int("dimension", self.dimension, 1)
        rotation.check_block(self.block)
        if not 0 <= _real("beta", self.beta) < 1:
            raise ConfigError(f"DDP beta must be in [0, 1), got {self.beta!r}")

    @property
    def padded_dimension(self) -> int:
        """Values per vector after rotation padding: what SecAgg+ masks and sends."""
        return rotation.padded_dimension(self.dimension, self.block)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂: no device's rounded integer vector is longer (conditional rounding checks it)."""
        return l2_sensitivity(self.scale, self.padded_dimension, self.beta)


def bytes_per_value(params: DDPParams) -> float:
    """Uplink bytes per update value: the wire width times the padded length, over d."""
    width = wire_dtype(params.modulus).itemsize
    return width * params.padded_dimension / params.dimension


def wrap_probability(params: DDPParams, summands: int) -> float:
    """An upper bound on P(some coordinate of ``summands`` devices' integer sum wraps).

    Wrapping means leaving [−2^(b−1), 2^(b−1)), so that the sum mod 2^b decodes wrong.
    Assumptions: the devices are honest (clipped, rounded and noised as
    :func:`fedlora.ddp.encoding.encode` does), and the rotation's signs are independent
    of their updates. Then per coordinate of a block of size B:

    - the rotated sum of the scaled updates (norm ≤ summands·s) is sub-Gaussian with
      variance proxy (summands·s)²/B (Hoeffding over the random signs), taken at the
      smallest block B_min;
    - rounding moves it by less than ``summands``;
    - the noise, a sum of ``summands`` N_ℤ(0, σ²), is sub-Gaussian with proxy
      summands·σ² (Canonne, Kamath & Steinke 2020) and independent of the signs.

    With h = 2^(b−1) and v = (summands·s)²/B_min + summands·σ², a union bound over the
    d_pad coordinates gives min(1, 2·d_pad·exp(−(h − summands)²/(2v))).
    """
    summands = _int("summands", summands, 1)
    margin = (1 << (params.bits - 1)) - summands
    if margin <= 0:
        return 1.0
    smallest = rotation.smallest_block(params.dimension, params.block)
    v = (summands * params.scale) ** 2 / smallest + summands * params.noise_stddev**2
    if v == 0:
        return 0.0
    return min(1.0, 2 * params.padded_dimension * math.exp(-(margin**2) / (2 * v)))


def choose_params(
    *,
    clip: float,
    bits: int,
    dimension: int,
    max_summands: int,
    min_survivors: int,
    sigma_for: Callable[[float, int], float],
    wrap_bound: float = DEFAULT_WRAP_BOUND,
    block: int = rotation.DEFAULT_BLOCK,
    beta: float = DEFAULT_BETA,
) -> DDPParams:
    """The finest grid b bits allow: the largest integer s with wrap probability ≤ the bound.

    ``sigma_for(Δ₂, d_pad)`` is the per-device σ (integer units) that gives the target
    ε when at least ``min_survivors`` devices' noise is in the sum (the caller's
    calibration); the wrap bound is for ``max_summands`` devices. The float noise of
    the sum is σ·√n·C/s with σ ≈ z·Δ₂/√n and Δ₂ ≈ s, so a larger s costs no privacy but
    shrinks the rounding error relative to the signal; it is capped by wrap-around,
    whose bound grows with s (bisection assumes ``sigma_for`` grows with Δ₂).

    s must be at least √d_pad: a device's rounding error has norm up to about √d_pad/2,
    so below that the grid's error is as large as the clipped update itself and Δ₂ is
    dominated by d_pad/4, not s. If even that wraps too often, b is too small: a
    :class:`ConfigError` says so and names the fewest bits that would do.
    """
    bits = _int("bits", bits, MIN_BITS, MAX_BITS)
    max_summands = _int("max_summands", max_summands, 1)
    min_survivors = _int("min_survivors", min_survivors, 1, max_summands)
    if not 0 < _real("wrap_bound", wrap_bound) < 1:
        raise ConfigError(f"DDP wrap_bound must be in (0, 1), got {wrap_bound!r}")
    padded = rotation.padded_dimension(_int("dimension", dimension, 1), block)

    def params(scale: int, b: int = bits) -> DDPParams:
        sigma = sigma_for(l2_sensitivity(scale, padded, beta), padded)
        if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma)):
            raise ConfigError(f"sigma_for returned {sigma!r}, not a finite number")
        return DDPParams(clip, b, float(scale), float(sigma), dimension, block, beta)

    low, high = math.ceil(math.sqrt(padded)), (1 << (bits - 1)) - 1
    if low > high or wrap_probability(params(low), max_summands) > wrap_bound:
        raise ConfigError(_too_few_bits(bits, low, padded, max_summands, wrap_bound, params))
    if wrap_probability(params(high), max_summands) <= wrap_bound:
        return params(high)
    while high - low > 1:  # wrap_probability(low) ≤ bound < wrap_probability(high)
        mid = (low + high) // 2
        if wrap_probability(params(mid), max_summands) <= wrap_bound:
            low = mid
        else:
            high = mid
    return params(low)


def _too_few_bits(
    bits: int,
    scale: int,
    padded: int,
    summands: int,
    wrap_bound: float,
    params: Callable[[int, int], DDPParams],
) -> str:
    enough = next(
        (
            b
            for b in range(bits + 1, MAX_BITS + 1)
            if scale < 1 << (b - 1) and wrap_probability(params(scale, b), summands) <= wrap_bound
        ),
        None,
    )
    advice = f"use at least {enough} bits" if enough else f"even {MAX_BITS} bits do not suffice"
    if scale >= 1 << (bits - 1):
        return (
            f"{bits} bits are too few for d = {padded} values: the coarsest useful scale "
            f"√{padded} = {scale} does not fit in 2^{bits - 1}; {advice}"
        )
    sigma = params(scale, bits).noise_stddev
    return (
        f"{bits} bits are too few for this noise: even at the coarsest useful scale "
        f"s = √{padded} = {scale}, σ = {sigma:.4g} per device and {summands} devices' sum "
        f"wraps around 2^{bits} with probability up to "
        f"{wrap_probability(params(scale, bits), summands):.2g} > {wrap_bound:g}; {advice}"
    )
