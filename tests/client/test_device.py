"""The device's privacy decisions and its ledger in Flower's node state."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from fedlora.client.device_client import plan_noise
from fedlora.client.ledger import load_device_ledger, save_device_ledger
from fedlora.config import FedloraConfig
from fedlora.errors import BudgetExhaustedError
from fedlora.privacy import DPSGDEvent, PrivacyLedger, epsilon_for


def _context() -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )


def _event(rnd: int, sigma: float = 1.0, q: float = 0.1, steps: int = 10) -> DPSGDEvent:
    return DPSGDEvent(
        device="d0", round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5
    )


def test_ledger_persists_across_rounds_in_node_state(tmp_path):
    ctx = _context()
    assert len(load_device_ledger(ctx)) == 0
    for rnd in (1, 2, 3):
        ledger = load_device_ledger(ctx)  # what a fresh client object sees each round
        ledger.append(_event(rnd))
        save_device_ledger(ctx, ledger)
    assert load_device_ledger(ctx).rounds_for("d0") == (1, 2, 3)
    # and mirrored to disk for a deployed device
    path = tmp_path / "ledger.json"
    save_device_ledger(ctx, load_device_ledger(ctx), path)
    assert PrivacyLedger.load(path) == load_device_ledger(ctx)


def test_calibrated_sigma_spreads_the_budget_over_the_remaining_rounds():
    cfg = FedloraConfig().replace(privacy={"epsilon": 4.0}, training={"local_steps": 10})
    ledger = PrivacyLedger()
    sigma1 = plan_noise(cfg, ledger, "d0", server_round=1, num_rounds=5, sample_rate=0.1)
    assert sigma1 is not None
    # Spending the same σ in all 5 rounds lands at (not above) the budget.
    full = [_event(r, sigma1) for r in range(1, 6)]
    eps = epsilon_for(full, 1e-5, "prv")
    assert eps <= 4.0 and eps > 4.0 * 0.97
    # A device that trained every round so far keeps the same σ; one that skipped gets less noise.
    for r in (1, 2):
        ledger.append(_event(r, sigma1))
    sigma3 = plan_noise(cfg, ledger, "d0", server_round=3, num_rounds=5, sample_rate=0.1)
    assert sigma3 == pytest.approx(sigma1, rel=0.01)
    skipped = PrivacyLedger([_event(1, sigma1)])
    assert plan_noise(cfg, skipped, "d0", 3, 5, 0.1) < sigma1


def test_fixed_sigma_declines_when_the_next_round_would_exceed_the_budget():
    cfg = FedloraConfig().replace(privacy={"epsilon": 6.0, "noise_multiplier": 1.0})
    ledger = PrivacyLedger()
    rnd = 0
    while True:
        rnd += 1
        try:
            sigma = plan_noise(cfg, ledger, "d0", rnd, 100, 0.1)
        except BudgetExhaustedError as exc:
            assert "declines round" in str(exc) and "budget 6" in str(exc)
            break
        ledger.append(_event(rnd, sigma))
    spent = epsilon_for(ledger.events, 1e-5, "prv")
    assert rnd > 2 and spent <= 6.0
    assert epsilon_for((*ledger.events, _event(rnd)), 1e-5, "prv") > 6.0


def test_no_dp_means_no_noise():
    cfg = FedloraConfig().replace(privacy={"enabled": False})
    assert plan_noise(cfg, PrivacyLedger(), "d0", 1, 5, 0.1) is None


def test_calibration_that_cannot_reach_the_budget_is_a_decline_the_coordinator_reads():
    """A ledger spanning runs can leave too little budget for any σ: the device declines."""
    from fedlora.config import FedloraConfig
    from fedlora.errors import BudgetExhaustedError
    from fedlora.privacy import DPSGDEvent, PrivacyLedger
    from fedlora.server.budget import DECLINE_PATTERN

    cfg = FedloraConfig()
    ledger = PrivacyLedger(
        [
            DPSGDEvent(
                device="d0",
                round=r,
                noise_multiplier=0.6,
                sample_rate=0.5,
                steps=10,
                delta=cfg.privacy.delta,
                run="earlier",
            )
            for r in (1, 2, 3)
        ]
    )
    with pytest.raises(BudgetExhaustedError) as info:
        plan_noise(cfg, ledger, "d0", 1, 5, 0.5)
    match = DECLINE_PATTERN.search(str(info.value))
    assert match is not None and match.group(1) == "d0" and match.group(2) == "1"
