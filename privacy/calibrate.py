"""Noise calibration: the smallest σ whose remaining rounds fit a device's ε budget.

ε is decreasing in σ, so the smallest σ with ``ε(history + rounds·steps at σ) ≤
target`` is found by a bracketed secant search (see :func:`_solve`): RDP (cheap,
looser) gives a starting point, then the chosen accountant refines it in ~6–8
evaluations. The answer is the feasible end of the final bracket (width rtol)
rounded UP to 4 significant digits and checked again, so the claim ε ≤ target
always holds for the σ returned.

A search costs 10–20 accountant evaluations, about 8 of them PRV: 0.27 s of CPU
per calibration on a default run, against 0.55 s before the accountant computed
the same values with less work (``bench/calibration.py``). The search itself is
kept as it is: σ is the end of its path, rounded up, and in 37 of the 50
calibrations of a default run (as the bench replays them) σ one 4-digit step lower
also meets the target, so another search (warm start, tighter bracket) would
return another σ.

A simulated fleet asks the same question many times: devices with as many records
and the same history calibrate the same σ. The answer depends only on the
arguments and on the history's mechanisms (σ, q, steps, δ of each event, in any
order: composition commutes), so it is memoised per process on exactly those
(:func:`_calibrate`, an LRU of :data:`CACHE_SIZE` entries); a hit returns the
very float a fresh search would. A simulation also shares answers between its
processes (``shared``: :mod:`fedlora.privacy.calibration_cache`), which is how the
calibration prefetch (:mod:`fedlora.simprefetch`) takes the search off the devices'
rounds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

from fedlora.errors import BudgetExhaustedError, PrivacyError
from fedlora.privacy.accountants.base import check_delta
from fedlora.privacy.accountants.registry import DEFAULT_ACCOUNTANT, epsilon_for, get_accountant
from fedlora.privacy.calibration_cache import SharedCalibrations
from fedlora.privacy.events import DPSGDEvent

MIN_NOISE_MULTIPLIER = 0.01
"""The search never goes below this σ (no useful DP-SGD run uses less)."""

MAX_NOISE_MULTIPLIER = 1e3
"""If even this σ cannot meet the target, the budget is exhausted."""

_MAX_ITERATIONS = 100

CACHE_SIZE = 4096
"""Calibrations remembered per process (a key is a few hundred bytes)."""


def epsilon_after(
    history: Iterable[DPSGDEvent],
    event: DPSGDEvent,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """ε at ``delta`` if ``event`` is added to ``history``: what a device checks before training."""
    return epsilon_for([*history, event], delta, accountant)


def _check_positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise PrivacyError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _round_up(x: float, digits: int = 4) -> float:
    """``x`` rounded up to ``digits`` significant digits."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def _solve(
    eps: Callable[[float], float],
    target: float,
    base: float,
    sigma: float,
    eps_sigma: float,
    min_sigma: float,
    rtol: float,
) -> float:
    """Smallest feasible σ (``eps(σ) <= target``) to ``rtol``, from a feasible ``sigma``.

    Works on ``x = log σ`` and ``y = log(ε(σ) - base)`` where ``base`` (< target)
    is the ε of the history alone: the planned rounds' share of ε falls roughly
    like a power of σ, so y is nearly linear in x and secant steps land close.
    First steps down until infeasible (extrapolating, overshooting by 30 %), then
    shrinks the bracket with secant guesses straddled by ±0.45·log(1+rtol), so a
    good guess closes it in two evaluations; two rounds in a row that do not
    halve it add a bisection step. Returns ``min_sigma`` if even that is feasible.
    """
    goal = math.log(target - base)
    floor = math.log(min_sigma)

    def y_of(e: float) -> float:
        return math.log(max(e - base, 1e-300))

    hi_x, hi_y = math.log(sigma), y_of(eps_sigma)
    lo_x: float | None = None
    recent = [(hi_x, hi_y)]

    def evaluate(x: float) -> bool:
        nonlocal hi_x, hi_y, lo_x
        e = eps(math.exp(x))
        recent[:] = [*recent[-1:], (x, y_of(e))]
        if e <= target:
            hi_x, hi_y = x, y_of(e)
            return True
        lo_x = x
        return False

    def secant(default_slope: float) -> float:
        (xa, ya), (xb, yb) = recent if len(recent) == 2 else (recent[0], recent[0])
        slope = (yb - ya) / (xb - xa) if xb != xa and yb != ya else default_slope
        return xb + (goal - yb) / slope

    # 1. Step down until infeasible: ε ∝ 1/σ as a first guess, then extrapolate.
    while lo_x is None:  # each step goes down by at least 5 % or reaches the floor
        if hi_x <= floor:
            return min_sigma
        step = min(max((hi_x - secant(default_slope=-1.0)) * 1.3, math.log(1.05)), math.log(10))
        evaluate(max(hi_x - step, floor))

    # 2. Shrink the bracket.
    half = math.log1p(rtol) * 0.45
    slow_rounds = 0
    for _ in range(_MAX_ITERATIONS):
        assert lo_x is not None
        width = hi_x - lo_x
        if width <= math.log1p(rtol):
            return math.exp(hi_x)
        guess = secant(default_slope=-1.0)
        if not math.isfinite(guess):
            guess = (lo_x + hi_x) / 2.0
        guess = min(max(guess, lo_x + half), hi_x - half)
        if evaluate(guess + half) and lo_x < guess - half:
            evaluate(guess - half)
        slow_rounds = slow_rounds + 1 if hi_x - lo_x > width / 2.0 else 0
        if slow_rounds == 2:  # secant is not converging here: bisect once
            evaluate((lo_x + hi_x) / 2.0)
            slow_rounds = 0
    raise PrivacyError("noise calibration did not converge")  # pragma: no cover


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    history: Iterable[DPSGDEvent] = (),
    accountant: str = DEFAULT_ACCOUNTANT,
    *,
    rtol: float = 1e-3,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    shared: SharedCalibrations | None = None,
) -> float:
    """Smallest σ (to ``rtol``, rounded up) so that ``history`` plus ``rounds`` more rounds of
    ``steps_per_round`` steps at rate ``sample_rate`` stay within ``target_epsilon`` at ``delta``.

    ``shared``: answers filed by the other processes of a simulation, read before
    searching; a search's answer is filed there.

    Raises :class:`BudgetExhaustedError` if ``history`` alone already reaches the
    target or no σ up to ``max_noise_multiplier`` meets it.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    steps = _check_count("steps_per_round", steps_per_round) * _check_count("rounds", rounds)
    rtol = _check_positive("rtol", rtol)
    max_sigma = _check_positive("max_noise_multiplier", max_noise_multiplier)
    get_accountant(accountant)  # an unknown name fails here, before any work
    mechanisms = tuple(
        sorted((e.noise_multiplier, e.sample_rate, e.steps, e.delta) for e in history)
    )
    key = (target, delta, sample_rate, steps, rounds, mechanisms, accountant, rtol, max_sigma)
    if shared is None:
        return _calibrate(*key)
    sigma = shared.get(key)
    if sigma is None:
        sigma = _calibrate(*key)
        shared.put(key, sigma)
    return sigma


def device_budget(run_epsilon: float, own: float | None) -> float:
    """The ε a device trains to: the run's, or its own budget where that is smaller."""
    if own is not None and float(own) > 0:
        return min(float(own), run_epsilon)
    return run_epsilon


@functools.lru_cache(maxsize=CACHE_SIZE)
def _calibrate(
    target: float,
    delta: float,
    sample_rate: float,
    steps: int,
    rounds: int,
    mechanisms: tuple[tuple[float, float, int, float], ...],
    accountant: str,
    rtol: float,
    max_sigma: float,
) -> float:
    """:func:`calibrate_noise_multiplier` on checked arguments, the history as mechanisms.

    Errors are not cached (an exhausted budget is searched again, and said again).
    """
    spent = [
        DPSGDEvent(
            device="history",
            round=i + 1,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=n,
            delta=d,
        )
        for i, (sigma, q, n, d) in enumerate(mechanisms)
    ]

    def eps_with(name: str) -> Callable[[float], float]:
        def eps(sigma: float) -> float:
            planned = DPSGDEvent(
                device="calibration",
                round=0,
                noise_multiplier=float(sigma),
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
            )
            return epsilon_for([*spent, planned], delta, name)

        return eps

    eps = eps_with(accountant)
    eps_spent = epsilon_for(spent, delta, accountant)
    if eps_spent >= target:
        raise BudgetExhaustedError(
            f"privacy budget exhausted: the rounds already trained spend epsilon={eps_spent:.4g} "
            f"of the target {target:.4g} (delta={delta:g})"
        )
    min_sigma = min(MIN_NOISE_MULTIPLIER, max_sigma)

    # 1. Bracket with RDP (cheap); for the RDP accountant this is the answer.
    rdp = eps_with("rdp")
    rdp_max = rdp(max_sigma)
    if accountant == "rdp":
        if rdp_max > target:
            raise _unreachable(rounds, rdp_max, target, max_sigma)
        sigma = _solve(rdp, target, eps_spent, max_sigma, rdp_max, min_sigma, rtol)
        return _finish(rdp, target, sigma)
    hi = max_sigma
    rdp_spent = epsilon_for(spent, delta, "rdp")
    if rdp_max <= target and rdp_spent < target:
        hi = _solve(rdp, target, rdp_spent, max_sigma, rdp_max, min_sigma, rtol=0.02)

    # 2. Refine with the chosen accountant from the RDP answer.
    eps_hi = eps(hi)
    while eps_hi > target:  # the chosen accountant is looser here (rare: tiny ε)
        if hi >= max_sigma:
            raise _unreachable(rounds, eps_hi, target, max_sigma)
        hi = min(hi * 1.25, max_sigma)
        eps_hi = eps(hi)
    return _finish(eps, target, _solve(eps, target, eps_spent, hi, eps_hi, min_sigma, rtol))


def _unreachable(
    rounds: int, eps_max: float, target: float, max_sigma: float
) -> BudgetExhaustedError:
    return BudgetExhaustedError(
        f"privacy budget exhausted: {rounds} more round(s) would take epsilon to "
        f"{eps_max:.4g} > target {target:.4g} even at noise multiplier {max_sigma:g}"
    )


def _finish(eps: Callable[[float], float], target: float, sigma: float) -> float:
    """``sigma`` rounded up to 4 significant digits if ε still checks out there, else ``sigma``."""
    rounded = _round_up(sigma)
    if rounded != sigma and eps(rounded) <= target:
        return rounded
    return sigma
