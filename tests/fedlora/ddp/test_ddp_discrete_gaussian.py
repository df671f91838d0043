"""fedlora.ddp.discrete_gaussian: the sampler against the exact N_ℤ(0, σ²) pmf."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from fedlora.ddp import discrete_gaussian as dg
from fedlora.errors import ConfigError
from fedlora.privacy.noise import SecureRandom, SeededRandom

DRAWS = 200_000


def _exact_moments(sigma: float) -> tuple[float, float]:
    edge = int(40 * sigma) + 40
    xs = np.arange(-edge, edge + 1)
    p = dg.pmf(sigma, xs)
    return float((xs**2 * p).sum()), float((xs**4 * p).sum())


@pytest.mark.parametrize("sigma", [0.5, 2.0, 20.0])
def test_mean_and_variance_match_the_exact_distribution(sigma):
    var, fourth = _exact_moments(sigma)
    samples = dg.sample_discrete_gaussian(sigma, DRAWS, SeededRandom(int(sigma * 10))).astype(float)

    mean_se = np.sqrt(var / DRAWS)
    var_se = np.sqrt((fourth - var**2) / DRAWS)
    assert abs(samples.mean()) < 4 * mean_se
    assert abs(samples.var() - var) < 4 * var_se
    assert dg.variance(sigma) == pytest.approx(var)


def test_the_exact_variance_is_below_sigma_squared_for_small_sigma():
    weights = {k: np.exp(-2.0 * k * k) for k in range(1, 5)}  # exp(−k²/(2·0.5²))
    by_hand = 2 * sum(k * k * w for k, w in weights.items()) / (1 + 2 * sum(weights.values()))

    assert dg.variance(0.5) == pytest.approx(by_hand, rel=1e-12)
    assert dg.variance(0.5) < 0.9 * 0.25
    assert dg.variance(20.0) == pytest.approx(400.0, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 20.0])
def test_chi_square_goodness_of_fit(sigma):
    samples = dg.sample_discrete_gaussian(sigma, DRAWS, SeededRandom(100 + int(sigma)))
    edge = int(6 * sigma) + 3
    support = np.arange(-edge, edge + 1)
    expected = dg.pmf(sigma, support) * DRAWS
    keep = support[expected >= 5]  # the rest of the mass goes to one tail cell
    observed = np.array([(samples == k).sum() for k in keep] + [0])
    expected_kept = np.append(dg.pmf(sigma, keep) * DRAWS, 0.0)
    observed[-1] = DRAWS - observed[:-1].sum()
    expected_kept[-1] = DRAWS - expected_kept[:-1].sum()
    if expected_kept[-1] < 5:  # the tails are too light for a cell of their own
        observed, expected_kept = observed[:-1], expected_kept[:-1]
        expected_kept *= observed.sum() / expected_kept.sum()

    _, p_value = stats.chisquare(observed, expected_kept)

    assert p_value > 1e-3


def test_131072_draws_at_sigma_100_take_well_under_a_second():
    source = SecureRandom()
    start = time.perf_counter()
    samples = dg.sample_discrete_gaussian(100.0, 131_072, source)
    elapsed = time.perf_counter() - start

    assert samples.shape == (131_072,) and samples.dtype == np.int64
    assert elapsed < 0.5


def test_seeded_draws_repeat_and_secure_draws_do_not():
    a = dg.sample_discrete_gaussian(3.0, 1000, SeededRandom(9))
    b = dg.sample_discrete_gaussian(3.0, 1000, SeededRandom(9))
    c = dg.sample_discrete_gaussian(3.0, 1000, SecureRandom())
    d = dg.sample_discrete_gaussian(3.0, 1000, SecureRandom())

    assert np.array_equal(a, b)
    assert not np.array_equal(c, d)


def test_sigma_zero_is_no_noise():
    assert np.array_equal(dg.sample_discrete_gaussian(0, 5, SeededRandom(0)), np.zeros(5))


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), "2", True])
def test_a_bad_sigma_is_refused(sigma):
    with pytest.raises(ConfigError, match="sigma"):
        dg.sample_discrete_gaussian(sigma, 5, SeededRandom(0))
