"""LoraFedAvg.configure_fit samples only devices that are online (a simulated device's
seeded draw) and have privacy budget left, by count or by fraction, with a minimum; and
:func:`fedlora.server.sampling.forecast` says beforehand what it will sample."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import ClientManager

from fedlora import fleetsim
from fedlora.config import FedloraConfig
from fedlora.server.budget import FleetBudget
from fedlora.server.sampling import forecast
from fedlora.server.strategy import LoraFedAvg

PROFILES = [
    {"name": "flaky", "share": 0.5, "availability": 0.3},
    {"name": "steady", "share": 0.5, "availability": 0.9},
]


class Manager:
    """The part of Flower's ClientManager that configure_fit uses."""

    def __init__(self, node_ids: list[int]) -> None:
        self.proxies = {str(n): SimpleNamespace(node_id=n) for n in node_ids}

    def num_available(self) -> int:
        return len(self.proxies)

    def all(self) -> dict[str, Any]:
        return self.proxies


def make(
    tmp_path: Path, n: int = 100, profiles: list[dict[str, Any]] = PROFILES, **fleet: Any
) -> LoraFedAvg:
    cfg = FedloraConfig().replace(
        fleet={
            "num_devices": n,
            "devices_per_round": 10,
            "min_devices": 3,
            "profiles": profiles,
            **fleet,
        },
        privacy={"noise_multiplier": 1.0},
    )
    budget = FleetBudget(cfg.privacy, steps_per_round=10, batch_size=16)
    for i in range(n):
        device = f"device-{i:04d}"
        props: dict[str, Any] = {"device": device, "num_records": 100}
        if profiles:
            props["profile"] = fleetsim.profile_of(cfg.fleet, cfg.seed, device).name  # type: ignore[union-attr]
        budget.register(1000 + i, props)
    arrays = [np.zeros((2, 2), np.float32)]
    return LoraFedAvg(cfg, arrays, ["a"], lambda a: 1.0, budget, tmp_path)


def sample(strategy: LoraFedAvg, rnd: int, n: int = 100) -> list[str]:
    manager = cast(ClientManager, Manager([1000 + i for i in range(n)]))
    params = ndarrays_to_parameters(strategy.global_arrays)
    picked = strategy.configure_fit(rnd, params, manager)
    return [strategy.budget.node_device[p.node_id] for p, _ in picked]


def test_only_online_devices_with_budget_left_are_sampled(tmp_path):
    strategy = make(tmp_path)
    spent = {f"device-{i:04d}" for i in range(0, 100, 3)}
    strategy.budget.declined |= spent  # they said their budget is gone

    for rnd in range(1, 6):
        chosen = sample(strategy, rnd)
        fleet, seed = strategy.cfg.fleet, strategy.cfg.seed
        online = {
            f"device-{i:04d}"
            for i in range(100)
            if fleetsim.is_online(fleet, seed, f"device-{i:04d}", rnd)
        }
        assert len(chosen) == 10
        assert set(chosen) <= online - spent
        assert strategy._round.online == len(online - spent)
        assert strategy._round.eligible == 100 - len(spent)


def test_availability_follows_the_profiles(tmp_path):
    strategy = make(tmp_path, n=400, devices_per_round=400, min_devices=3)
    counts = {"flaky": [0, 0], "steady": [0, 0]}
    for rnd in range(1, 4):
        chosen = set(sample(strategy, rnd, n=400))
        for i in range(400):
            device = f"device-{i:04d}"
            name = strategy.budget.profiles[device]
            counts[name][0] += device in chosen
            counts[name][1] += 1
    assert counts["flaky"][0] / counts["flaky"][1] == pytest.approx(0.3, abs=0.06)
    assert counts["steady"][0] / counts["steady"][1] == pytest.approx(0.9, abs=0.05)


def test_the_same_seed_samples_the_same_devices(tmp_path):
    a = [sample(make(tmp_path), rnd) for rnd in (1, 2, 3)]
    b = [sample(make(tmp_path), rnd) for rnd in (1, 2, 3)]
    assert a == b


def test_devices_without_a_profile_are_always_online(tmp_path):
    """A deployed device reports no profile: its availability is its own, not drawn."""
    strategy = make(tmp_path)
    strategy.budget.profiles.clear()
    sample(strategy, 1)
    assert strategy._round.online == 100


def test_without_profiles_sampling_is_as_before(tmp_path):
    """Same devices as the sampler without availability: a choice from every eligible."""
    strategy = make(tmp_path, profiles=[])
    chosen = sample(strategy, 1)
    rng = np.random.default_rng(strategy.cfg.seed)
    expected = sorted(f"device-{int(i):04d}" for i in rng.choice(100, size=10, replace=False))
    assert chosen == expected


@pytest.mark.parametrize(
    ("fraction", "cap", "expected"),
    [(0.1, 50, "ceil"), (0.01, 50, 3), (1.0, 7, 7)],
)
def test_a_fraction_of_the_available_devices_at_least_the_minimum(
    tmp_path, fraction, cap, expected
):
    strategy = make(tmp_path, fraction_per_round=fraction, devices_per_round=cap)
    chosen = sample(strategy, 2)
    online = strategy._round.online
    want = -(-online // 10) if expected == "ceil" else expected
    assert len(chosen) == want


def test_too_few_online_devices_skip_the_round_saying_why(tmp_path):
    offline = [{"name": "off", "share": 1.0, "availability": 0.0}]
    strategy = make(tmp_path, n=20, profiles=offline)

    assert sample(strategy, 1, n=20) == []
    reason = strategy._round.skipped_reason
    assert reason == (
        "only 0 device(s) have privacy budget left and are online (20 offline) "
        "(fewer than fleet.min_devices=3)"
    )


@pytest.mark.parametrize(
    "fleet",
    [
        {"profiles": PROFILES},
        {"profiles": []},
        {"profiles": PROFILES, "fraction_per_round": 0.15, "devices_per_round": 50},
        # offline devices skip some rounds entirely, without a draw
        {"profiles": [{"name": "rare", "share": 1.0, "availability": 0.04}]},
    ],
)
def test_the_forecast_is_what_the_coordinator_samples_round_after_round(tmp_path, fleet):
    strategy = make(tmp_path, **fleet)
    devices = [f"device-{i:04d}" for i in range(100)]

    expected = forecast(strategy.cfg, devices, rounds=8)
    sampled = [sample(strategy, rnd) for rnd in range(1, 9)]

    assert sampled == expected
    assert sum(1 for r in sampled if r) >= 4  # not vacuous: most rounds sample someone
