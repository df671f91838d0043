"""End to end: a simulated fleet with device profiles on Flower's engine, SecAgg+ on.

Devices offline in a round are never sampled (their ledgers show no training that
round); devices drop out where their seeded draw says; every round's row says what its
training, the framework and the traffic cost.
"""

from __future__ import annotations

import json

import pytest

from fedlora import fleetsim
from fedlora.config import FedloraConfig

pytestmark = pytest.mark.slow

ROUNDS = 2
PROFILES = [
    {"name": "phone", "share": 0.5, "speed": 0.5, "availability": 0.7, "dropout": 0.3},
    {"name": "laptop", "share": 0.5, "budget_epsilon": 4.0},
]


def test_a_fleet_with_profiles_samples_online_devices_and_loses_the_drawn_ones(tmp_path):
    from fedlora import runtime
    from fedlora.privacy import PrivacyLedger
    from fedlora.simulate import simulate

    cfg = FedloraConfig().replace(
        fleet={"num_devices": 8, "devices_per_round": 5, "min_devices": 3, "profiles": PROFILES},
        training={"rounds": ROUNDS, "local_steps": 1, "batch_size": 8},
        export={"enabled": False},
        seed=2,
    )
    run_dir = tmp_path / "run"
    simulate(cfg, run_dir, show_progress=False)
    runtime.clear()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ledgers = {
        p.parent.name: PrivacyLedger.load(p) for p in (run_dir / "devices").glob("*/ledger.json")
    }
    devices = [f"device-{i:04d}" for i in range(8)]
    for rnd in range(1, ROUNDS + 1):
        row = rows[rnd]
        online = [d for d in devices if fleetsim.is_online(cfg.fleet, cfg.seed, d, rnd)]
        assert row["online"] == len(online) and row["sampled"] == min(5, len(online))
        trained = {d for d, ledger in ledgers.items() if rnd in ledger.rounds_for(d)}
        assert trained <= set(online)  # an offline device is never asked
        for d in trained:  # a device drawn to drop before training never trained
            point = fleetsim.drop_point(cfg.fleet, cfg.seed, d, rnd, secagg=True)
            assert point not in {
                ("setup", "before"),
                ("share_keys", "before"),
                ("collect_masked_vectors", "before"),
            }
        # what the round cost, in time and bytes
        assert 0 < row["train_s_max"] <= row["train_s_total"] < 60
        assert row["framework_s"] == pytest.approx(row["round_s"] - row["train_s_max"])
        # the global adapter went to each device still in at training, a masked vector
        # (one int per value, at least) came back from each that trained and answered
        lost = row["dropouts"]
        asked = row["sampled"] - lost.get("setup", 0) - lost.get("share_keys", 0)
        answered = asked - lost.get("collect_masked_vectors", 0)
        adapter_bytes = 4 * runtime_adapter_size(cfg)
        assert row["bytes_down"] > asked * adapter_bytes
        assert row["bytes_up"] > answered * adapter_bytes
        assert row["bytes_up_per_device"] == pytest.approx(row["bytes_up"] / row["sampled"])
    drawn = sum(
        fleetsim.drop_point(cfg.fleet, cfg.seed, d, rnd, secagg=True) is not None
        for rnd in range(1, ROUNDS + 1)
        for d in devices
    )
    assert drawn > 0  # this seed does draw dropouts
    # a laptop keeps its profile's own budget, and stays within it
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    for entry in report["devices"]:
        profile = fleetsim.profile_of(cfg.fleet, cfg.seed, entry["device"])
        assert profile is not None
        assert entry["budget_epsilon"] == (4.0 if profile.name == "laptop" else 8.0)
        assert entry["epsilon"] <= entry["budget_epsilon"] + 1e-6


def runtime_adapter_size(cfg: FedloraConfig) -> int:
    from fedlora import runtime

    return int(sum(a.size for a in runtime.model_bundle(cfg).initial_arrays))
