"""Property: a device that asks the accountant before every round never ends above its budget."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.errors import BudgetExhaustedError
from fedlora.privacy.accountants import epsilon_for
from fedlora.privacy.calibrate import calibrate_noise_multiplier, epsilon_after
from fedlora.privacy.events import DPSGDEvent
from fedlora.privacy.ledger import PrivacyLedger

DELTA = 1e-5
SETTINGS = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

sigmas = st.floats(0.5, 4.0)
rates = st.floats(0.005, 0.5)
round_plans = st.lists(st.tuples(sigmas, rates, st.integers(1, 20)), min_size=1, max_size=6)
budgets = st.floats(0.3, 10.0)


@pytest.mark.parametrize(("accountant", "examples"), [("rdp", 25), ("prv", 8)], ids=["rdp", "prv"])
def test_checking_device_never_overspends(accountant, examples):
    @settings(SETTINGS, max_examples=examples)
    @given(plan=round_plans, budget=budgets)
    def run(plan, budget):
        ledger = PrivacyLedger()
        for r, (sigma, q, steps) in enumerate(plan):
            nxt = DPSGDEvent("dev", r, sigma, q, steps, DELTA)
            if epsilon_after(ledger.events, nxt, DELTA, accountant) > budget:
                continue  # refused: this round would overspend (a later, noisier one may fit)
            ledger.append(nxt)
            assert epsilon_for(ledger.events, DELTA, accountant) <= budget

        assert epsilon_for(ledger.events, DELTA, accountant) <= budget

    run()


@settings(SETTINGS, max_examples=12)
@given(
    q=rates,
    steps=st.integers(1, 30),
    rounds=st.integers(1, 4),
    budget=budgets,
)
def test_calibrating_device_spends_its_budget_but_not_more(q, steps, rounds, budget):
    ledger = PrivacyLedger()
    for r in range(rounds):
        try:
            sigma = calibrate_noise_multiplier(
                budget, DELTA, q, steps, rounds - r, history=ledger.events, accountant="rdp"
            )
        except BudgetExhaustedError:
            break
        nxt = DPSGDEvent("dev", r, sigma, q, steps, DELTA)
        assert epsilon_after(ledger.events, nxt, DELTA, "rdp") <= budget
        ledger.append(nxt)

    spent = epsilon_for(ledger.events, DELTA, "rdp")
    assert spent <= budget
    if len(ledger) == rounds:  # trained every round: calibration left little on the table
        assert spent >= 0.9 * budget
