"""Rényi DP accountant for the Poisson-subsampled Gaussian mechanism (DP-SGD).

RDP of one step at order α is ``log(A_α) / (α - 1)`` (Mironov, Talwar, Zhang,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019):

* integer α: ``A_α = Σ_{i=0..α} C(α, i) q^i (1-q)^{α-i} exp((i² - i) / (2σ²))``;
* fractional α: the two-sided series of their Section 3.3 with erfc terms. Like
  current ``dp_accounting`` we add the absolute values of its terms, which
  bounds A_α from above (the alternating tail is tiny), so ε stays an upper bound.

Steps compose by adding RDP; the conversion to (ε, δ) is the improved bound of
Balle et al. 2020 / Canonne, Kamath, Steinke 2020,
``ε = rdp + log1p(-1/α) - (log δ + log α) / (α - 1)``, minimised over α.
Everything is vectorised over orders and cached per (q, σ): calibration and
the PRV accountant's domain sizing call this many times.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import special

from fedlora.privacy.accountants.base import Accountant, History

FloatArray = npt.NDArray[np.float64]

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)
"""The orders ``dp_accounting`` uses by default: dense near 1 for small ε, sparse far out."""

_MAX_SERIES_TERMS = 1024


def _log_comb(n: FloatArray, k: FloatArray) -> FloatArray:
    """log |C(n, k)| for real n (gammaln is log|Γ|, so negative arguments are fine)."""
    out: FloatArray = special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
    return out


@lru_cache(maxsize=64)
def _log_comb_table(alphas: tuple[float, ...], n_terms: int) -> FloatArray:
    """``_log_comb(α, i)`` for each of ``alphas`` (rows) and i = 0..n_terms-1 (columns).

    It depends on neither q nor σ, and it is a third of the work of an RDP evaluation
    (gammaln of ~60,000 values): a calibration evaluates RDP at ~20 new σ, so it is
    computed once per table (read-only), not per σ. The same values, element for element.
    """
    a = np.asarray(alphas, dtype=np.float64)[:, None]
    i = np.arange(n_terms, dtype=np.float64)[None, :]
    with np.errstate(invalid="ignore"):  # gammaln of negative integers where i > α: masked
        table = _log_comb(a, i)
    table.setflags(write=False)
    return table


def _logsumexp_rows(a: FloatArray) -> FloatArray:
    """``scipy.special.logsumexp(a, axis=1)`` for a real 2-D array, to the bit.

    The same operations in the same order as SciPy 1.17's (the maximum and every
    element equal to it are taken out of the sum, ``log1p`` of the rest's share is
    added back, the direct ``log(sum(exp(a)))`` where that is not finite), without
    its array-API dispatch and without the second, direct sum on rows where the
    first is finite: an RDP evaluation sums ~10 small tables, and SciPy's sums were a
    quarter of a σ calibration's CPU time (1.25 of 5.3 s over the default fleet's 50
    calibrations); these take 12 % of the calibration's CPU off.
    ``tests/privacy/test_rdp_logsumexp.py`` compares the two on tables with ties,
    infinities and NaN (if a SciPy upgrade changes its sums, that test says so).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        top = a.max(axis=1, keepdims=True)
        at_top = a == top
        count = at_top.sum(axis=1, keepdims=True, dtype=np.float64)
        rest = np.exp(np.where(at_top, -np.inf, a) - top).sum(axis=1, keepdims=True)
        rest = np.where(rest == 0, rest, rest / count)
        out = np.log1p(rest) + np.log(count) + top
        off = ~np.isfinite(out[:, 0])
        if off.any():  # each row is summed on its own, so these rows alone give the same
            out[off] = np.log(np.exp(a[off]).sum(axis=1, keepdims=True))
    result: FloatArray = out[:, 0]
    return result


def _log_a_int_table(q: float, sigma: float, alphas: FloatArray, width: int) -> FloatArray:
    """log A_α for integer orders ``alphas`` (0 < q < 1), the series laid out ``width`` wide."""
    i = np.arange(width, dtype=np.float64)[None, :]
    a = alphas[:, None]
    with np.errstate(invalid="ignore"):  # gammaln of negative integers where i > α: masked
        terms = (
            _log_comb_table(tuple(alphas.tolist()), width)
            + i * math.log(q)
            + (a - i) * math.log1p(-q)
            + (i * i - i) / (2.0 * sigma**2)
        )
    terms = np.where(i <= a, terms, -np.inf)
    return _logsumexp_rows(terms)


_SUM_BLOCK = 128
"""numpy's pairwise summation adds a row in blocks of at most 128, each with 8 running sums."""


def _log_a_int(q: float, sigma: float, alphas: FloatArray) -> FloatArray:
    """log A_α for integer orders ``alphas`` (0 < q < 1).

    Every order's series is summed as one row ``max(α) + 1`` wide, the terms past its own
    α being zeros (``e^-inf``). The default orders run to 1024 but 62 of the 66 stop by 63,
    so most of each table was zeros: those orders are summed in a table 64 wide instead,
    which gives the same sums to the bit. numpy sums a row of more than 128 values by
    halving it (each half a multiple of 8) down to blocks of at most 128, each added with
    8 running sums; a row whose terms all lie in its first block therefore sums exactly
    as that block alone, and zeros added after them change nothing. The short table keeps
    that block's 8 running sums by being a multiple of 8 wide.
    ``tests/privacy/test_rdp_logsumexp.py`` compares both layouts bit for bit.
    """
    top = int(alphas.max())
    width = top + 1
    short = alphas + 1 <= _SUM_BLOCK // 2  # in numpy's first block of any row over 128
    if width <= _SUM_BLOCK or not short.any() or short.all():
        return _log_a_int_table(q, sigma, alphas, width)
    out = np.empty_like(alphas)
    short_width = max(8, -(-int(alphas[short].max() + 1) // 8) * 8)
    out[short] = _log_a_int_table(q, sigma, alphas[short], short_width)
    out[~short] = _log_a_int_table(q, sigma, alphas[~short], width)
    return out


def _log_a_frac(q: float, sigma: float, alphas: FloatArray) -> FloatArray:
    """log A_α for fractional orders ``alphas`` (0 < q < 1); inf where the series did not settle.

    For small α and moderate σ the terms only fall polynomially and the series
    does not settle within ``_MAX_SERIES_TERMS`` terms; that order is then left
    out of the ε minimisation (as ``dp_accounting`` does), which only loosens ε.
    """
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    out: FloatArray = np.full_like(alphas, np.inf)
    pending = np.arange(len(alphas))
    n_terms = 64
    while pending.size:
        a = alphas[pending][:, None]
        i = np.arange(n_terms, dtype=np.float64)[None, :]
        j = a - i
        log_coef = _log_comb_table(tuple(alphas[pending].tolist()), n_terms)
        log_s0 = (
            log_coef
            + i * math.log(q)
            + j * math.log1p(-q)
            + (i * i - i) / (2.0 * sigma**2)
            + special.log_ndtr(-(i - z0) / sigma)  # log(erfc(x / √2) / 2), x = (i - z0) / σ
        )
        log_s1 = (
            log_coef
            + j * math.log(q)
            + i * math.log1p(-q)
            + (j * j - j) / (2.0 * sigma**2)
            + special.log_ndtr(-(z0 - j) / sigma)
        )
        total = np.logaddexp(_logsumexp_rows(log_s0), _logsumexp_rows(log_s1))
        # Settled once the last terms are falling and negligible (e^-30) next to the sum.
        settled = (
            (log_s0[:, -1] < log_s0[:, -2])
            & (log_s1[:, -1] < log_s1[:, -2])
            & (np.maximum(log_s0[:, -1], log_s1[:, -1]) < total - 30.0)
        )
        out[pending[settled]] = total[settled]
        pending = pending[~settled]
        n_terms *= 2
        if n_terms > _MAX_SERIES_TERMS:
            break
    return out


@lru_cache(maxsize=4096)
def _rdp_cached(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]
) -> FloatArray:
    alphas = np.asarray(orders, dtype=np.float64)
    if sample_rate == 1.0:  # no subsampling: the Gaussian mechanism, α / (2σ²)
        rdp: FloatArray = alphas / (2.0 * noise_multiplier**2)
    else:
        is_int = alphas == np.floor(alphas)
        log_a = np.empty_like(alphas)
        if is_int.any():
            log_a[is_int] = _log_a_int(sample_rate, noise_multiplier, alphas[is_int])
        if (~is_int).any():
            log_a[~is_int] = _log_a_frac(sample_rate, noise_multiplier, alphas[~is_int])
        rdp = np.maximum(log_a, 0.0) / (alphas - 1.0)  # A_α >= 1; clip rounding below it
    rdp.setflags(write=False)
    return rdp


def rdp_poisson_subsampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> FloatArray:
    """RDP at each of ``orders`` of one step at rate ``sample_rate``, noise ``noise_multiplier``.

    The returned array is cached and read-only.
    """
    return _rdp_cached(float(sample_rate), float(noise_multiplier), tuple(orders))


def epsilon_from_rdp(orders: tuple[float, ...], rdp: FloatArray, delta: float) -> float:
    """Smallest ε over orders for which RDP ``rdp`` implies (ε, δ)-DP (improved conversion)."""
    alphas = np.asarray(orders, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        eps = rdp + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
        # If the KL divergence (≤ RDP at any α > 1) is this small, δ alone covers it:
        # TV ≤ sqrt(1 - exp(-KL)) ≤ δ, so (0, δ)-DP holds.
        eps = np.where(delta**2 + np.expm1(-rdp) >= 0.0, 0.0, eps)
    eps = np.where(np.isnan(eps), np.inf, eps)
    return max(0.0, float(eps.min()))


def rdp_of_history(history: History, orders: tuple[float, ...] = DEFAULT_ORDERS) -> FloatArray:
    """Total RDP at ``orders`` of a composed history ``((σ, q, steps), ...)``."""
    total = np.zeros(len(orders), dtype=np.float64)
    for sigma, q, steps in history:
        total = total + steps * rdp_poisson_subsampled_gaussian(q, sigma, orders)
    return total


def rdp_epsilon(
    history: History, delta: float, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> float:
    """ε at ``delta`` of a history by RDP; 0.0 for an empty one."""
    if not history:
        return 0.0
    return epsilon_from_rdp(orders, rdp_of_history(history, orders), delta)


class RDPAccountant(Accountant):
    """Rényi DP accountant (Opacus' and dp_accounting's default before PRV/PLD).

    Looser than PRV by roughly 10–30 % on typical DP-SGD schedules but cheap and
    always an upper bound; used to bracket calibration and size the PRV domain.
    """

    name = "rdp"

    def __init__(self, orders: tuple[float, ...] = DEFAULT_ORDERS) -> None:
        super().__init__()
        self.orders = tuple(float(a) for a in orders)

    def _epsilon(self, history: History, delta: float) -> float:
        return rdp_epsilon(history, delta, self.orders)
