"""The device-level DDG accountant: its contract, and its ε against independent computations.

(a) where τ underflows to 0, against dp_accounting's RDP accountant on the Gaussian
    mechanism with z = √n·σ/Δ2 (same orders; dp_accounting converts RDP to (ε, δ)
    with the same improved bound, Canonne-Kamath-Steinke Prop. 12);
(b) against a scalar, loop-based implementation written here from the paper's formula;
(c) for n = 1 (one discrete Gaussian) against the exact ε from dp_accounting's PLD of
    the discrete Gaussian mechanism: ours must be an upper bound, and is within 25 %;
(d) τ is not dropped: at small σ and large d it raises ε measurably.
"""

import json
import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld
from dp_accounting.rdp import RdpAccountant

from fedlora.errors import PrivacyError
from fedlora.privacy import epsilon_for, get_accountant
from fedlora.privacy.accountants import DDGAccountant, ddg_tau, epsilon_for_device, rdp_ddg
from fedlora.privacy.accountants.rdp import DEFAULT_ORDERS
from tests.privacy._helpers import ddg_event, ddg_rounds, event


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("absl").setLevel(logging.ERROR)


def reference_epsilon(sigma, n, l2, d, k, delta, orders=DEFAULT_ORDERS, tau=None):
    """ε of k DDG rounds, one order and one term at a time, from Kairouz et al. Prop. 14."""
    if tau is None:
        tau = 0.0
        for j in range(1, n):
            tau += math.exp(-2.0 * math.pi**2 * sigma**2 * j / (j + 1))
        tau *= 10.0
    scale = l2 / (math.sqrt(n) * sigma)
    best = math.inf
    for a in orders:
        first = a * scale**2 / 2.0 + tau * d
        second = a / 2.0 * (scale + math.sqrt(d) * tau) ** 2
        rdp = k * min(first, second)
        if delta**2 + math.expm1(-rdp) >= 0.0:
            eps = 0.0
        else:
            eps = rdp + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1.0)
        best = min(best, eps)
    return max(0.0, best)


def ours(sigma, n, l2, d, k, delta=1e-5):
    rounds = ddg_rounds(
        k, noise_stddev=sigma, survivors=n, l2_sensitivity=l2, dimension=d, delta=delta
    )
    return epsilon_for_device(rounds, delta)


# ---------------------------------------------------------------- the contract
def test_fresh_accountant_has_zero_epsilon():
    assert DDGAccountant().get_epsilon(1e-5) == 0.0
    assert epsilon_for_device([], 1e-5) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1.0, float("nan"), True, "1e-5"])
def test_invalid_delta_is_refused(delta):
    acc = DDGAccountant()
    acc.compose(ddg_event())

    with pytest.raises(PrivacyError, match="delta"):
        acc.get_epsilon(delta)


def test_record_level_events_are_refused_and_nothing_is_composed():
    acc = DDGAccountant()

    with pytest.raises(PrivacyError, match="does not understand DPSGDEvent"):
        acc.compose_many([ddg_event(), event()])

    assert acc.history == ()


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_record_level_accountants_refuse_device_level_events(name):
    acc = get_accountant(name)

    with pytest.raises(PrivacyError, match="does not understand DDGEvent"):
        acc.compose_many([event(), ddg_event()])

    assert acc.history == ()
    with pytest.raises(PrivacyError, match="DDGEvent"):
        epsilon_for([ddg_event()], 1e-5, name)


def test_epsilon_for_device_refuses_several_devices():
    with pytest.raises(PrivacyError, match="one device"):
        epsilon_for_device([ddg_event(device="a"), ddg_event(device="b")], 1e-5)


def test_history_groups_rounds_by_mechanism():
    acc = DDGAccountant()

    acc.compose_many([*ddg_rounds(3), ddg_event(round=9, survivors=4)])

    assert acc.history == ((4.0, 4, 1.0, 1024, 1), (4.0, 10, 1.0, 1024, 3))


def test_state_round_trips_through_json():
    acc = DDGAccountant()
    acc.compose_many([*ddg_rounds(3), ddg_event(round=9, noise_stddev=2.0)])

    restored = DDGAccountant()
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))

    assert restored.history == acc.history
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert acc.state_dict()["accountant"] == "ddg-rdp"


def test_state_of_a_record_level_accountant_is_refused_and_vice_versa():
    rdp = get_accountant("rdp")
    rdp.compose(event())
    ddg = DDGAccountant()
    ddg.compose(ddg_event())

    with pytest.raises(PrivacyError, match="'rdp' accountant"):
        DDGAccountant().load_state_dict(rdp.state_dict())
    with pytest.raises(PrivacyError, match="'ddg-rdp' accountant"):
        get_accountant("rdp").load_state_dict(ddg.state_dict())


def test_state_of_another_mechanism_is_refused():
    state = DDGAccountant().state_dict() | {"mechanism": "poisson_subsampled_gaussian"}

    with pytest.raises(PrivacyError, match="mechanism"):
        DDGAccountant().load_state_dict(state)


@pytest.mark.parametrize(
    "entry",
    [
        {"noise_stddev": 4.0, "survivors": 10, "l2_sensitivity": 1.0, "dimension": 8},
        {"noise_stddev": 4.0, "survivors": 0, "l2_sensitivity": 1.0, "dimension": 8, "rounds": 1},
        {"noise_stddev": -4.0, "survivors": 2, "l2_sensitivity": 1.0, "dimension": 8, "rounds": 1},
        {"noise_stddev": 4.0, "survivors": 2, "l2_sensitivity": 1.0, "dimension": 8, "rounds": 0},
        {"noise_stddev": 4.0, "survivors": 2, "l2_sensitivity": 1.0, "dimension": 8, "rounds": 1.0},
    ],
)
def test_malformed_state_is_refused_and_leaves_state_alone(entry):
    acc = DDGAccountant()
    acc.compose(ddg_event())
    state = acc.state_dict() | {"history": [entry]}

    with pytest.raises(PrivacyError):
        acc.load_state_dict(state)

    assert acc.history == ((4.0, 10, 1.0, 1024, 1),)


def test_only_the_multiset_of_rounds_matters():
    rounds = [ddg_event(round=1, noise_stddev=2.0), ddg_event(round=2), ddg_event(round=3)]

    assert epsilon_for_device(rounds, 1e-5) == epsilon_for_device(rounds[::-1], 1e-5)


def test_monotone_in_rounds_noise_survivors_and_delta():
    assert ours(4.0, 10, 1.0, 1024, 5) < ours(4.0, 10, 1.0, 1024, 6)
    assert ours(4.0, 10, 1.0, 1024, 5) > ours(4.5, 10, 1.0, 1024, 5)
    assert ours(4.0, 10, 1.0, 1024, 5) > ours(4.0, 20, 1.0, 1024, 5)  # more noise in the sum
    assert ours(4.0, 10, 1.0, 1024, 5, 1e-5) > ours(4.0, 10, 1.0, 1024, 5, 1e-3)


def test_expected_values():
    # Fixed values (computed by this implementation; (b) checks the formula independently).
    assert ours(300.0, 10, 1000.0, 2**16, 10) == pytest.approx(20.392520209469453, rel=1e-12)
    assert ours(1.0, 10, 1.0, 2**16, 1) == pytest.approx(
        reference_epsilon(1.0, 10, 1.0, 2**16, 1, 1e-5), rel=1e-12
    )


@pytest.mark.parametrize(
    ("sigma", "tau"),
    [(0.5, 2.3453253192467702), (1.0, 5.435242581620001e-4), (2.0, 7.157179647609257e-17)],
)
def test_tau_at_ten_survivors(sigma, tau):
    assert ddg_tau(sigma, 10) == pytest.approx(tau, rel=1e-12)
    assert ddg_tau(sigma, 1) == 0.0


# ---------------------------------------------------------------- (a) dp_accounting, τ = 0
@pytest.mark.parametrize(
    ("sigma", "n", "l2", "d", "k"),
    [
        (30.0, 10, 20.0, 2**16, 1),
        (50.0, 4, 100.0, 1000, 10),
        (1000.0, 100, 16384.0, 2**20, 50),
        (12.0, 2, 5.0, 1, 300),
    ],
)
def test_large_sigma_is_the_gaussian_mechanism_of_dp_accounting(sigma, n, l2, d, k):
    assert ddg_tau(sigma, n) == 0.0  # underflows: exp(-π²σ²) with σ ≥ 12
    z = math.sqrt(n) * sigma / l2
    acc = RdpAccountant(orders=list(DEFAULT_ORDERS))
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))

    assert ours(sigma, n, l2, d, k) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


# ---------------------------------------------------------------- (b) the formula, by loops
@pytest.mark.parametrize(
    ("sigma", "n", "l2", "d", "k", "delta"),
    [
        (0.5, 10, 1.0, 2**10, 1, 1e-5),
        (0.7, 3, 0.5, 2**16, 5, 1e-5),
        (0.9, 50, 2.0, 2**12, 20, 1e-6),
        (1.0, 10, 1.0, 2**16, 10, 1e-5),
        (1.0, 1, 1.0, 2**16, 10, 1e-5),
        (2.0, 100, 10.0, 2**20, 100, 1e-5),
        (5.0, 7, 3.0, 17, 3, 1e-3),
    ],
)
def test_vectorised_matches_the_scalar_loop_implementation(sigma, n, l2, d, k, delta):
    assert ours(sigma, n, l2, d, k, delta) == pytest.approx(
        reference_epsilon(sigma, n, l2, d, k, delta), rel=1e-12
    )


@pytest.mark.parametrize(
    ("sigma", "d", "smaller"),
    [(0.5, 2**10, "first"), (1.0, 2**16, "second")],
)
def test_each_of_the_two_terms_can_be_the_minimum(sigma, d, smaller):
    n, l2 = 10, 1.0
    tau = ddg_tau(sigma, n)
    s = l2 / (math.sqrt(n) * sigma)
    alphas = np.asarray(DEFAULT_ORDERS)
    first = alphas * s * s / 2.0 + tau * d
    second = alphas / 2.0 * (s + math.sqrt(d) * tau) ** 2

    rdp = rdp_ddg(sigma, n, l2, d)

    assert rdp == pytest.approx(np.minimum(first, second), rel=1e-12)
    at_two = DEFAULT_ORDERS.index(2.0)
    assert (first[at_two] < second[at_two]) == (smaller == "first")


# ---------------------------------------------------------------- (c) one discrete Gaussian
@pytest.mark.parametrize(
    ("sigma", "sensitivity", "k"),
    [(0.8, 1, 1), (1.0, 1, 1), (2.0, 1, 1), (5.0, 1, 1), (5.0, 2, 4), (10.0, 3, 10)],
)
def test_single_device_is_an_upper_bound_on_the_exact_discrete_gaussian(sigma, sensitivity, k):
    exact_pld = pld.from_discrete_gaussian_mechanism(sigma, sensitivity=sensitivity)
    if k > 1:
        exact_pld = exact_pld.self_compose(k)
    exact = exact_pld.get_epsilon_for_delta(1e-5)

    bound = ours(sigma, 1, float(sensitivity), 1, k)

    assert exact <= bound <= 1.25 * exact  # measured: 1.07-1.12 times


# ---------------------------------------------------------------- (d) τ is not dropped
def test_tau_raises_epsilon_at_small_sigma_and_large_dimension():
    sigma, n, l2, d, k = 1.0, 10, 1.0, 2**16, 10

    with_tau = ours(sigma, n, l2, d, k)
    without = reference_epsilon(sigma, n, l2, d, k, 1e-5, tau=0.0)

    assert with_tau > 1.5 * without  # τ·d = 35.6 per round here
    assert ours(4.0, n, l2, d, k) == pytest.approx(
        reference_epsilon(4.0, n, l2, d, k, 1e-5, tau=0.0), rel=1e-12
    )  # and it vanishes once σ is a few units
