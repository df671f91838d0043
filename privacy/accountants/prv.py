"""PRV accountant (Gopi, Lee, Wutschitz 2021), the default: tight ε for DP-SGD.

Uses the ``prv_accountant`` package (the authors' code) for its grid (``Domain``) and
follows its (ε, δ) read-out with error bounds
(``DiscretePrivacyRandomVariable.compute_epsilon``). The discretisation, the
composition and the read-out are done here, because the package's are slow for our use (called
per device per round, and ~10 times per calibration) and its truncated mean is
inaccurate on wide domains (it refuses e.g. σ = 0.7, q = 0.2, 300 steps):

* the grid length is rounded up to an even 5-smooth number and the FFT runs in
  float64, as Opacus does (the package uses ``longdouble`` on whatever length
  the domain gives: 1.5 s for 500 steps instead of ~0.1–0.3 s);
* the PRV's distribution is evaluated once per cell edge in float64 as its
  survival function (accurate in the upper tail that δ depends on; tests check
  it against the package's CDF), and its truncated mean is integrated with
  log-spaced breakpoints (checked against the KL divergence);
* every group of identical (σ, q) is self-composed ``steps`` times and all
  groups are multiplied in Fourier space at once (one inverse FFT);
* the truncation domain is sized by the package's rule (Gopi et al. Remark
  5.6) but from our cached, vectorised RDP instead of its per-call RDP loop;
* the (ε, δ) read-out (:func:`read_epsilon`) is the package's
  ``compute_epsilon``, the same operations in the same order on the same long
  doubles, but only over the top of the grid where δ(ε) crosses the target: its
  suffix sums are the package's from the grid's end, and its crossings are found by
  the package's own binary search run on the ~20 cells it visits, so the three ε are
  the package's bit for bit (tests check it) at a fraction of the work.

Claims use the UPPER bound: ``ε_estimate + eps_error`` evaluated at
``δ - delta_error`` (or RDP's bound if smaller, which happens only for tiny ε).
Results are cached per (history, δ, settings).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from prv_accountant.domain import Domain
from scipy import fft, integrate, special

from fedlora.errors import PrivacyError
from fedlora.privacy.accountants.base import Accountant, History, check_delta
from fedlora.privacy.accountants.rdp import rdp_epsilon

DEFAULT_EPS_ERROR = 0.01
"""Absolute slack on ε; the reported upper bound is at most ~2x this above the true ε."""

DEFAULT_DELTA_ERROR_RATIO = 1e-3
"""delta_error = δ / 1000, as Opacus and the package's examples use."""

DEFAULT_MAX_GRID = 2**21
"""Largest discretisation grid; beyond it the mesh is coarsened and eps_error grows to match."""


FloatArray = npt.NDArray[np.float64]
ComplexArray = npt.NDArray[np.complex128]


def survival(t: FloatArray, sample_rate: float, noise_multiplier: float) -> FloatArray:
    """P[Y > t] for the PRV Y of one Poisson-subsampled Gaussian step.

    With ``z = log((q - 1 + e^t) / q)``:
    ``P[Y > t] = q/2·erfc((2σ²z - 1) / (2√2σ)) + (1-q)/2·erfc((2σ²z + 1) / (2√2σ))``
    for ``t > log(1 - q)`` and 1 below (the package's ``cdf`` is 1 minus this).
    """
    q, sigma = sample_rate, noise_multiplier
    t = np.asarray(t, dtype=np.float64)
    out: FloatArray = np.ones_like(t)
    live = t > math.log1p(-q) if q < 1.0 else np.ones(t.shape, dtype=bool)
    tl = t[live]
    # Each formula only where it applies (about half of a PRV grid lies below log(1-q)):
    # the values are the same as computing all and picking, at ~2.5x less work.
    positive = tl > 0
    z = np.empty_like(tl)
    with np.errstate(over="ignore", divide="ignore"):
        # z computed without overflow for large t and without cancellation near 0.
        tp = tl[positive]
        z[positive] = tp - math.log(q) + np.log1p((q - 1.0) * np.exp(-tp))
        z[~positive] = np.log1p(np.expm1(tl[~positive]) / q)
    scale = 2.0 * math.sqrt(2.0) * sigma
    out[live] = q / 2.0 * special.erfc((2.0 * sigma**2 * z - 1.0) / scale) + (
        1.0 - q
    ) / 2.0 * special.erfc((2.0 * sigma**2 * z + 1.0) / scale)
    return out


def _survival_at(t: float, sample_rate: float, noise_multiplier: float) -> float:
    """:func:`survival` at one point: the same operations on scalars, so the same value.

    The truncated mean's integrand calls it thousands of times per discretisation;
    building a one-element array each time made it ~10x slower (12 µs against 1.2 µs).
    numpy's ufuncs and ``special.erfc`` are kept (``math``'s differ in the last bit), so
    every value is the array version's bit for bit (tests check it). The caller sets
    ``np.errstate`` as :func:`survival` does (once, not per point).
    """
    q, sigma = sample_rate, noise_multiplier
    if q < 1.0 and not t > math.log1p(-q):
        return 1.0
    if t > 0:
        z = t - math.log(q) + np.log1p((q - 1.0) * np.exp(-abs(t)))
    else:
        z = np.log1p(np.expm1(t) / q)
    scale = 2.0 * math.sqrt(2.0) * sigma
    return float(
        q / 2.0 * special.erfc((2.0 * sigma**2 * z - 1.0) / scale)
        + (1.0 - q) / 2.0 * special.erfc((2.0 * sigma**2 * z + 1.0) / scale)
    )


def _truncated_mean(
    sample_rate: float, noise_multiplier: float, t_min: float, t_max: float
) -> float:
    """Mean of the PRV conditioned on ``[t_min, t_max]``: ``t_min + ∫ P[Y > t | trunc] dt``.

    The package integrates its CDF with fixed breakpoints (±1e-5..±0.1, then
    straight to ±t_max); on wide domains that is off by ~1e-5 per step (x steps
    in ε) and for e.g. σ = 0.7, q = 0.2 by 0.04, which fails its own mean check.
    Log-spaced breakpoints out to the domain's ends (as Opacus does) give the
    KL divergence to ~1e-14 (checked in tests).
    """
    q, sigma = sample_rate, noise_multiplier
    s_min, s_max = survival(np.array([t_min, t_max]), q, sigma)
    mass = float(s_min - s_max)

    def tail(t: float) -> float:
        return (_survival_at(t, q, sigma) - float(s_max)) / mass

    start = max(t_min, math.log1p(-q)) if q < 1.0 else t_min  # the tail is 1 below log(1-q)
    # Log-spaced cuts from ±1e-5 towards the ends (endpoint excluded: a cut that
    # rounds to next to an end would leave quad a zero-width piece to complain about).
    points = [start, 0.0, t_max, *np.logspace(-5.0, math.log10(t_max), 10, endpoint=False)]
    if start < -1e-5:
        points += list(-np.logspace(-5.0, math.log10(-start), 10, endpoint=False))
    cuts = sorted({float(p) for p in points if start <= p <= t_max})
    total = start - t_min
    with np.errstate(over="ignore", divide="ignore"):  # as in survival: log(0) is -inf there
        for a, b in itertools.pairwise(cuts):
            total += integrate.quad(tail, a, b, limit=500, epsabs=1e-12)[0]
    return t_min + total


def _discretise(
    sample_rate: float, noise_multiplier: float, domain: Domain
) -> tuple[FloatArray, float]:
    """Cell-centred pmf of the PRV truncated to the domain, and the shift that fixes its mean.

    As ``prv_accountant.discretisers.CellCentred``: cell i holds the mass of
    ``[t_i - dt/2, t_i + dt/2]`` and the grid is shifted so the discrete mean
    equals the continuous (truncated) mean.
    """
    size, dt, t_min, t_max = len(domain), domain.dt(), domain.t_min(), domain.t_max()
    edges = np.clip(t_min - dt / 2.0 + dt * np.arange(size + 1), t_min, t_max)
    sf = survival(edges, sample_rate, noise_multiplier)
    pmf: FloatArray = -np.diff(sf) / (sf[0] - sf[-1])
    centres = t_min + dt * np.arange(size)
    mean = _truncated_mean(sample_rate, noise_multiplier, t_min, t_max)
    shift = mean - float(np.dot(centres, pmf))
    if not abs(shift) < dt / 2.0:
        raise PrivacyError(
            f"PRV accountant cannot discretise sigma={noise_multiplier}, q={sample_rate}: "
            "the discrete mean is off by more than half a cell"
        )
    return pmf, shift


def _int_power(x: npt.NDArray[np.complex128], n: int) -> npt.NDArray[np.complex128]:
    """x**n by repeated squaring (numpy's complex power goes through exp/log for large n)."""
    result: npt.NDArray[np.complex128] | None = None
    base = x
    while True:
        if n & 1:
            result = base if result is None else result * base
        n >>= 1
        if not n:
            break
        base = base * base
    assert result is not None  # n >= 1
    return result


def _even_fast_len(n: int) -> int:
    """Smallest even 5-smooth integer >= n (a fast real-FFT length)."""
    m = int(fft.next_fast_len(n, real=True))
    while m % 2:
        m = int(fft.next_fast_len(m + 1, real=True))
    return m


GROUP_CACHE_BYTES = 64 * 2**20
"""Memory for :func:`_group_spectrum`'s cache, per process (a grid of 2^17 cells: 1 MiB)."""

_GroupKey = tuple[float, float, int, int, float, float]
_group_cache: OrderedDict[_GroupKey, tuple[ComplexArray, float]] = OrderedDict()
_group_cache_bytes = 0


def _group_spectrum(
    sigma: float, q: float, steps: int, domain: Domain
) -> tuple[ComplexArray, float]:
    """Fourier spectrum of one group (σ, q) self-composed ``steps`` times on ``domain``, and
    the shift of one step (:func:`_discretise`); read-only, remembered by its arguments.

    A calibration asks for ε of ``history + planned(σ)`` at 10–20 values of σ; the grid
    moves with σ, but a few σ share each grid, and on a shared grid the history's groups
    are the very same arrays: computed once, not once per σ. The same arrays come out,
    so ε does not change by a bit. Least recently used entries go past
    :data:`GROUP_CACHE_BYTES`.
    """
    global _group_cache_bytes
    key = (sigma, q, steps, len(domain), domain.t_min(), domain.dt())
    hit = _group_cache.get(key)
    if hit is not None:
        _group_cache.move_to_end(key)
        return hit
    pmf, shift = _discretise(q, sigma, domain)
    group = _int_power(fft.rfft(pmf), steps)
    group.setflags(write=False)
    if group.nbytes <= GROUP_CACHE_BYTES // 4:
        _group_cache[key] = (group, shift)
        _group_cache_bytes += group.nbytes
        while _group_cache_bytes > GROUP_CACHE_BYTES and _group_cache:
            _, (old, _) = _group_cache.popitem(last=False)
            _group_cache_bytes -= old.nbytes
    return group, shift


def clear_group_cache() -> None:
    """Forget every cached group spectrum (benchmarks and tests start from nothing)."""
    global _group_cache_bytes
    _group_cache.clear()
    _group_cache_bytes = 0


def _grid_suffix(domain: Domain, start: int) -> npt.NDArray[np.longdouble]:
    """``domain.ts()[start:]``, the same long doubles, without building the rest.

    ``Domain.ts`` is ``np.linspace(t_min, t_max, size, dtype=longdouble)``, which numpy
    computes in float64 (``arange · step + t_min``, the last node set to ``t_max``) and
    then casts: the same operations on the same float64 indices give the same values
    (tests check it). At the 2^21 cap the whole grid is 2M long doubles per ε.
    """
    size = len(domain)
    t_min, t_max = np.float64(domain.t_min()), np.float64(domain.t_max())
    step = np.subtract(t_max, t_min, dtype=np.float64) / (size - 1)
    t = np.arange(start, size, dtype=np.float64)
    t *= step
    t += t_min
    t[-1] = t_max
    return t.astype(np.longdouble)


def _suffix_epsilon(
    t: npt.NDArray[np.longdouble],
    pmf: FloatArray,
    start: int,
    targets: tuple[float, ...],
) -> list[np.longdouble] | None:
    """The package's ``find_epsilon`` at each δ of ``targets``, from ``pmf[start:]`` and its
    nodes ``t`` alone; None when a crossing may lie left of ``start`` (a longer suffix is
    needed).

    ``δ(t_i)`` needs sums of ``pmf[j]`` and ``pmf[j]·e^(-t_j)`` over ``j ≥ i`` only, summed
    from the grid's end as the package sums them, so on the suffix they are its values
    bit for bit. The package then finds each crossing with ``np.searchsorted`` on
    ``-δ(t_i) = e^(t_i)·Σ₂ - Σ₁`` over the whole grid; the same binary search (numpy's:
    lower bound, halving ``[0, n)``) is run here on that value computed at the ~20 cells
    it visits, the same long-double operations, so it stops at the same cell.
    """
    p = pmf[start:]
    d1 = np.flip(np.flip(p).cumsum())
    d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
    out: list[np.longdouble] = []
    for target in targets:
        key = -target
        lo, hi = 0, len(t)
        while lo < hi:
            mid = lo + ((hi - lo) >> 1)
            if np.exp(t[mid]) * d2[mid] - d1[mid] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo <= 0:
            if start > 0:
                return None
            raise RuntimeError("Cannot compute epsilon")  # as the package says it
        out.append(np.log((d1[lo] - target) / d2[lo]))
    return out


def read_epsilon(
    pmf: FloatArray,
    domain: Domain,
    delta: float,
    delta_error: float,
    eps_error: float,
    hint: float = 0.0,
) -> tuple[float, float, float]:
    """``DiscretePrivacyRandomVariable(pmf, domain).compute_epsilon(delta, delta_error,
    eps_error)``: (lower, estimate, upper) ε, the package's values bit for bit.

    The package builds δ(ε) over the whole grid in long doubles (two ``exp`` of every
    cell: 7 ms at 62k cells, 0.37 s at the 2^21 cap). δ at a cell depends only on the
    cells above it, and the crossings lie near ε, so this reads the grid's top from
    ``hint`` (a guess at ε from below; 0 when unknown) and doubles the part it reads
    until every crossing is inside it. Of that part it builds only the nodes
    (:func:`_grid_suffix`) and the two suffix sums; δ itself is evaluated at the cells
    the binary search visits (:func:`_suffix_epsilon`).

    Measured on the 50 calibrations of a default run (replayed as ``bench/calibration.py``
    does, every cache emptied; CPU, three alternating pairs, 2026-12-03): with δ at
    every cell of a suffix read from half RDP's ε, 4.8–5.2 s; as here, 4.1–4.4 s.
    """
    # log_pmc_inf = 0 (no mass at infinity): the package's δ bookkeeping, term for term.
    delta_inf = 1 - np.exp(0.0)
    delta_fin = (delta - delta_inf) / (1 - delta_inf)
    if delta_fin <= 0:
        return (math.inf, math.inf, math.inf)
    if np.finfo(np.longdouble).eps * len(domain) > delta_fin - delta_error:
        raise ValueError(
            "Floating point errors will dominate for such small values of delta. "
            "Increase delta or reduce domain size."
        )
    size = len(pmf)
    targets = (delta_fin + delta_error, delta_fin, delta_fin - delta_error)
    start = min(max(0, int((hint - domain.t_min()) / domain.dt())), size - 1)
    while True:
        found = _suffix_epsilon(_grid_suffix(domain, start), pmf, start, targets)
        if found is not None:
            break
        start = max(0, size - 2 * (size - start))
    lower, estimate, upper = found
    return (float(lower - eps_error), float(estimate), float(upper + eps_error))


def _domain_half_width(history: History, eps_error: float, delta_error: float) -> float:
    """Truncation bound L for the composed PRV (Gopi et al. Remark 5.6, as ``prv_accountant``)."""
    total = sum(n for _, _, n in history)
    bound = rdp_epsilon(history, delta_error / 4.0)
    for sigma, q, _ in history:
        bound = max(bound, rdp_epsilon(((sigma, q, 1),), delta_error / 8.0 / total))
    return max(bound, eps_error) + 3.0


@lru_cache(maxsize=2048)
def prv_epsilon_bounds(
    history: History,
    delta: float,
    eps_error: float = DEFAULT_EPS_ERROR,
    delta_error_ratio: float = DEFAULT_DELTA_ERROR_RATIO,
    max_grid: int = DEFAULT_MAX_GRID,
) -> tuple[float, float, float]:
    """(lower, estimate, upper) ε at ``delta`` of a non-empty history ``((σ, q, steps), ...)``."""
    if not history or any(n < 1 for _, _, n in history):
        raise PrivacyError("PRV accountant needs a history of groups with steps >= 1")
    total = sum(n for _, _, n in history)
    delta_error = delta * delta_error_ratio
    half_width = _domain_half_width(history, eps_error, delta_error)

    # Mesh from Gopi et al. Theorem 5.5 for the requested eps_error; a grid of
    # t_i = (i - a)·mesh, i = 0..N-1 with N = 2a + 2 even and FFT-friendly.
    error_per_mesh = math.sqrt(total / 2.0 * math.log(12.0 / delta_error))
    mesh = eps_error / error_per_mesh
    size = _even_fast_len(2 * math.ceil(half_width / mesh) + 2)
    if size > max_grid:  # keep memory bounded when ε is huge; pay in eps_error instead
        size = max_grid
        mesh = half_width / (size / 2 - 1)
    eps_error = mesh * error_per_mesh
    a = size // 2 - 1
    domain = Domain(-a * mesh, (a + 1) * mesh, size)

    spectrum: npt.NDArray[np.complex128] | None = None
    shift = 0.0
    for sigma, q, steps in history:
        group, group_shift = _group_spectrum(sigma, q, steps, domain)
        spectrum = group if spectrum is None else spectrum * group
        shift += steps * group_shift
    assert spectrum is not None  # history is non-empty

    # The sum of `total` grid values (i_r - a)·mesh has index Σ i_r; put the
    # value (i - a)·mesh back at index i: roll by -(total - 1)·a (mod N).
    pmf = np.roll(fft.irfft(spectrum, n=size), -((total - 1) * a) % size)
    # This PRV has no mass at infinity (log_pmc_inf = 0). The crossings lie near ε, which
    # is 0.81–0.92 of RDP's at δ in 99 % of a default run's evaluations (0.38 at worst:
    # read_epsilon then reads further down, which costs time, never bits).
    hint = 0.75 * rdp_epsilon(history, delta)
    try:
        lower, estimate, upper = read_epsilon(
            pmf, domain.shift_right(shift), delta, delta_error, eps_error, hint
        )
    except (ValueError, RuntimeError) as err:
        raise PrivacyError(
            f"PRV accountant cannot compute epsilon at delta={delta}: {err}"
        ) from None
    return max(0.0, lower), max(0.0, estimate), max(0.0, upper)


class PRVAccountant(Accountant):
    """Privacy-random-variable accountant; reports the upper bound of ε.

    ``get_epsilon`` is the PRV upper bound, or the RDP bound where that is
    smaller (only for tiny ε); ``get_epsilon_bounds`` gives the PRV's own
    (lower, estimate, upper).
    """

    name = "prv"

    def __init__(
        self,
        eps_error: float = DEFAULT_EPS_ERROR,
        delta_error_ratio: float = DEFAULT_DELTA_ERROR_RATIO,
    ) -> None:
        super().__init__()
        if not (0.0 < eps_error <= 1.0) or not (0.0 < delta_error_ratio < 1.0):
            raise PrivacyError(
                "PRV accountant needs 0 < eps_error <= 1 and 0 < delta_error_ratio < 1, "
                f"got {eps_error!r}, {delta_error_ratio!r}"
            )
        self.eps_error = float(eps_error)
        self.delta_error_ratio = float(delta_error_ratio)

    def _epsilon(self, history: History, delta: float) -> float:
        upper = prv_epsilon_bounds(history, delta, self.eps_error, self.delta_error_ratio)[2]
        # Both are upper bounds; RDP is only the smaller one when ε is tiny and the
        # PRV's eps_error slack dominates (e.g. ε ≈ 0.005 reported as 0.015).
        return min(upper, rdp_epsilon(history, delta))

    def get_epsilon_bounds(self, delta: float) -> tuple[float, float, float]:
        """(lower, estimate, upper) ε at ``delta``; ``get_epsilon`` returns the upper one."""
        delta = check_delta(delta)
        if not self.history:
            return (0.0, 0.0, 0.0)
        return prv_epsilon_bounds(self.history, delta, self.eps_error, self.delta_error_ratio)
