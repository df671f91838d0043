"""Runs shared between end-to-end modules (each simulation costs tens of seconds)."""

from __future__ import annotations

import pytest

from fedlora.config import FedloraConfig

#: Rounds of the shared small fleet.
ROUNDS = 2


def small_config(**overrides: object) -> FedloraConfig:
    """6 devices, 4 per round, 2 rounds of 3 steps, fixed σ = 1; noise from each device's
    CSPRNG (add ``privacy={"reproducible_noise": True}`` for a run that a seed reproduces)."""
    cfg = FedloraConfig().replace(
        fleet={"num_devices": 6, "devices_per_round": 4, "min_devices": 3},
        training={"rounds": ROUNDS, "local_steps": 3, "batch_size": 8},
        privacy={"noise_multiplier": 1.0},
        seed=1,
    )
    return cfg.replace(**overrides) if overrides else cfg


def plain_config() -> FedloraConfig:
    """The small fleet without SecAgg+ or export, noise seeded from the run: exactly
    reproducible."""
    return small_config(
        secagg={"enabled": False},
        export={"enabled": False},
        privacy={"reproducible_noise": True},
    )


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory):
    """An uninterrupted run of :func:`plain_config`: (config, run_dir, summary)."""
    from fedlora import runtime
    from fedlora.simulate import simulate

    cfg = plain_config()
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    summary = simulate(cfg, run_dir, show_progress=False)
    runtime.clear()
    return cfg, run_dir, summary
