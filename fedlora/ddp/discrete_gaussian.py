"""Samples of the discrete Gaussian N_ℤ(0, σ²): P(x) ∝ exp(−x²/(2σ²)) on the integers.

Each device adds N_ℤ(0, σ²) noise to its rounded integer vector; the sum of the
survivors' noise is what makes the securely aggregated sum differentially private
(Kairouz et al. 2021). The sampler is Canonne, Kamath & Steinke (2020, "The discrete
Gaussian for differential privacy", Algorithm 3), vectorised:

1. propose Y from the discrete Laplace P(y) ∝ exp(−|y|/t) with t = ⌊σ⌋ + 1, as the
   difference of two geometric variables with success probability 1 − e^(−1/t);
2. accept Y with probability exp(−(|Y| − σ²/t)² / (2σ²)), else propose again.

About 3/4 of proposals are accepted for σ ≥ 1 (the rejection constant tends to
e^(1/2)·2/√(2π) ≈ 1.32); each takes three uniforms from the injected source.

**Floating point, not exact arithmetic.** Like TFF's ``discrete_gaussian_utils`` (and
unlike CKS's reference sampler, which works with exact rationals and Bernoulli
factories), the geometric draws use ⌊−t·ln U⌋ and the acceptance test compares a double
with exp(...) evaluated in float64. Each probability the sampler realises is therefore
the ideal one up to float64 rounding (relative errors ~2⁻⁵³, and proposals are capped
at about 37·t because U ≥ 2⁻⁵³, where the target has mass below e⁻⁶⁰⁰): the output
distribution is within ~10⁻¹⁵ of N_ℤ(0, σ²) per outcome, not equal to it, and the DP
analysis (which assumes the exact distribution) is off by that much. The outputs are
integers, so the floating-point attacks on continuous samplers (Mironov 2012: the set
of representable outputs reveals the unnoised value) do not apply.
"""

from __future__ import annotations

import math

import numpy as np

from fedlora.errors import ConfigError
from fedlora.secagg.quantize import UniformSource


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating)):
        raise ConfigError(f"a discrete Gaussian's sigma must be a number, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"a discrete Gaussian's sigma must be finite and >= 0, got {sigma!r}")
    return float(sigma)


def _geometric(u: np.ndarray, t: float) -> np.ndarray:
    """Failures before the first success, P(G ≥ k) = e^(−k/t), from uniforms in [0, 1)."""
    return np.floor(-t * np.log1p(-u))


def sample_discrete_gaussian(sigma: float, n: int, source: UniformSource) -> np.ndarray:
    """``n`` independent draws of N_ℤ(0, σ²) as int64 (zeros for σ = 0, drawing nothing)."""
    sigma = _check_sigma(sigma)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"the number of draws must be an int >= 0, got {n!r}")
    out = np.zeros(int(n), dtype=np.int64)
    if sigma == 0 or n == 0:
        return out
    t = math.floor(sigma) + 1.0
    shift, two_var = sigma * sigma / t, 2.0 * sigma * sigma
    filled = 0
    while filled < n:
        want = n - filled
        # 1.4 ≥ 1 / acceptance for σ ≥ 1 (one pass, usually); small σ takes a few passes
        batch = int(want * 1.4) + 64
        u = source.uniform(3 * batch)
        y = _geometric(u[:batch], t) - _geometric(u[batch : 2 * batch], t)
        accept = u[2 * batch :] < np.exp(-((np.abs(y) - shift) ** 2) / two_var)
        kept = y[accept][:want]
        out[filled : filled + kept.size] = kept.astype(np.int64)
        filled += kept.size
    return out


def pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """The exact N_ℤ(0, σ²) probabilities of ``support`` (normalised over ±(40σ + 40))."""
    sigma = _check_sigma(sigma)
    if sigma == 0:
        return (np.asarray(support) == 0).astype(np.float64)
    edge = int(40 * sigma) + 40
    xs = np.arange(-edge, edge + 1, dtype=np.float64)
    norm = np.exp(-(xs**2) / (2 * sigma**2)).sum()
    return np.exp(-(np.asarray(support, dtype=np.float64) ** 2) / (2 * sigma**2)) / norm


def variance(sigma: float) -> float:
    """The exact variance of N_ℤ(0, σ²) (below σ² for small σ, ≈ σ² from σ ≈ 1 on)."""
    sigma = _check_sigma(sigma)
    if sigma == 0:
        return 0.0
    edge = int(40 * sigma) + 40
    xs = np.arange(-edge, edge + 1, dtype=np.float64)
    return float((xs**2 * pmf(sigma, xs)).sum())
