"""The RDP accountant's row-wise log-sum-exp gives SciPy's values to the bit.

σ calibration's search path, and so the σ a device trains with, depends on every
bit of the RDP bracket, so the lean version must not move a single ulp.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from fedlora.privacy.accountants import rdp


def _same(a: np.ndarray) -> None:
    with np.errstate(all="ignore"):
        want = special.logsumexp(a, axis=1)
    got = rdp._logsumexp_rows(a)
    assert got.shape == want.shape
    # Bit for bit (NaN where SciPy gives NaN).
    assert np.array_equal(got.view(np.int64), want.view(np.int64)), (got, want)


@pytest.mark.parametrize("seed", range(20))
def test_random_tables_with_ties_and_infinities(seed):
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 60)), int(rng.integers(1, 1100))
    a = rng.normal(0, float(rng.choice([1e-3, 1.0, 50.0, 800.0])), size=(rows, cols))
    a[rng.random(a.shape) < 0.3] = -np.inf  # masked series terms
    a[:, 0] = a.max(axis=1)  # ties at the maximum, as the series has
    if rows > 3:
        a[1] = -np.inf  # an all-masked row
        a[2, :2] = np.inf  # overflowing terms
        a[3, -1] = np.nan
    _same(a)


def test_huge_and_tiny_rows_overflow_and_underflow_like_scipy():
    a = np.array(
        [[700.0, 710.0, 720.0], [-745.0, -750.0, -800.0], [1e308, 1e308, 0.0], [0.0, 0.0, 0.0]]
    )
    _same(a)


def test_rdp_values_are_scipys_across_rates_and_noise(monkeypatch):
    orders = rdp.DEFAULT_ORDERS
    rates, sigmas = (1e-4, 0.01, 0.077, 0.25, 0.5, 0.99), (0.1, 0.5, 0.85, 3.0, 40.0)
    grid = [(q, s) for q in rates for s in sigmas]
    lean = {k: rdp._rdp_cached.__wrapped__(*k, orders).copy() for k in grid}
    monkeypatch.setattr(rdp, "_logsumexp_rows", lambda a: special.logsumexp(a, axis=1))
    for k in grid:
        ref = rdp._rdp_cached.__wrapped__(*k, orders)
        assert np.array_equal(lean[k], ref, equal_nan=True), k


@pytest.mark.parametrize("seed", range(8))
def test_integer_orders_summed_short_give_the_full_tables_bits(seed):
    """The default integer orders run to 1024, but 62 of 66 series end by 63: those are
    summed in a table 64 wide, not 1025. numpy's pairwise sums must make that the same
    sum to the bit (a row's terms all in its first block of 128); this compares the two
    layouts over random rates and noise, from tiny σ (terms that overflow) to large."""
    alphas = np.asarray([a for a in rdp.DEFAULT_ORDERS if a == int(a)], dtype=np.float64)
    width = int(alphas.max()) + 1
    assert width > 128 and (alphas + 1 <= 64).sum() == 62 == len(alphas) - 4  # split
    rng = np.random.default_rng(seed)
    for _ in range(200):
        q = float(rng.choice([rng.uniform(1e-6, 1e-3), rng.uniform(1e-3, 0.999)]))
        sigma = float(np.exp(rng.uniform(np.log(0.02), np.log(200.0))))
        got = rdp._log_a_int(q, sigma, alphas)
        want = rdp._log_a_int_table(q, sigma, alphas, width)
        assert np.array_equal(got.view(np.int64), want.view(np.int64)), (q, sigma)


def test_orders_that_all_fit_one_block_keep_their_single_table():
    """Nothing to split when the longest series fits numpy's first block (or all are long):
    the one table is the answer."""
    for orders in ([2.0, 5.0, 63.0], [128.0, 256.0]):
        alphas = np.asarray(orders)
        got = rdp._log_a_int(0.05, 0.9, alphas)
        want = rdp._log_a_int_table(0.05, 0.9, alphas, int(alphas.max()) + 1)
        assert np.array_equal(got.view(np.int64), want.view(np.int64))
