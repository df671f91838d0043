"""End to end on a real non-IID fleet: tinyshakespeare, one device per speaking role.

A small DP-SGD + SecAgg+ run through Flower's simulation engine on the play
(``../shared/data/tinyshakespeare.txt``, skipped when it is not there). The
devices must be the play's roles, the coordinator's loss must not get worse,
and no device may end past its ε budget.
"""

from __future__ import annotations

import json
import math

import pytest

from fedlora.config import FedloraConfig
from fedlora.data.shakespeare import find_shakespeare

PLAY = find_shakespeare()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PLAY is None, reason="../shared/data/tinyshakespeare.txt is not present"),
]

ROUNDS = 2
DEVICES = 6
PER_ROUND = 4
LOCAL_STEPS = 3
# DP noise on 4 devices × 3 steps can nudge the loss up a little; more than this is a regression.
LOSS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fedlora import runtime
    from fedlora.simulate import simulate

    cfg = FedloraConfig().replace(
        seed=1,
        data={"path": str(PLAY), "partition": "natural"},
        fleet={"num_devices": DEVICES, "devices_per_round": PER_ROUND, "min_devices": 3},
        training={"rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch_size": 8},
        # Seeded noise (research option): this test is about the play's roles becoming
        # devices, so its loss check must not ride on a fresh noise draw every CI run.
        privacy={"enabled": True, "reproducible_noise": True},
        secagg={"enabled": True},
        export={"enabled": False},
    )
    run_dir = tmp_path_factory.mktemp("shakespeare") / "run"
    try:
        summary = simulate(cfg, run_dir, show_progress=False)
    finally:
        runtime.clear()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir, summary, rows


def _roles_in_play() -> set[str]:
    """Every ``NAME:`` line of the play, without the colon."""
    assert PLAY is not None
    lines = PLAY.read_text(encoding="utf-8").splitlines()
    return {line[:-1].strip() for line in lines if line.endswith(":") and line[:1].isalpha()}


def test_run_completes_with_one_device_per_role(run):
    _, run_dir, summary, rows = run
    status = json.loads((run_dir / "run.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())

    assert status["status"] == "complete"
    assert summary["dp"] is True and summary["secagg"] is True
    assert config["resolved"]["devices"] == DEVICES
    assert "one device per role" in config["resolved"]["data_description"]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r["num_devices"] == PER_ROUND and r["secagg"] is True for r in rows[1:])


def test_ledger_devices_are_speaking_roles(run):
    from fedlora.privacy import PrivacyLedger

    _, run_dir, _, _ = run
    ledger = PrivacyLedger.load(run_dir / "privacy" / "ledger.json")
    devices = set(ledger.devices())
    roles = _roles_in_play()

    assert len(ledger.events) == PER_ROUND * ROUNDS
    assert PER_ROUND <= len(devices) <= DEVICES
    assert devices <= roles, sorted(devices - roles)
    assert not any(d.startswith("device-") for d in devices)  # not a synthetic split
    assert all(ev.steps == LOCAL_STEPS for ev in ledger.events)


def test_eval_loss_is_finite_and_does_not_get_worse(run):
    _, _, summary, rows = run
    losses = [r["eval_loss"] for r in rows]

    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    assert summary["eval_loss_round0"] == losses[0]
    assert summary["eval_loss_final"] == losses[-1]
    assert losses[-1] <= losses[0] + LOSS_TOLERANCE, losses


def test_every_device_stays_within_its_budget(run):
    from fedlora.privacy import PrivacyLedger

    cfg, run_dir, summary, _ = run
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    trained = set(PrivacyLedger.load(run_dir / "privacy" / "ledger.json").devices())
    budget = cfg.privacy.epsilon

    assert report["delta"] == cfg.privacy.delta
    assert {d["device"] for d in report["devices"]} >= trained
    for device in report["devices"]:
        assert 0 <= device["epsilon"] <= budget, device
        assert (device["epsilon"] > 0) == (device["device"] in trained), device
    assert summary["privacy"]["max_epsilon"] <= budget
    assert summary["privacy"]["accountant"] == report["accountant"]
