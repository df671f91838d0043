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
