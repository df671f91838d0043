"""Dropouts during SecAgg+, on the real Flower simulation engine (6 devices, all sampled).

SecAgg+ shares each device's secrets among all 6 with a reconstruction threshold of
round(0.6 · 6) = 4, so a round survives 2 dropouts after key sharing and fails at 3.

- Two devices (33%) drop out in the masked-vector stage of round 1, one after it
  trained (it spent budget; its update is lost), one before; a third drops out in
  round 2's unmask stage, after its masked update is in the sum. Both rounds complete
  and equal the weighted mean of the updates that reached the sum, recomputed here.
- Three devices drop out after training in round 1: the round fails cleanly (global
  adapter unchanged, the metrics row says why) and round 2 aggregates all six.

In both, the coordinator's ledger ends equal to the union of the devices' own ledgers:
the devices that trained and dropped report their spend when asked.
"""

from __future__ import annotations

import pytest

from fedlora.config import FedloraConfig
from fedlora.testing.faults import (
    Fault,
    checkpoint,
    device_ledgers,
    expected_global,
    max_abs_diff,
    metrics_rows,
    run_with_faults,
    secagg_tolerance,
)

pytestmark = pytest.mark.slow

MASKED = "collect_masked_vectors"


def fault_config() -> FedloraConfig:
    return FedloraConfig().replace(
        fleet={"num_devices": 6, "devices_per_round": 6, "min_devices": 3},
        training={"rounds": 2, "local_steps": 2, "batch_size": 8},
        secagg={"timeout_s": 60.0},
        export={"enabled": False},
        privacy={"reproducible_noise": True},  # the updates are recomputed here
        seed=1,
    )


@pytest.fixture(scope="module")
def survivable(tmp_path_factory):
    cfg = fault_config()
    run_dir = tmp_path_factory.mktemp("survivable") / "run"
    faults = [
        Fault(partition=1, round=1, stage=MASKED, action="crash_after"),
        Fault(partition=4, round=1, stage=MASKED, action="crash_before"),
        Fault(partition=2, round=2, stage="unmask", action="crash_before"),
    ]
    coordinator = run_with_faults(cfg, run_dir, faults)
    return cfg, run_dir, coordinator


@pytest.fixture(scope="module")
def below_threshold(tmp_path_factory):
    cfg = fault_config()
    run_dir = tmp_path_factory.mktemp("below") / "run"
    faults = [Fault(partition=p, round=1, stage=MASKED, action="crash_after") for p in (0, 2, 5)]
    coordinator = run_with_faults(cfg, run_dir, faults)
    return cfg, run_dir, coordinator


def _initial(cfg):
    from fedlora import runtime

    return [a.copy() for a in runtime.model_bundle(cfg).initial_arrays]


def assert_ledgers_agree(run_dir, coordinator):
    """The coordinator's saved ledger holds exactly the events of every device's own."""
    from fedlora.privacy import PrivacyLedger

    saved = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    own = device_ledgers(run_dir)
    assert set(saved.devices()) == set(own)
    for device, ledger in own.items():
        key = lambda e: e.round  # noqa: E731
        assert sorted(saved.events_for(device), key=key) == sorted(ledger.events, key=key)
    assert coordinator.budget.num_owed() == 0


def test_rounds_with_dropouts_complete_and_count_them(survivable):
    _cfg, run_dir, _ = survivable
    rows = metrics_rows(run_dir)
    one, two = rows[1], rows[2]
    assert "failed" not in one and "failed" not in two
    assert (one["sampled"], one["num_devices"], one["failures"]) == (6, 4, 2)
    assert one["dropouts"] == {MASKED: 2} and one["late"] == 0
    # Both devices that got the training request and did not answer are owed, until
    # round 2's start asks them.
    assert one["unreconciled"] == 2
    assert (two["num_devices"], two["dropouts"], two["unreconciled"]) == (6, {"unmask": 1}, 0)


def test_round_one_is_the_survivors_weighted_mean(survivable):
    cfg, run_dir, _ = survivable
    initial = _initial(cfg)
    got = checkpoint(cfg, run_dir, 1)
    want, weights = expected_global(cfg, run_dir, 1, [0, 2, 3, 5], initial)
    tol = secagg_tolerance(cfg, weights)
    assert max_abs_diff(got, want) <= tol
    # Not vacuous: with the update of device 1, which trained before it dropped out, the
    # mean would be another one; and the round moved the adapter.
    with_dropped, _ = expected_global(cfg, run_dir, 1, [0, 1, 2, 3, 5], initial)
    assert max_abs_diff(with_dropped, want) > 20 * tol
    assert max_abs_diff(got, initial) > 100 * tol


def test_a_device_lost_at_unmask_is_still_in_the_sum(survivable):
    """Its masked update arrived; SecAgg+ rebuilds its mask from the others' shares."""
    cfg, run_dir, _ = survivable
    previous = checkpoint(cfg, run_dir, 1)
    want, weights = expected_global(cfg, run_dir, 2, range(6), previous)
    assert max_abs_diff(checkpoint(cfg, run_dir, 2), want) <= secagg_tolerance(cfg, weights)


def test_ledgers_agree_with_dropouts(survivable):
    cfg, run_dir, coordinator = survivable
    assert_ledgers_agree(run_dir, coordinator)
    from fedlora import runtime

    fleet = runtime.fleet(cfg).devices
    trained_and_dropped, never_trained = fleet[1].device, fleet[4].device
    assert coordinator.budget.ledger.rounds_for(trained_and_dropped) == (1, 2)
    assert coordinator.budget.ledger.rounds_for(never_trained) == (2,)


def test_below_threshold_fails_cleanly_and_the_next_round_aggregates(below_threshold):
    cfg, run_dir, _ = below_threshold
    rows = metrics_rows(run_dir)
    one, two = rows[1], rows[2]
    assert MASKED in one["failed"] and "3 of 6" in one["failed"] and "needs 4" in one["failed"]
    assert one["num_devices"] == 0 and one["dropouts"] == {MASKED: 3}
    assert one["failures"] == 3  # one per device, although Flower lists each twice
    assert one["eval_loss"] == rows[0]["eval_loss"]  # the global adapter is unchanged
    assert not (run_dir / "checkpoints" / "round-0001.safetensors").exists()
    assert "failed" not in two and two["num_devices"] == 6
    # Round 2 started from the initial adapter: its result is initial + round 2's mean.
    want, weights = expected_global(cfg, run_dir, 2, range(6), _initial(cfg))
    assert max_abs_diff(checkpoint(cfg, run_dir, 2), want) <= secagg_tolerance(cfg, weights)


def test_ledgers_agree_after_a_failed_round(below_threshold):
    """The 3 survivors' events came with their (unused) replies; the 3 that dropped
    after training reported theirs at round 2's start."""
    _cfg, run_dir, coordinator = below_threshold
    rows = metrics_rows(run_dir)
    assert rows[1]["unreconciled"] == 3 and rows[2]["unreconciled"] == 0
    assert_ledgers_agree(run_dir, coordinator)
    assert len(coordinator.budget.ledger) == 12  # every device trained in both rounds
