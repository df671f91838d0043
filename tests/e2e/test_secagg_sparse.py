"""SecAgg+'s sparse share graph under 30% dropouts, on the real Flower simulation engine.

Every device is sampled in one round; 30% of them (seeded) drop out, spread over the four
SecAgg+ stages (some after training, their update lost; some at unmask, their masked
update already in the sum). ``secagg.dropout_rate`` sizes the graph
(:mod:`fedlora.server.secagg_graph`), chosen so that *any* 30% leaves every device a
majority of its share holders, whatever ring Flower's shuffle draws:

- 30 devices at δ = 0.05: k = 21, t = 11; 9 dropouts leave each device ≥ 20 - 9 = 11.
- 100 devices at δ = 0.2: k = 75, t = 38; 30 dropouts leave each ≥ 74 - 30 = 44 (slow).

The round completes and the new global adapter is the weighted mean of exactly the updates
that reached the sum, recomputed here from the devices' own ledgers (seeded noise).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config import FedloraConfig
from fedlora.server.secagg_graph import share_graph
from fedlora.testing.faults import (
    SECAGG_STAGES,
    Fault,
    checkpoint,
    expected_global,
    max_abs_diff,
    metrics_rows,
    run_with_faults,
    secagg_tolerance,
)


def sparse_config(n: int, dropout_rate: float) -> FedloraConfig:
    return FedloraConfig().replace(
        fleet={"num_devices": n, "devices_per_round": n, "min_devices": 3},
        training={"rounds": 1, "local_steps": 1, "batch_size": 8},
        secagg={"dropout_rate": dropout_rate, "timeout_s": 300.0},
        export={"enabled": False},
        privacy={"reproducible_noise": True},  # the updates are recomputed here
        seed=1,
    )


def thirty_percent(n: int) -> list[Fault]:
    """30% of n partitions (seeded), over every stage; at the masked-vector stage half
    drop after training (they spent budget, their update is lost)."""
    lost = np.random.default_rng(30).choice(n, 3 * n // 10, replace=False).tolist()
    faults = []
    for i, pid in enumerate(lost):
        stage = SECAGG_STAGES[i * len(SECAGG_STAGES) // len(lost)]
        action = "crash_after" if stage == "collect_masked_vectors" and i % 2 else "crash_before"
        faults.append(Fault(partition=pid, round=1, stage=stage, action=action))
    return faults


@pytest.mark.parametrize(
    ("n", "dropout_rate", "graph"),
    [
        (30, 0.05, (21, 11)),
        pytest.param(100, 0.2, (75, 38), marks=[pytest.mark.slow, pytest.mark.scale]),
    ],
)
def test_thirty_percent_dropouts_give_exactly_the_survivors_mean(tmp_path, n, dropout_rate, graph):
    from fedlora import runtime

    cfg = sparse_config(n, dropout_rate)
    assert share_graph(n, None, None, dropout_rate) == graph  # sparse: k < n
    faults = thirty_percent(n)
    run_dir = tmp_path / "run"

    run_with_faults(cfg, run_dir, faults)

    row = metrics_rows(run_dir)[1]
    in_sum = sorted(
        set(range(n)) - {f.partition for f in faults if f.stage != "unmask"}
    )  # lost at unmask: its masked update is in, its mask rebuilt from the others' shares
    assert "failed" not in row
    assert (row["sampled"], row["num_devices"]) == (n, len(in_sum))
    assert sum(row["dropouts"].values()) == len(faults)
    initial = [a.copy() for a in runtime.model_bundle(cfg).initial_arrays]
    want, weights = expected_global(cfg, run_dir, 1, in_sum, initial)
    tol = secagg_tolerance(cfg, weights)
    assert max_abs_diff(checkpoint(cfg, run_dir, 1), want) <= tol
    # Not vacuous: the round moved the adapter (at 100 devices by ~90x the tolerance).
    assert max_abs_diff(checkpoint(cfg, run_dir, 1), initial) > 20 * tol
    runtime.clear()
