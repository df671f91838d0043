"""bench/soak.py reads a run back correctly: round outcomes, the ledger recount (events and
ε by a second accountant) and the finiteness of checkpoints, on hand-made run dirs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedlora.privacy import DPSGDEvent, PrivacyLedger, epsilon_for

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
DELTA = 1e-5


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event(device: str, rnd: int, sigma: float) -> DPSGDEvent:
    return DPSGDEvent(
        device=device,
        round=rnd,
        noise_multiplier=sigma,
        sample_rate=1.0,  # full batch: cheap for both PRV accountants
        steps=2,
        delta=DELTA,
        run="1",
    )


EVENTS = {"d0": [_event("d0", 1, 3.0), _event("d0", 3, 4.0)], "d1": [_event("d1", 2, 5.0)]}


def _run_dir(tmp_path: Path, coordinator: list[DPSGDEvent], eps_shift: float = 0.0) -> Path:
    for device, events in EVENTS.items():
        (tmp_path / "devices" / device).mkdir(parents=True)
        PrivacyLedger(events).save(tmp_path / "devices" / device / "ledger.json")
    (tmp_path / "privacy").mkdir()
    PrivacyLedger(coordinator).save(tmp_path / "privacy" / "ledger.json")
    devices = [
        {"device": d, "epsilon": epsilon_for(evs, DELTA, "prv") + eps_shift}
        for d, evs in EVENTS.items()
    ]
    report = {"accountant": "prv", "devices": devices}
    (tmp_path / "privacy" / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_matching_ledgers_match_and_the_recount_agrees(soak, tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, [e for evs in EVENTS.values() for e in evs])

    got = soak.ledger_check(run_dir, DELTA)

    assert got["ledger_matches"] is True
    assert (got["events_coordinator"], got["events_devices_recount"]) == (3, 3)
    assert got["devices_trained_recount"] == 2
    assert got["max_abs_epsilon_diff"] < soak.EPS_ABS_TOL  # a different implementation agrees


def test_a_missing_event_and_a_wrong_epsilon_are_each_caught(soak, tmp_path, monkeypatch) -> None:
    # The check, not the second accountant, is under test here: skip Opacus' slow PRV.
    monkeypatch.setattr(soak, "opacus_epsilon", lambda evs, delta: epsilon_for(evs, delta, "prv"))
    missing = soak.ledger_check(_run_dir(tmp_path / "a", [*EVENTS["d0"]]), DELTA)
    off = soak.ledger_check(
        _run_dir(tmp_path / "b", [e for evs in EVENTS.values() for e in evs], eps_shift=0.3),
        DELTA,
    )

    assert missing["ledger_matches"] is False
    assert missing["devices_with_other_events"] == ["d1"]
    assert off["ledger_matches"] is False
    assert off["devices_epsilon_outside_tolerance"] == ["d0", "d1"]
    assert off["max_abs_epsilon_diff"] == pytest.approx(0.3, abs=1e-3)


def test_round_outcomes_classify_every_row(soak) -> None:
    rows = [
        {"round": 0, "num_devices": 0},
        {"round": 1, "num_devices": 8},
        {"round": 2, "num_devices": 0, "discarded": "SecAgg+ summed 1 rejected update(s)"},
        {"round": 3, "num_devices": 0, "failed": "collect_masked_vectors: 3 of 6 survived"},
        {"round": 4, "num_devices": 0, "skipped": "only 2 device(s) have privacy budget left"},
        {"round": 5, "num_devices": 9},
    ]

    got = soak.round_outcomes(rows)

    assert (got["run"], got["completed"], got["discarded"], got["failed"], got["skipped"]) == (
        5,
        2,
        1,
        1,
        1,
    )
    assert got["which"] == {"discarded": [2], "failed": [3], "skipped": [4]}


def test_a_non_finite_checkpoint_is_named(soak, tmp_path: Path) -> None:
    good = {"a": np.zeros((2, 2), np.float32)}
    for sub in ("checkpoints", "adapter"):
        (tmp_path / sub).mkdir()
    save_file(good, str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    bad = {"a": np.array([0, np.inf], np.float32)}
    save_file(bad, str(tmp_path / "checkpoints" / "round-0002.safetensors"))
    save_file(good, str(tmp_path / "adapter" / "adapter_model.safetensors"))

    got = soak.checkpoint_check(tmp_path)

    assert got["rounds"] == [1, 2] and got["non_finite"] == ["round-0002.safetensors"]
    assert got["all_finite"] is False


def test_quick_shrinks_the_fleet_and_flags_override_it(soak) -> None:
    assert (soak.parse_args([]).devices, soak.parse_args([]).rounds) == (100, 20)
    quick = soak.parse_args(["--quick"])
    assert (quick.devices, quick.rounds) == (soak.QUICK["devices"], soak.QUICK["rounds"])
    assert soak.parse_args(["--quick", "--rounds", "3"]).rounds == 3
