"""The one-run ε lower bound (Steinke, Nasr & Jagielski 2023) against independent math."""

import math
from fractions import Fraction

import numpy as np
import pytest

from fedlora.errors import ConfigError
from fedlora.privacy.audit import (
    audit_scores,
    correct_guesses,
    epsilon_lower_bound,
    guess_plan,
    max_lower_bound,
    p_value,
)


def brute_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2's bound with exact binomial sums (math.comb, Fractions of the float q)."""
    q = Fraction(math.exp(eps) / (1 + math.exp(eps)))

    def f(t: int) -> Fraction:  # P[Binomial(r, q) >= t]
        return sum(
            (math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(t, 0), r + 1)),
            Fraction(0),
        )

    slope = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, float(f(v) + 2 * m * Fraction(delta) * slope))


def brute_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest ε on a 1e-3 grid whose brute-force p-value is below 1 − confidence
    (the p-value grows with ε: found by halving the grid's index range)."""
    lo, hi = 0, 8000  # grid indices: ε = i / 1000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if brute_p_value(m, r, v, mid / 1000, delta) < 1 - confidence:
            lo = mid
        else:
            hi = mid
    return lo / 1000


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (20, 10, 9, 1.0, 1e-5),
        (20, 10, 9, 1.0, 0.01),  # a large δ: the δ term dominates
        (30, 30, 30, 2.0, 1e-3),
        (40, 12, 6, 0.5, 1e-5),
        (25, 25, 0, 1.0, 1e-5),
    ],
)
def test_p_value_matches_exact_sums(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(brute_p_value(m, r, v, eps, delta), 1e-9)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [(30, 20, 19, 1e-5), (30, 30, 30, 1e-3), (40, 20, 16, 0.0), (24, 24, 20, 1e-5)],
)
def test_lower_bound_matches_grid_search(m, r, v, delta):
    expected = brute_lower_bound(m, r, v, delta, 0.95)
    assert expected > 0
    assert epsilon_lower_bound(m, r, v, delta, 0.95) == pytest.approx(expected, abs=1.01e-3)


def test_all_correct_without_delta_has_a_closed_form():
    # p = q^r: the bound is logit(β^(1/r)), β = 1 − confidence.
    for r, conf in ((100, 0.95), (1000, 0.95), (1000, 0.99)):
        q = (1 - conf) ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, conf) == pytest.approx(
            math.log(q / (1 - q)), rel=1e-9
        )
    # 1000 perfect guesses: about 5.81 (the paper's "ln(m)"-sized ceiling)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0, 0.95) == pytest.approx(5.8091, abs=1e-4)


def test_the_ceiling_grows_with_canaries_and_delta_lowers_it():
    assert max_lower_bound(100, 1e-5, 0.95) == pytest.approx(3.4902, abs=1e-4)
    assert max_lower_bound(1000, 1e-5, 0.95) == pytest.approx(5.7823, abs=1e-4)
    assert max_lower_bound(10_000, 1e-5, 0.95) == pytest.approx(7.8343, abs=1e-4)
    assert max_lower_bound(10_000, 0.0, 0.95) == pytest.approx(8.1130, abs=1e-4)


def test_chance_level_guessing_gives_zero():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound(1000, 200, 0, 1e-5, 0.95) == 0.0


def test_the_bound_holds_for_randomized_response():
    # An exactly ε-DP mechanism: each canary's guess is right w.p. e^ε/(1+e^ε). The audit
    # must exceed ε in at most 5% of trials (here it is far rarer: the bound is loose).
    rng = np.random.default_rng(7)
    eps, m, trials = 1.0, 400, 300
    right = rng.random((trials, m)) < math.exp(eps) / (1 + math.exp(eps))
    over = sum(epsilon_lower_bound(m, m, int(row.sum()), 1e-5, 0.95) > eps for row in right)
    assert over <= 0.05 * trials
    # and it has power there: the median bound is a good part of ε
    bounds = [epsilon_lower_bound(m, m, int(row.sum()), 1e-5, 0.95) for row in right[:30]]
    assert 0.5 < float(np.median(bounds)) < eps


def test_correct_guesses_counts_top_and_bottom():
    scores = [0.9, 0.1, 0.5, 0.8, 0.2, 0.3]
    included = [True, False, False, True, True, False]
    # top 2 (0.9, 0.8) both in: 2 right; bottom 2 (0.1, 0.2): one out, one in: 1 right
    assert correct_guesses(scores, included, 2, 2) == 3
    assert correct_guesses(scores, included, 0, 3) == 2  # 0.1, 0.2, 0.3: out, in, out
    with pytest.raises(ConfigError):
        correct_guesses(scores, included, 4, 3)
    with pytest.raises(ConfigError):
        correct_guesses([math.nan, 0.0], [True, False], 1, 1)


def test_guess_plan_and_bonferroni():
    assert guess_plan(100) == (5, 12, 25, 50)
    assert guess_plan(4) == (1, 2)
    scores = np.arange(100.0)
    result = audit_scores(scores, scores >= 50, 1e-5, 0.95)
    # perfect separation: the widest k wins, tested at 1 − 0.05/4
    assert (result.k_plus, result.guesses, result.correct) == (50, 100, 100)
    assert result.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(100, 100, 100, 1e-5, 1 - 0.05 / 4)
    )
    assert result.max_possible == result.epsilon_lower_bound
    assert result.included == 50
    assert [t["k"] for t in result.to_dict()["tried"]] == [5, 12, 25, 50]


def test_refuses_bad_input():
    with pytest.raises(ConfigError):
        p_value(10, 11, 3, 1.0, 1e-5)
    with pytest.raises(ConfigError):
        epsilon_lower_bound(10, 10, 3, 1e-5, 1.0)
    with pytest.raises(ConfigError):
        p_value(10, 10, 3, 1.0, 1.5)
    with pytest.raises(ConfigError):
        audit_scores([1.0], [True], 1e-5)
