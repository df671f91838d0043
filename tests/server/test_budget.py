"""The coordinator's budget view: who may be sampled."""

from __future__ import annotations

from fedlora.config import PrivacySection
from fedlora.privacy import DPSGDEvent, epsilon_for
from fedlora.server.budget import FleetBudget


def _budget(**privacy) -> FleetBudget:
    return FleetBudget(PrivacySection(**privacy), steps_per_round=10, batch_size=10)


def test_a_device_that_declines_is_not_sampled_again():
    budget = _budget()
    budget.register(11, {"device": "d1", "num_records": 100})
    budget.register(12, {"device": "d2", "num_records": 100})
    reason = (
        "Exception ClientAppException occurred. Message: device d2 declines round 3: "
        "it would reach ε=8.4 > budget 8 (δ=1e-05, prv)"
    )
    assert budget.note_failure(reason) == "d2"
    assert budget.eligible([11, 12]) == [11]
    assert budget.note_failure("node 5 timed out") is None


def test_fixed_sigma_first_round_cost_is_known_from_discovery():
    """A device whose very first round would exceed its budget is never asked."""
    sigma = 1.0
    first_round_eps_small = epsilon_for(
        [DPSGDEvent("x", 1, sigma, 10 / 1000, 10, 1e-5)], 1e-5, "prv"
    )
    first_round_eps_big = epsilon_for([DPSGDEvent("x", 1, sigma, 1.0, 10, 1e-5)], 1e-5, "prv")
    budget_eps = (first_round_eps_small + first_round_eps_big) / 2
    budget = _budget(epsilon=budget_eps, noise_multiplier=sigma)
    budget.register(1, {"device": "big-data", "num_records": 1000})  # q = 0.01
    budget.register(2, {"device": "tiny-data", "num_records": 5})  # q = 1
    assert budget.eligible([1, 2, 3]) == [1, 3]  # node 3 is unknown: it may be asked
    assert budget.num_exhausted() == 1


def test_calibrating_devices_stop_only_when_spent():
    budget = _budget(epsilon=1.0)
    budget.register(1, {"device": "d", "num_records": 100})
    assert budget.can_train_again("d")
    budget.ledger.append(DPSGDEvent("d", 1, 0.3, 0.5, 50, 1e-5))  # far past ε = 1
    assert budget.epsilon("d") > 1.0 and not budget.can_train_again("d")


def test_record_rejects_an_incomplete_event():
    import pytest

    from fedlora.errors import UpdateError

    budget = _budget()
    with pytest.raises(UpdateError, match="incomplete privacy event"):
        budget.record(1, {"device": "d", "dp": True, "round": 1})
    with pytest.raises(UpdateError, match="without its device id"):
        budget.record(1, {"dp": True})
