"""A lower bound on ε from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The audit inserts each of ``m`` canaries into the training data independently with
probability ½, trains once, scores every canary (higher: more likely trained on),
then guesses "in" for the ``k+`` highest scores, "out" for the ``k−`` lowest and
abstains on the rest. If the training is (ε, δ)-DP with respect to each canary, the
number ``W`` of correct guesses out of ``r = k+ + k−`` is stochastically dominated
by Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 5.2):

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i ≥ 1} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v].

:func:`p_value` is that right-hand side. The audit's ε lower bound
(:func:`epsilon_lower_bound`) is the largest ε whose p-value for the observed ``v`` is
below ``1 − confidence``: a training run that really were (ε', δ)-DP for any ε' up to
it would have produced that many correct guesses with probability under
``1 − confidence``. It is a *lower* bound: it says the run is no more private than
that, never that it is as private as claimed; weak canaries or a weak score give a
small bound whatever the truth.

A run with ``m`` canaries can show at most :func:`max_lower_bound` (every guess right),
about ``ln(m)`` less a constant at δ = 1e-5: a claim above that cannot be refuted
with ``m`` canaries. Choosing ``k`` after looking at the scores would spend the
confidence several times, so :func:`audit_scores` tries a few ``k`` fixed in
advance and splits ``1 − confidence`` evenly among them (Bonferroni).

numpy and scipy only; no torch, no Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from fedlora.errors import ConfigError

#: Fractions of the canaries the audit guesses on, half "in" (top), half "out" (bottom).
GUESS_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
DEFAULT_CONFIDENCE = 0.95
_BISECT_STEPS = 60
_EPS_CAP = 1e3  # no finite number of guesses refutes more than this


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 ≤ correct ≤ guesses ≤ canaries, got {v}, {r}, {m}")


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ConfigError(f"δ must be in [0, 1), got {delta}")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v of r guesses correct] for an (ε, δ)-DP run with m canaries."""
    _check_counts(m, r, v)
    _check_delta(delta)
    if not epsilon >= 0:
        raise ConfigError(f"ε must be ≥ 0, got {epsilon}")
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))  # accuracy of ε-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[B ≥ v]
    if delta == 0.0:
        return min(1.0, tail)
    # (f(v − i) − f(v)) / i = P[v − i ≤ B ≤ v − 1] / i, for i = 1 … v (beyond v it only falls)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v−1], P[B = v−2], …
    slope = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slope)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest ε (to about 1e-12 relative) whose :func:`p_value` is below 1 − confidence.

    0 when even ε = 0 cannot be rejected. Bisection from below: the value returned
    always has a p-value under ``1 − confidence`` (or is 0).
    """
    _check_counts(m, r, v)
    _check_delta(delta)
    _check_confidence(confidence)
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_CAP:
            return lo
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def max_lower_bound(m: int, delta: float, confidence: float) -> float:
    """The most m canaries can show: every canary guessed, every guess right."""
    return epsilon_lower_bound(m, m, m, delta, confidence)


def correct_guesses(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_plus: int,
    k_minus: int,
) -> int:
    """How many of the guesses "in" for the k+ highest scores and "out" for the k− lowest
    are right (ties broken by canary order, so the count does not depend on luck)."""
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(included, dtype=bool)
    if s.shape != b.shape or s.ndim != 1:
        raise ConfigError(f"scores and inclusions must be two equal 1-d arrays, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ConfigError("every canary score must be finite")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > s.size:
        raise ConfigError(f"k+ = {k_plus} and k− = {k_minus} must fit in {s.size} canaries")
    order = np.argsort(s, kind="stable")  # ascending
    top = order[s.size - k_plus :] if k_plus else order[:0]
    bottom = order[:k_minus]
    return int(np.sum(b[top]) + np.sum(~b[bottom]))


def guess_plan(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> tuple[int, ...]:
    """k (= k+ = k−) for each fraction of the m canaries guessed on, distinct, ≥ 1."""
    ks = sorted({max(1, int(f * m) // 2) for f in fractions})
    return tuple(k for k in ks if 2 * k <= m)


@dataclass(frozen=True)
class AuditResult:
    """What one audit shows; ``epsilon_lower_bound`` holds at ``confidence`` overall."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    #: every k tried (k+ = k− = k) and the bound each gave at the split confidence
    tried: tuple[tuple[int, int, float], ...]
    #: the largest bound these canaries could have shown (every guess right)
    max_possible: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tried"] = [{"k": k, "correct": c, "epsilon_lower_bound": e} for k, c, e in self.tried]
        return out


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditResult:
    """The one-run ε lower bound of canaries with these scores and true inclusions.

    Each k of :func:`guess_plan` is tested at confidence ``1 − (1 − confidence)/len(ks)``;
    the result is the best of them (with its guesses and correct count).
    """
    _check_delta(delta)
    _check_confidence(confidence)
    m = len(scores)
    ks = guess_plan(m, fractions)
    if not ks:
        raise ConfigError(f"an audit needs at least 2 canaries, got {m}")
    each = 1.0 - (1.0 - confidence) / len(ks)
    tried = []
    for k in ks:
        v = correct_guesses(scores, included, k, k)
        tried.append((k, v, epsilon_lower_bound(m, 2 * k, v, delta, each)))
    k, v, eps = max(tried, key=lambda t: (t[2], -t[0]))
    ceiling = max(epsilon_lower_bound(m, 2 * kk, 2 * kk, delta, each) for kk in ks)
    return AuditResult(
        epsilon_lower_bound=eps,
        confidence=confidence,
        delta=delta,
        canaries=m,
        included=int(np.sum(np.asarray(included, dtype=bool))),
        guesses=2 * k,
        correct=v,
        k_plus=k,
        k_minus=k,
        tried=tuple(tried),
        max_possible=ceiling,
    )
