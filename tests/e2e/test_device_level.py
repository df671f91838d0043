"""Device-level DP on the real Flower simulation engine: the distributed discrete Gaussian
inside fedlora's SecAgg+.

Five devices, all sampled, ``privacy.unit: "device"`` under reproducible noise, so the
coordinator's new global adapter can be rebuilt here from first principles: each device's
update is retrained, encoded with the rounding/noise stream its SecAgg+ mod drew from,
summed mod 2^16 (what the masks leave) and decoded. The coordinator must land on exactly
that adapter, record one device-level event per device in the sum with the number of
devices whose noise the sum held, and tell no one anything its data decides beside it.

A second run drops devices: one after training in round 1 (the sum holds four devices'
noise, and the ledger says four), two before key sharing in round 2 (three survivors,
fewer than ``min_survivors`` = 4: the sum is never unmasked and no one is charged).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.config import FedloraConfig
from fedlora.testing.faults import (
    Fault,
    checkpoint,
    device_ledgers,
    metrics_rows,
    retrain_update,
    run_with_faults,
)

pytestmark = pytest.mark.slow  # simulations: not in `make unit`

N = 5


def _cfg(rounds: int, min_survivors: int | None = None) -> FedloraConfig:
    device = {"epsilon": 8.0, "delta": 1e-5, "bits": 16}
    if min_survivors is not None:
        device["min_survivors"] = min_survivors
    return FedloraConfig().replace(
        fleet={"num_devices": N, "devices_per_round": N, "min_devices": 3},
        training={"rounds": rounds, "local_steps": 1, "batch_size": 8},
        export={"enabled": False},
        privacy={"unit": "device", "reproducible_noise": True, "device": device},
        seed=3,
    )


def test_the_coordinator_gets_exactly_the_noisy_sum_and_charges_each_device_for_it(tmp_path):
    from fedlora import runtime
    from fedlora.client.secagg import rounding_seed
    from fedlora.ddp.encoding import encode
    from fedlora.privacy import PrivacyLedger, epsilon_for_device
    from fedlora.privacy.noise import SeededRandom
    from fedlora.server.aggregate import apply_update
    from fedlora.server.ddp import DeviceLevelDP

    cfg = _cfg(rounds=1)
    run_dir = tmp_path / "run"
    run_with_faults(cfg, run_dir, [])

    initial = [a.copy() for a in runtime.model_bundle(cfg).initial_arrays]
    ddp = DeviceLevelDP(cfg, [a.shape for a in initial])
    params, mod = ddp.params, ddp.params.modulus
    assert params.bits == 16 and ddp.plan.min_survivors == math.ceil(0.9 * N)
    # The sum, rebuilt: every device's own update, encoded from its own stream.
    total = np.zeros(params.padded_dimension, dtype=np.uint64)
    for pid in range(N):
        update, _ = retrain_update(cfg, pid, 1, None, initial)
        flat = np.concatenate([u.reshape(-1).astype(np.float64) for u in update])
        source = SeededRandom(rounding_seed(cfg.seed, pid, 1))
        total = (total + encode(flat, params, ddp.rotation_seed(1), source)) % mod
    mean = ddp.decode(1, [np.array([N], dtype=np.uint64), total], N)
    want = apply_update(initial, mean)
    got = checkpoint(cfg, run_dir, 1)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    # Not vacuous: the noise moved the adapter (a noiseless mean lands elsewhere).
    plain = [retrain_update(cfg, pid, 1, None, initial)[0] for pid in range(N)]
    noiseless = apply_update(initial, [np.mean(t, axis=0) for t in zip(*plain, strict=True)])
    assert max(float(np.max(np.abs(g - w))) for g, w in zip(got, noiseless, strict=True)) > 1e-4

    row = metrics_rows(run_dir)[1]
    assert (row["num_devices"], row["survivors"]) == (N, N)
    assert row["train_loss"] is None  # no loss, norm or record count beside the sum
    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    events = ledger.events
    assert len(events) == N and all(e.unit == "device" and e.survivors == N for e in events)
    assert {e.noise_stddev for e in events} == {params.noise_stddev}
    eps = epsilon_for_device([events[0]], 1e-5)
    assert row["max_device_epsilon"] == pytest.approx(eps, rel=1e-12)
    assert 0 < eps <= 8.0
    # Each device's own ledger counts the noise it is guaranteed: min_survivors devices'.
    own = device_ledgers(run_dir)
    assert len(own) == N
    for device, book in own.items():
        (event,) = book.events_for(device, unit="device")
        assert event.unit == "device" and event.survivors == ddp.plan.min_survivors
        assert epsilon_for_device([event], 1e-5) >= eps
    report = (run_dir / "privacy" / "report.json").read_text()
    assert '"device_level"' in report
    runtime.clear()


def test_dropouts_reduce_the_noise_counted_and_too_few_survivors_are_never_unmasked(tmp_path):
    from fedlora import runtime
    from fedlora.privacy import PrivacyLedger

    cfg = _cfg(rounds=2, min_survivors=4)
    faults = [
        Fault(partition=1, round=1, stage="collect_masked_vectors", action="crash_after"),
        Fault(partition=0, round=2, stage="share_keys", action="crash_before"),
        Fault(partition=2, round=2, stage="share_keys", action="crash_before"),
    ]
    run_dir = tmp_path / "run"
    run_with_faults(cfg, run_dir, faults)

    rows = metrics_rows(run_dir)
    assert (rows[1]["num_devices"], rows[1]["survivors"]) == (N - 1, N - 1)
    assert rows[2]["num_devices"] == 0 and rows[2]["survivors"] == 0
    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    by_round: dict[int, list[int]] = {}
    for e in ledger.events:
        by_round.setdefault(e.round, []).append(e.survivors)
    assert by_round == {1: [N - 1] * (N - 1)}  # round 2 released nothing: nobody charged
    before = checkpoint(cfg, run_dir, 1)
    after = (
        checkpoint(cfg, run_dir, 2)
        if (run_dir / "checkpoints" / "round-0002.safetensors").exists()
        else before
    )
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    runtime.clear()
