"""Weighted averaging and validation of adapter updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import UpdateError
from fedlora.server.aggregate import apply_update, validate_update, weighted_mean


def test_weighted_mean_matches_hand_computed_values():
    u1 = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    u2 = [np.array([3.0, -2.0], np.float32), np.array([[4.0]], np.float32)]
    u3 = [np.array([0.0, 0.5], np.float32), np.array([[-1.0]], np.float32)]
    got = weighted_mean([(u1, 10), (u2, 30), (u3, 60)])
    # (10·1 + 30·3 + 60·0)/100 = 1.0 ; (10·2 − 30·2 + 60·0.5)/100 = −0.1 ; (0 + 120 − 60)/100 = 0.6
    np.testing.assert_allclose(got[0], [1.0, -0.1], rtol=1e-6)
    np.testing.assert_allclose(got[1], [[0.6]], rtol=1e-6)
    assert all(a.dtype == np.float32 for a in got)


def test_weighted_mean_of_identical_updates_is_that_update():
    u = [np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)]
    np.testing.assert_allclose(weighted_mean([(u, 5), (u, 7)])[0], u[0], rtol=1e-6)


def test_weighted_mean_refuses_zero_total_weight():
    with pytest.raises(UpdateError, match="no examples"):
        weighted_mean([([np.zeros(2, np.float32)], 0)])


def test_apply_update_adds():
    g = [np.ones(3, np.float32)]
    np.testing.assert_array_equal(apply_update(g, [np.array([1, 2, 3], np.float32)])[0], [2, 3, 4])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ([np.zeros((2, 3), np.float32)], "has 1 tensors"),
        ([np.zeros((2, 3), np.float32), np.zeros((4,), np.float32)], "shape"),
        ([np.zeros((2, 3), np.float64), np.zeros((3,), np.float32)], "dtype"),
        ([np.full((2, 3), np.nan, np.float32), np.zeros((3,), np.float32)], "NaN or Inf"),
        ([np.zeros((2, 3), np.float32), np.array([0, np.inf, 0], np.float32)], "NaN or Inf"),
    ],
)
def test_validate_update_rejects_malformed(arrays, match):
    with pytest.raises(UpdateError, match=match):
        validate_update(arrays, [(2, 3), (3,)])


def test_validate_update_accepts_well_formed():
    validate_update([np.zeros((2, 3), np.float32), np.ones(3, np.float32)], [(2, 3), (3,)])
