"""fedlora's SecAgg+ on the real Flower simulation engine: a liar costs one update, and a
seeded run reproduces bit for bit.

Five devices, all sampled, one round; device 2 lies in its plaintext claims (another
round) beside its masked vector. The coordinator rejects it before the unmask stage,
leaves its vector out of the sum and unmasks it as a dropout: the round aggregates the
other four, and the new global adapter is their weighted mean (recomputed here from the
devices' ledgers, seeded noise). The run is done twice under
``privacy.reproducible_noise``: stochastic rounding is then seeded per device and round
too (masks come from fresh keys each time and cancel exactly), so the two checkpoints
are identical to the bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.config import FedloraConfig
from fedlora.testing.faults import (
    Fault,
    checkpoint,
    expected_global,
    max_abs_diff,
    metrics_rows,
    run_with_faults,
    secagg_tolerance,
)

pytestmark = pytest.mark.slow  # simulations: not in `make unit`

N = 5
LIAR = 2


def test_a_liar_costs_its_update_and_a_seeded_run_reproduces(tmp_path):
    from fedlora import runtime

    cfg = FedloraConfig().replace(
        fleet={"num_devices": N, "devices_per_round": N, "min_devices": 3},
        training={"rounds": 1, "local_steps": 1, "batch_size": 8},
        export={"enabled": False},
        privacy={"reproducible_noise": True},
        seed=3,
    )
    lie = [
        Fault(
            partition=LIAR,
            round=1,
            stage="collect_masked_vectors",
            action="malformed",
            kind="round",
        )
    ]

    run_with_faults(cfg, tmp_path / "a", lie)
    run_with_faults(cfg, tmp_path / "b", lie)

    row = metrics_rows(tmp_path / "a")[1]
    assert "discarded" not in row and "failed" not in row
    assert (row["sampled"], row["num_devices"], row["rejected_by_reason"]) == (
        N,
        N - 1,
        {"round": 1},
    )
    got = checkpoint(cfg, tmp_path / "a", 1)
    again = checkpoint(cfg, tmp_path / "b", 1)
    assert all(np.array_equal(x, y) for x, y in zip(got, again, strict=True))  # bit for bit
    initial = [a.copy() for a in runtime.model_bundle(cfg).initial_arrays]
    honest = [p for p in range(N) if p != LIAR]
    want, weights = expected_global(cfg, tmp_path / "a", 1, honest, initial)
    tol = secagg_tolerance(cfg, weights)
    assert max_abs_diff(got, want) <= tol
    with_liar, _ = expected_global(cfg, tmp_path / "a", 1, list(range(N)), initial)
    assert max_abs_diff(got, with_liar) > 10 * tol  # not vacuous: the liar's update is out
    runtime.clear()
