"""SecAgg+'s share graph: degree k ≈ c·log₂ n and a majority threshold, set by the dropout rate."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from fedlora.server.secagg_graph import (
    FAILURE_BITS,
    degree_factor,
    majority,
    share_graph,
    sparse_degree,
)


@pytest.mark.parametrize(
    ("n", "dropout_rate", "graph"),
    [
        (10, 0.1, (10, 6)),  # no smaller k meets the bound: the full graph
        (20, 0.1, (20, 11)),
        (50, 0.1, (33, 17)),
        (100, 0.1, (35, 18)),
        (1000, 0.1, (39, 20)),
        (10_000, 0.1, (43, 22)),
        (100, 0.2, (75, 38)),
        (1000, 0.2, (85, 43)),
        (100, 0.3, (100, 51)),
        (1000, 0.3, (213, 107)),
    ],
)
def test_degree_and_threshold(n, dropout_rate, graph):
    assert share_graph(n, None, None, dropout_rate) == graph


@pytest.mark.parametrize("dropout_rate", [0.0, 0.1, 0.2, 0.3, 0.45])
@pytest.mark.parametrize("n", [30, 100, 1000])
def test_the_degree_is_the_smallest_that_survives_the_dropout_rate(n, dropout_rate):
    k = sparse_degree(n, dropout_rate)
    bound = 2.0**-FAILURE_BITS

    def fails(k: int) -> float:  # some device has fewer than t surviving other holders
        return n * binom.cdf(majority(k) - 1, k - 1, 1 - dropout_rate)

    assert k == n or (k % 2 == 1 and fails(k) <= bound)
    assert k - 2 < 3 or fails(k - 2) > bound


def test_the_degree_grows_like_log_n_not_n():
    degrees = [sparse_degree(n, 0.1) for n in (1000, 10_000, 100_000)]

    assert degrees == sorted(degrees) and degrees[-1] < 60
    assert all(2 < degree_factor(n) < 4 for n in (1000, 10_000, 100_000))
    assert sparse_degree(1000, 0.1) < sparse_degree(1000, 0.2) < sparse_degree(1000, 0.3)


@pytest.mark.parametrize(
    ("n", "num_shares", "threshold", "graph"),
    [
        (20, 1.0, 0.6, (20, 12)),  # the full graph, as every config before version 5
        (3, 1.0, 0.6, (3, 2)),
        (20, 0.5, 0.6, (11, 7)),  # Flower: rounded, made odd
        (4, 0.25, 0.6, (4, 2)),  # Flower: 2 or fewer means everyone
        (20, 1.0, None, (20, 11)),  # full graph, majority threshold
        (1000, None, 0.6, (39, 23)),  # sparse graph, a fraction of its shares
    ],
)
def test_fractions_keep_flowers_meaning(n, num_shares, threshold, graph):
    assert share_graph(n, num_shares, threshold, 0.1) == graph


def test_a_majority_of_two_or_more():
    assert [majority(k) for k in (2, 3, 4, 5, 33)] == [2, 2, 3, 3, 17]
    assert math.isclose(degree_factor(1000), 39 / math.log2(1000))


def test_dropout_rate_of_half_or_more_is_refused():
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 0.5\)"):
        sparse_degree(100, 0.5)
