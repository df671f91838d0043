"""A straggler past the round deadline, on the real Flower simulation engine with SecAgg+.

Six devices, all sampled, ``training.round_deadline_s`` = 30 s: a round of this config
takes 5-10 s on an idle 2-core machine (the first one loads the model), and up to 25 s
when the machine is shared. In round 2 one device trains and then holds its reply
until the coordinator has written round 2's metrics row, long past the deadline. The
round goes on without it: it is counted as late, the aggregate is the mean of the
other five, and its spend still reaches the coordinator's ledger, from its own
ledger after the last round.
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

DEADLINE_S = 30.0
STRAGGLER = 3


@pytest.fixture(scope="module")
def straggler_run(tmp_path_factory):
    cfg = FedloraConfig().replace(
        fleet={"num_devices": 6, "devices_per_round": 6, "min_devices": 3},
        training={"rounds": 2, "local_steps": 2, "batch_size": 8, "round_deadline_s": DEADLINE_S},
        secagg={"timeout_s": 60.0},
        export={"enabled": False},
        privacy={"reproducible_noise": True},  # the updates are recomputed here
        seed=1,
    )
    run_dir = tmp_path_factory.mktemp("straggler") / "run"
    release = run_dir / "release"
    fault = Fault(
        partition=STRAGGLER,
        round=2,
        stage="collect_masked_vectors",
        action="delay",
        delay_s=3 * DEADLINE_S,  # a bound, in case the row never comes
        release=str(release),
    )

    def observer(row):
        if row["round"] == 2:  # the coordinator is done with round 2: answer now, too late
            release.touch()

    coordinator = run_with_faults(cfg, run_dir, [fault], observer=observer)
    return cfg, run_dir, coordinator


def test_the_straggler_is_dropped_and_counted(straggler_run):
    _cfg, run_dir, _ = straggler_run
    rows = metrics_rows(run_dir)
    one, two = rows[1], rows[2]
    assert (one["num_devices"], one["late"]) == (6, 0)
    assert (two["sampled"], two["num_devices"], two["late"]) == (6, 5, 1)
    assert two["dropouts"] == {"collect_masked_vectors": 1} and two["failures"] == 0
    assert "failed" not in two
    # The round waited for the deadline, and not much longer.
    assert DEADLINE_S <= two["round_s"] < DEADLINE_S + 15


def test_the_round_is_the_mean_of_the_others(straggler_run):
    cfg, run_dir, _ = straggler_run
    previous = checkpoint(cfg, run_dir, 1)
    on_time = [p for p in range(6) if p != STRAGGLER]
    want, weights = expected_global(cfg, run_dir, 2, on_time, previous)
    tol = secagg_tolerance(cfg, weights)
    assert max_abs_diff(checkpoint(cfg, run_dir, 2), want) <= tol
    with_straggler, _ = expected_global(cfg, run_dir, 2, range(6), previous)
    assert max_abs_diff(with_straggler, want) > 20 * tol  # the comparison can tell


def test_the_stragglers_spend_is_in_the_coordinators_ledger(straggler_run):
    from fedlora.privacy import PrivacyLedger

    cfg, run_dir, coordinator = straggler_run
    from fedlora import runtime

    rows = metrics_rows(run_dir)
    assert rows[2]["unreconciled"] == 1  # owed when round 2's row was written...
    assert coordinator.budget.num_owed() == 0  # ...and reported after the last round
    saved = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    own = device_ledgers(run_dir)
    assert set(saved.devices()) == set(own)
    for device, ledger in own.items():
        assert saved.events_for(device) == ledger.events
    straggler = runtime.fleet(cfg).devices[STRAGGLER].device
    assert saved.rounds_for(straggler) == (1, 2)
