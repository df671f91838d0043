"""Per-device σ of the distributed discrete Gaussian for a device-level ε budget."""

import logging
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedlora.errors import BudgetExhaustedError, PrivacyError
from fedlora.privacy import calibrate_ddg_noise, ddg_noise_multiplier, epsilon_for_device
from fedlora.privacy.accountants.rdp import DEFAULT_ORDERS
from tests.privacy._helpers import ddg_event, ddg_rounds, event

SETTING = {"survivors": 10, "l2_sensitivity": 1.0, "dimension": 2**16}


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("absl").setLevel(logging.ERROR)


def epsilon_at(sigma, participations, history=(), delta=1e-5, **setting):
    setting = SETTING | setting
    planned = [
        ddg_event(
            round=1000 + r,
            noise_stddev=float(sigma),
            survivors=setting["survivors"],
            l2_sensitivity=setting["l2_sensitivity"],
            dimension=setting["dimension"],
        )
        for r in range(participations)
    ]
    return epsilon_for_device([*history, *planned], delta)


def step_below(x):
    """``x`` one step lower in its 4th significant digit."""
    return x - 10.0 ** (math.floor(math.log10(x)) - 3)


@pytest.mark.parametrize(
    ("target", "participations", "setting"),
    [
        (1.0, 10, {}),
        (4.0, 50, {}),
        (1.0, 10, {"l2_sensitivity": 0.1}),  # σ ≈ 1: τ decides it
        (8.0, 1, {"survivors": 1, "l2_sensitivity": 3.0, "dimension": 1}),
        (2.0, 20, {"survivors": 100, "l2_sensitivity": 2**12 * 1.0}),
    ],
)
def test_sigma_meets_the_target_and_is_minimal_to_rtol(target, participations, setting):
    args = SETTING | setting

    sigma = calibrate_ddg_noise(1.0 * target, 1e-5, participations=participations, **args)

    assert sigma == float(f"{sigma:.4g}")  # 4 significant digits
    assert epsilon_at(sigma, participations, **setting) <= target
    assert epsilon_at(sigma * (1 - 2.5e-3), participations, **setting) > target  # rtol + rounding


def test_with_a_tight_rtol_one_four_digit_step_lower_misses_the_target():
    sigma = calibrate_ddg_noise(1.0, 1e-5, participations=10, rtol=1e-7, **SETTING)

    assert epsilon_at(sigma, 10) <= 1.0 < epsilon_at(step_below(sigma), 10)


def test_tau_makes_the_exact_sigma_larger_than_the_gaussian_limit():
    # Δ2 = 0.1: the τ = 0 answer is σ ≈ 0.405, where τ·d is huge; the exact σ is ≈ 1.05.
    z = ddg_noise_multiplier(1.0, 1e-5, 10)
    sigma = calibrate_ddg_noise(1.0, 1e-5, participations=10, **(SETTING | {"l2_sensitivity": 0.1}))

    assert sigma > 2.0 * z * 0.1 / math.sqrt(10)
    assert sigma == pytest.approx(1.053, abs=1e-3)


def test_where_tau_vanishes_sigma_is_the_gaussian_limit():
    z = ddg_noise_multiplier(1.0, 1e-5, 10)

    sigma = calibrate_ddg_noise(1.0, 1e-5, participations=10, **SETTING)  # σ ≈ 4: τ ≈ 1e-68

    assert sigma == pytest.approx(z * 1.0 / math.sqrt(10), rel=2e-3)


def test_more_participations_need_more_noise():
    few = calibrate_ddg_noise(1.0, 1e-5, participations=5, **SETTING)
    many = calibrate_ddg_noise(1.0, 1e-5, participations=50, **SETTING)

    assert many > 2.0 * few


def test_history_needs_more_noise_and_is_counted():
    history = ddg_rounds(5, noise_stddev=8.0, **SETTING)
    fresh = calibrate_ddg_noise(1.0, 1e-5, participations=5, **SETTING)

    sigma = calibrate_ddg_noise(1.0, 1e-5, participations=5, history=history, **SETTING)

    assert sigma > fresh
    assert epsilon_at(sigma, 5, history) <= 1.0 < epsilon_at(sigma * (1 - 2.5e-3), 5, history)


def test_more_survivors_need_less_noise_per_device():
    ten = calibrate_ddg_noise(1.0, 1e-5, participations=10, **SETTING)
    hundred = calibrate_ddg_noise(1.0, 1e-5, participations=10, **(SETTING | {"survivors": 100}))

    # √n·σ is what the Gaussian part needs, but τ grows with n: at σ ≈ 1.28 its first
    # term (e^{-π²σ²}) adds ~0.3 % to σ, so the ratio is a little short of √10.
    assert ten / math.sqrt(10) * 1.002 < hundred < ten / math.sqrt(10) * 1.01


def test_spent_budget_is_exhausted():
    history = ddg_rounds(20, noise_stddev=1.0, **SETTING)

    with pytest.raises(BudgetExhaustedError, match="already aggregated spend"):
        calibrate_ddg_noise(1.0, 1e-5, participations=1, history=history, **SETTING)


def test_a_target_no_sigma_reaches_is_exhausted():
    # History leaves 1e-12 of room: no σ up to 1e6·Δ2/√n spends that little on 10^6 rounds.
    history = ddg_rounds(10, noise_stddev=4.0, **SETTING)
    spent = epsilon_for_device(history, 1e-5)

    with pytest.raises(BudgetExhaustedError, match="even at sigma"):
        calibrate_ddg_noise(spent + 1e-12, 1e-5, participations=10**6, history=history, **SETTING)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("target_epsilon", 0.0),
        ("target_epsilon", float("nan")),
        ("delta", 1.0),
        ("participations", 0),
        ("survivors", 0),
        ("survivors", 2.0),
        ("l2_sensitivity", -1.0),
        ("dimension", 0),
        ("rtol", 0.0),
    ],
)
def test_bad_arguments_are_refused(name, value):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "participations": 3} | SETTING

    with pytest.raises(PrivacyError, match=name):
        calibrate_ddg_noise(**(args | {name: value}))


def test_a_record_level_history_is_refused():
    with pytest.raises(PrivacyError, match="DPSGDEvent"):
        calibrate_ddg_noise(1.0, 1e-5, participations=3, history=[event()], **SETTING)


# ---------------------------------------------------------------- the τ = 0 multiplier
def gaussian_epsilon(z, k, delta=1e-5):
    acc = RdpAccountant(orders=list(DEFAULT_ORDERS))
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("target", "k"), [(1.0, 1), (1.0, 10), (3.0, 100), (0.1, 5), (10.0, 2)])
def test_noise_multiplier_is_the_smallest_four_digit_z(target, k):
    z = ddg_noise_multiplier(target, 1e-5, k)

    assert z == float(f"{z:.4g}")
    assert gaussian_epsilon(z, k) <= target < gaussian_epsilon(step_below(z), k)


def test_noise_multiplier_grows_like_the_square_root_of_participations():
    assert ddg_noise_multiplier(1.0, 1e-5, 400) / ddg_noise_multiplier(1.0, 1e-5, 4) == (
        pytest.approx(10.0, rel=0.02)
    )


@pytest.mark.parametrize(
    ("name", "value"), [("target_epsilon", -1.0), ("delta", 0.0), ("participations", 1.5)]
)
def test_noise_multiplier_refuses_bad_arguments(name, value):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "participations": 3}

    with pytest.raises(PrivacyError, match=name):
        ddg_noise_multiplier(**(args | {name: value}))
