"""The PRV accountant's own discretisation and composition against the prv_accountant package."""

import warnings

import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant import PRVAccountant as PackagePRV

from privacy.accountants.prv import _even_fast_len, prv_epsilon_bounds, survival


@pytest.mark.parametrize(("q", "sigma"), [(0.1, 1.0), (0.01, 0.7), (0.5, 3.0), (1.0, 1.0)])
def test_survival_is_one_minus_the_package_cdf(q, sigma):
    t = np.linspace(-6.0, 25.0, 2001)
    package = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)

    expected = 1.0 - np.asarray(package.cdf(t), dtype=np.float64)

    np.testing.assert_allclose(survival(t, q, sigma), expected, rtol=0, atol=1e-13)


def test_survival_below_the_support_is_one_and_far_out_is_zero():
    assert survival(np.array([np.log1p(-0.1) - 1e-9]), 0.1, 1.0)[0] == 1.0
    assert survival(np.array([800.0]), 0.1, 1.0)[0] == 0.0  # no overflow for large t


@pytest.mark.parametrize("n", [2, 3, 97, 387316, 1_000_001])
def test_even_fast_len(n):
    m = _even_fast_len(n)

    assert m >= n and m % 2 == 0
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    assert m == 1


@pytest.mark.parametrize(
    "groups",
    [
        ((1.0, 0.1, 101),),  # odd number of compositions: the other roll of the FFT result
        ((1.3, 0.2, 7), (0.9, 0.05, 12)),
    ],
)
def test_bounds_match_the_package(groups):
    delta = 1e-5
    prvs = [PoissonSubsampledGaussianMechanism(q, s) for s, q, _ in groups]
    counts = [n for _, _, n in groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = PackagePRV(
            prvs=prvs, max_self_compositions=counts, eps_error=0.01, delta_error=delta / 1000
        ).compute_epsilon(delta=delta, num_self_compositions=counts)

    ours = prv_epsilon_bounds(groups, delta)

    np.testing.assert_allclose(ours, package, rtol=2e-5, atol=1e-5)


def test_huge_epsilon_coarsens_the_grid_but_stays_an_upper_bound():
    # Full batch, σ = 0.3, 100 steps: a Gaussian with μ = 33.3; exact ε = 696.7778 at δ = 1e-5.
    # The default grid would need ~4.6M cells; capped at 2^21 its eps_error grows to ~0.03.
    lower, estimate, upper = prv_epsilon_bounds(((0.3, 1.0, 100),), 1e-5)

    assert estimate == pytest.approx(696.7778, abs=1e-3)
    assert 696.7778 <= upper <= 696.7778 + 0.05
    assert lower <= 696.7778
