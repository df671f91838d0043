"""The PRV accountant's own discretisation and composition, checked piece by piece."""

import itertools
import math

import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism
from scipy import integrate, special, stats

from fedlora.privacy.accountants.prv import (
    _even_fast_len,
    _survival_at,
    _truncated_mean,
    prv_epsilon_bounds,
    survival,
)


@pytest.mark.parametrize(("q", "sigma"), [(0.1, 1.0), (0.01, 0.7), (0.5, 3.0), (1.0, 1.0)])
def test_survival_is_one_minus_the_package_cdf(q, sigma):
    t = np.linspace(-6.0, 25.0, 2001)
    package = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)

    expected = 1.0 - np.asarray(package.cdf(t), dtype=np.float64)

    np.testing.assert_allclose(survival(t, q, sigma), expected, rtol=0, atol=1e-13)


def test_survival_below_the_support_is_one_and_far_out_is_zero():
    assert survival(np.array([np.log1p(-0.1) - 1e-9]), 0.1, 1.0)[0] == 1.0
    assert survival(np.array([800.0]), 0.1, 1.0)[0] == 0.0  # no overflow for large t


def kl_divergence(q: float, sigma: float) -> float:
    """E[Y] for the PRV Y = log((1-q) + q·exp((2x-1)/(2σ²))), x ~ (1-q)N(0,σ²) + qN(1,σ²)."""

    def integrand(x: float) -> float:
        p = (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)
        return p * math.log1p(q * math.expm1((2 * x - 1) / (2 * sigma**2)))

    cuts = [-40.0, -5.0, 0.0, 1.0, 5.0, 40.0]
    return sum(
        integrate.quad(integrand, a, b, limit=500, epsabs=1e-15)[0]
        for a, b in itertools.pairwise(cuts)
    )


@pytest.mark.parametrize(
    ("q", "sigma", "half_width"), [(0.1, 1.0, 26.8), (0.2, 0.7, 60.0), (0.01, 0.7, 20.0)]
)
def test_truncated_mean_is_the_kl_divergence(q, sigma, half_width):
    # The truncated tail mass is negligible, so the mean is E[Y] = KL(P || Q). (The package's
    # own integration is off by 7e-6 and 0.037 on the first two: its mean check then fails.)
    mean = _truncated_mean(q, sigma, -half_width, half_width)

    assert mean == pytest.approx(kl_divergence(q, sigma), rel=1e-9, abs=1e-12)


def test_truncated_mean_without_subsampling_is_one_over_two_sigma_squared():
    assert _truncated_mean(1.0, 2.0, -30.0, 30.0) == pytest.approx(1 / 8, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 97, 387316, 1_000_001])
def test_even_fast_len(n):
    m = _even_fast_len(n)

    assert m >= n and m % 2 == 0
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    assert m == 1


@pytest.mark.parametrize(
    ("groups", "opacus_upper"),
    [
        # Opacus 1.6 PRVAccountant, eps_error 0.01, δ = 1e-5
        (((1.0, 0.1, 101),), 7.0906306),  # odd count: the other roll of the FFT result
        (((1.3, 0.2, 7), (0.9, 0.05, 12)), 3.1737639),
    ],
)
def test_bounds_are_consistent_and_match_opacus(groups, opacus_upper):
    lower, estimate, upper = prv_epsilon_bounds(groups, 1e-5)

    assert upper == pytest.approx(opacus_upper, rel=1e-6)
    assert lower < estimate < upper
    assert 0.01 <= upper - estimate <= 0.011  # eps_error, plus reading at δ - δ_error


def test_huge_epsilon_coarsens_the_grid_but_stays_an_upper_bound():
    # Full batch, σ = 0.3, 100 steps: a Gaussian with μ = 33.3; exact ε = 696.7778 at δ = 1e-5.
    # The default grid would need ~4.6M cells; capped at 2^21 its eps_error grows to ~0.03.
    lower, estimate, upper = prv_epsilon_bounds(((0.3, 1.0, 100),), 1e-5)

    assert estimate == pytest.approx(696.7778, abs=1e-3)
    assert 696.7778 <= upper <= 696.7778 + 0.05
    assert lower <= 696.7778


def survival_before_the_split(t, q, sigma):
    """``survival`` as it was until 2026-12-02: both formulas on every point, then picked."""
    t = np.asarray(t, dtype=np.float64)
    live = t > (math.log1p(-q) if q < 1.0 else -math.inf)
    tl = np.where(live, t, 1.0)
    with np.errstate(over="ignore", divide="ignore"):
        z_pos = tl - math.log(q) + np.log1p((q - 1.0) * np.exp(-np.abs(tl)))
        z_neg = np.log1p(np.expm1(np.minimum(tl, 0.0)) / q)
    z = np.where(tl > 0, z_pos, z_neg)
    scale = 2.0 * math.sqrt(2.0) * sigma
    tail = q / 2.0 * special.erfc((2.0 * sigma**2 * z - 1.0) / scale) + (
        1.0 - q
    ) / 2.0 * special.erfc((2.0 * sigma**2 * z + 1.0) / scale)
    return np.where(live, tail, 1.0)


@pytest.mark.parametrize(
    ("q", "sigma"), [(0.0808, 0.7379), (0.01, 0.3), (0.3, 5.0), (1.0, 1.0), (0.99, 2.0)]
)
def test_survival_gives_the_values_it_gave_before_bit_for_bit(q, sigma):
    # A calibrated σ is the end of a search on these values: they must not move by a bit.
    rng = np.random.default_rng(0)
    grid = np.linspace(-30.0, 30.0, 40_001)
    scattered = rng.uniform(-5.0, 40.0, 5_000)

    for t in (grid, scattered, np.array([0.0, -0.0, math.log1p(-min(q, 0.5))])):
        np.testing.assert_array_equal(survival(t, q, sigma), survival_before_the_split(t, q, sigma))


@pytest.mark.parametrize(("q", "sigma"), [(0.0808, 0.7379), (0.2, 0.7), (1.0, 2.0)])
def test_survival_at_one_point_is_the_array_value(q, sigma):
    points = [-3.0, math.log1p(-q) if q < 1 else -1.0, -1e-7, 0.0, 1e-9, 0.3, 4.0, 25.0, 800.0]
    points += list(np.random.default_rng(1).uniform(-1.0, 15.0, 500))

    for t in points:
        assert _survival_at(float(t), q, sigma) == survival(np.array([t]), q, sigma)[0], t


def test_history_groups_are_reused_across_calls_without_changing_epsilon(monkeypatch):
    from fedlora.privacy.accountants import prv

    calls = []
    real = prv._discretise
    monkeypatch.setattr(prv, "_discretise", lambda *a: calls.append(a[:2]) or real(*a))
    history = ((0.7379, 0.0808, 10), (0.7378, 0.0808, 10), (0.7377, 0.0808, 10))
    planned = [(0.7001, 0.0808, 20), (0.7002, 0.0808, 20)]  # same grid for both
    fresh = []
    for p in planned:
        prv.clear_group_cache()
        prv.prv_epsilon_bounds.cache_clear()
        fresh.append(prv.prv_epsilon_bounds(tuple(sorted((*history, p))), 1e-5))
    calls.clear()
    prv.clear_group_cache()
    prv.prv_epsilon_bounds.cache_clear()

    warm = [prv.prv_epsilon_bounds(tuple(sorted((*history, p))), 1e-5) for p in planned]

    assert warm == fresh  # to the bit
    # 3 history groups + 2 planned ones discretised, not 2 x 4.
    assert sorted(calls) == sorted({(q, s) for s, q, _ in (*history, *planned)})


def test_group_cache_stays_within_its_memory(monkeypatch):
    from fedlora.privacy.accountants import prv

    monkeypatch.setattr(prv, "GROUP_CACHE_BYTES", 4 * 2**20)
    prv.clear_group_cache()
    prv.prv_epsilon_bounds.cache_clear()

    for k in range(12):
        prv.prv_epsilon_bounds(((1.0 + k / 100, 0.1, 50),), 1e-5)

    assert 0 < prv._group_cache_bytes <= 4 * 2**20
    assert prv._group_cache_bytes == sum(g.nbytes for g, _ in prv._group_cache.values())
    prv.clear_group_cache()  # what is left was sized for a smaller budget


READ_OUT_CASES = [
    ((0.6772, 0.0808, 10),),
    ((0.7379, 0.0808, 10), (0.7378, 0.0808, 10), (0.659, 0.0808, 20)),
    ((1.2, 0.01, 500),),
    ((0.7, 0.2, 300),),
    ((3.0, 0.5, 4),),
    # A calibration's step down to σ = 0.094 (ε in the thousands): the grid is capped at 2^21
    ((0.0942, 0.0808, 10), (0.7377, 0.0808, 10), (0.7378, 0.0808, 10), (0.7379, 0.0808, 10)),
    ((2.0, 1.0, 1),),
]


@pytest.mark.parametrize("history", READ_OUT_CASES)
@pytest.mark.parametrize("hint", ["rdp", 0.0, "too-high"])
def test_the_read_out_is_the_packages_bit_for_bit_from_any_hint(history, hint, monkeypatch):
    """fedlora reads δ(ε) from the top of the grid only; the three ε must be what
    ``prv_accountant``'s ``compute_epsilon`` gives on the whole grid, to the bit, whether the
    hint at ε is three quarters of RDP's (the accountant's), 0, or above ε (the read-out
    must then go further down the grid)."""
    from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable

    from fedlora.privacy.accountants import prv

    compared = []
    real = prv.read_epsilon

    def both(pmf, domain, delta, delta_error, eps_error, given_hint=0.0):
        package = DiscretePrivacyRandomVariable(pmf, domain).compute_epsilon(
            delta, delta_error, eps_error
        )
        used = {"rdp": given_hint, "too-high": package[2] + 5.0}.get(hint, hint)
        ours = real(pmf, domain, delta, delta_error, eps_error, used)
        compared.append((len(pmf), ours, package))
        return ours

    monkeypatch.setattr(prv, "read_epsilon", both)
    prv.prv_epsilon_bounds.cache_clear()
    try:
        prv.prv_epsilon_bounds(history, 1e-5)
    finally:
        prv.prv_epsilon_bounds.cache_clear()

    (size, ours, package) = compared[0]
    assert ours == package, (size, ours, package)
    assert all(isinstance(x, float) for x in ours)
    if history[0][0] < 0.1:
        assert size == prv.DEFAULT_MAX_GRID


def test_the_read_out_refuses_what_the_package_refuses():
    from prv_accountant.domain import Domain

    from fedlora.privacy.accountants.prv import read_epsilon

    domain = Domain(-5.0, 5.0, 1000)
    pmf = np.full(1000, 1e-3)
    with pytest.raises(ValueError, match="Floating point errors"):
        read_epsilon(pmf, domain, 1e-17, 1e-20, 0.01)
    assert read_epsilon(pmf, domain, 0.0, 0.0, 0.01) == (math.inf, math.inf, math.inf)


@pytest.mark.parametrize(
    ("t_min", "t_max", "size", "shift"),
    [(-5.0, 5.0, 1000, 0.0), (-26.8, 26.81, 65536, 0.0123), (-0.3, 0.7, 2, -1e-3)],
)
def test_the_grid_suffix_is_the_packages_nodes_bit_for_bit(t_min, t_max, size, shift):
    """The read-out builds only the top of ``Domain.ts()`` (numpy's float64 linspace cast to
    long double); every node must be the package's, whatever the start."""
    from prv_accountant.domain import Domain

    from fedlora.privacy.accountants.prv import _grid_suffix

    domain = Domain(t_min, t_max, size).shift_right(shift)
    full = domain.ts()
    for start in sorted({0, 1, size // 3, size - 2, size - 1}):
        got = _grid_suffix(domain, start)
        assert got.dtype == np.longdouble and len(got) == size - start
        assert np.array_equal(got, full[start:]), start


def _suffix_epsilon_by_searchsorted(ts, pmf, start, targets):
    """The read-out as it was (and as the package does it): δ(ε) at every cell of the
    suffix, then ``np.searchsorted``."""
    t, p = ts[start:], pmf[start:]
    d1 = np.flip(np.flip(p).cumsum())
    d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
    ndelta = np.exp(t) * d2 - d1
    out = []
    for target in targets:
        i = int(np.searchsorted(ndelta, -target, side="left"))
        if i <= 0:
            return None
        out.append(np.log((d1[i] - target) / d2[i]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_crossings_are_where_searchsorted_puts_them_on_noisy_grids(seed):
    """The read-out visits only the cells numpy's binary search visits; on a pmf with an
    inverse FFT's noise (negative cells, δ(ε) not monotone in its last bits) it must stop
    at searchsorted's cell and give its three ε to the bit."""
    from prv_accountant.domain import Domain

    from fedlora.privacy.accountants.prv import _grid_suffix, _suffix_epsilon

    rng = np.random.default_rng(seed)
    size = int(rng.choice([2000, 4096, 30000]))
    domain = Domain(-12.0, 12.0, size)
    centres = np.linspace(-12.0, 12.0, size)
    pmf = np.exp(-0.5 * ((centres - rng.uniform(0.5, 3.0)) / rng.uniform(0.5, 2.0)) ** 2)
    pmf = pmf / pmf.sum() + rng.normal(0.0, 1e-17, size)  # the irfft's rounding noise
    delta = float(rng.choice([1e-5, 1e-6, 1e-3]))
    targets = (delta * 1.001, delta, delta * 0.999)
    ts = domain.ts()
    for start in (0, size // 4, size // 2):
        want = _suffix_epsilon_by_searchsorted(ts, pmf, start, targets)
        got = _suffix_epsilon(_grid_suffix(domain, start), pmf, start, targets)
        if want is None:
            assert got is None
        else:
            assert got is not None and [float(x) for x in got] == [float(x) for x in want]
            assert all(a == b for a, b in zip(got, want, strict=True))  # long doubles too
