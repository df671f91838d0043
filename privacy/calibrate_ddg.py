"""Noise calibration for the distributed discrete Gaussian: per-device σ for a device-level ε.

:func:`calibrate_ddg_noise` finds the smallest per-device σ (integer units) such that
a device's past DDG rounds plus ``participations`` more at (σ, n, Δ2, d) stay within
a target ε, by the device-level accountant of :mod:`.accountants.ddg`. ε is
decreasing in σ (both the Gaussian term Δ2/(√n σ) and the slack τ fall with σ), so
the search of :mod:`.calibrate` applies unchanged: start from a feasible σ, bracket,
secant steps to ``rtol``, round UP to 4 significant digits and check again, so the
claim ε ≤ target always holds for the σ returned.

:func:`ddg_noise_multiplier` is the τ = 0 limit, the continuous Gaussian bound: the
smallest z = √n σ / Δ2 with ``participations`` rounds at RDP α/(2z²) within the
target. It is solved in closed form order by order (the conversion is linear in the
RDP), and is the starting point of the exact search; an encoder can use it before it
knows the exact σ (with τ ≥ 0 the exact σ is never below z Δ2 / √n).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from fedlora.errors import BudgetExhaustedError
from fedlora.privacy.accountants.base import check_delta
from fedlora.privacy.accountants.ddg import DDGAccountant, rdp_ddg, rdp_of_ddg_history
from fedlora.privacy.accountants.rdp import DEFAULT_ORDERS, epsilon_from_rdp
from fedlora.privacy.calibrate import _check_count, _check_positive, _finish, _round_up, _solve
from fedlora.privacy.events import DDGEvent

MAX_DDG_NOISE_MULTIPLIER = 1e6
"""If even σ = this · Δ2 / √n cannot meet the target, the budget is exhausted."""

MIN_DDG_NOISE_STDDEV = 1e-3
"""The search never goes below this σ (integer units; far below any useful one)."""


def _gaussian_epsilon(z: float, participations: int, delta: float) -> float:
    alphas = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
    return epsilon_from_rdp(DEFAULT_ORDERS, participations * alphas / (2.0 * z * z), delta)


def ddg_noise_multiplier(target_epsilon: float, delta: float, participations: int) -> float:
    """Smallest z = √n·σ/Δ2 (rounded up to 4 significant digits) with ``participations``
    rounds of the continuous Gaussian bound α/(2z²) within ``target_epsilon`` at ``delta``.

    The τ = 0 limit of the DDG bound: the exact per-device σ is at least z·Δ2/√n.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    k = _check_count("participations", participations)
    alphas = np.asarray(DEFAULT_ORDERS, dtype=np.float64)
    # ε at order α is k·α/(2z²) + c_α (the conversion of .rdp); ε ≤ target at that α
    # exactly when z ≥ sqrt(k·α / (2·(target - c_α))), for target > c_α.
    c = np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
    room = target - c
    z_alpha = np.sqrt(k * alphas / (2.0 * np.where(room > 0, room, np.nan)))
    candidates = z_alpha[np.isfinite(z_alpha)]
    # The conversion also gives ε = 0 once RDP ≤ -log(1 - δ²) at some order (smallest α).
    z_kl = math.sqrt(k * float(alphas.min()) / (2.0 * -math.log1p(-(delta**2))))
    z = min(float(candidates.min()) if candidates.size else math.inf, z_kl)
    rounded = _round_up(z)
    while _gaussian_epsilon(rounded, k, delta) > target:  # pragma: no cover - float fuzz only
        rounded = _round_up(rounded * (1.0 + 1e-4))
    return rounded


def calibrate_ddg_noise(
    target_epsilon: float,
    delta: float,
    *,
    participations: int,
    survivors: int,
    l2_sensitivity: float,
    dimension: int,
    history: Iterable[DDGEvent] = (),
    rtol: float = 1e-3,
) -> float:
    """Smallest per-device σ (integer units, to ``rtol``, rounded up to 4 significant digits)
    such that ``history`` plus ``participations`` more rounds at (σ, ``survivors``,
    ``l2_sensitivity``, ``dimension``) have device-level ε ≤ ``target_epsilon`` at ``delta``.

    ``history`` holds this device's past :class:`DDGEvent` rounds (any other event is
    refused). Raises :class:`BudgetExhaustedError` if the history alone reaches the
    target or no σ up to :data:`MAX_DDG_NOISE_MULTIPLIER`·Δ2/√n meets it.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    k = _check_count("participations", participations)
    n = _check_count("survivors", survivors)
    l2 = _check_positive("l2_sensitivity", l2_sensitivity)
    d = _check_count("dimension", dimension)
    rtol = _check_positive("rtol", rtol)
    spent = DDGAccountant()
    spent.compose_many(history)
    rdp_spent = rdp_of_ddg_history(spent.history)
    eps_spent = spent.get_epsilon(delta)
    if eps_spent >= target:
        raise BudgetExhaustedError(
            f"device-level privacy budget exhausted: the rounds already aggregated spend "
            f"epsilon={eps_spent:.4g} of the target {target:.4g} (delta={delta:g})"
        )

    def eps(sigma: float) -> float:
        return epsilon_from_rdp(DEFAULT_ORDERS, rdp_spent + k * rdp_ddg(sigma, n, l2, d), delta)

    # τ ≥ 0 and the history only add ε, so the τ = 0 answer is a lower end; double up.
    per_z = l2 / math.sqrt(n)
    max_sigma = MAX_DDG_NOISE_MULTIPLIER * per_z
    hi = min(ddg_noise_multiplier(target, delta, k) * per_z, max_sigma)
    eps_hi = eps(hi)
    while eps_hi > target:
        if hi >= max_sigma:
            raise BudgetExhaustedError(
                f"device-level privacy budget exhausted: {k} more round(s) would take epsilon "
                f"to {eps_hi:.4g} > target {target:.4g} even at sigma {max_sigma:g}"
            )
        hi = min(hi * 2.0, max_sigma)
        eps_hi = eps(hi)
    min_sigma = min(MIN_DDG_NOISE_STDDEV, hi)
    return _finish(eps, target, _solve(eps, target, eps_spent, hi, eps_hi, min_sigma, rtol))
