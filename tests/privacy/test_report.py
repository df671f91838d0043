import json
import os

import pytest

from fedlora.errors import ConfigError, PrivacyError
from fedlora.privacy.accountants import epsilon_for
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.report import REPRODUCIBLE_NOISE_WARNING, RunInfo, build_report, write_report
from tests.privacy._helpers import event

DELTA = 1e-5


@pytest.fixture
def ledger():
    return PrivacyLedger(
        [
            event(device="a", round=1, noise_multiplier=1.0, steps=20),
            event(device="a", round=2, noise_multiplier=1.0, steps=20),
            event(device="b", round=1, noise_multiplier=0.6, sample_rate=0.3, steps=40),
            event(device="c", round=2, noise_multiplier=1.0, steps=20),  # same schedule as "a"
            event(device="c", round=3, noise_multiplier=1.0, steps=20),
        ]
    )


@pytest.fixture
def report(ledger):
    return build_report(ledger, {"a": 8.0, "b": 8.0, "c": 8.0, "idle": 2.0}, DELTA, "rdp")


def test_layout(report):
    assert report["format"] == "fedlora.privacy.report"
    assert report["version"] == 2
    assert report["accountant"] == "rdp"
    assert report["delta"] == DELTA
    assert report["noise"] is None  # not stated: "exhausted" means spent, as in version 1
    assert report["noise_source"] is None  # not stated either (no run information)
    assert report["privacy_unit"] == "one training sequence (record) of one device"
    assert [d["device"] for d in report["devices"]] == ["a", "b", "c", "idle"]
    assert set(report) == {
        "format",
        "version",
        "accountant",
        "delta",
        "ledger_deltas",
        "delta_matches_ledger",
        "noise",
        "exhaustion_rule",
        "run",
        "noise_source",
        "devices",
        "fleet",
        "privacy_unit",
        "assumptions",
        "notes",
    }
    assert set(report["devices"][0]) == {
        "device",
        "epsilon",
        "budget_epsilon",
        "remaining_epsilon",
        "rounds_trained",
        "steps",
        "exhausted",
        "accountant",
        "delta",
        "ledger_delta",
        "epsilon_next_round",
        "next_round_within_budget",
        "rounds",
    }


def test_device_entries(ledger, report):
    a, b, c, _ = report["devices"]

    assert a["epsilon"] == epsilon_for(ledger.events_for("a"), DELTA, "rdp")
    assert a["epsilon"] == c["epsilon"]
    assert (a["rounds_trained"], a["steps"], a["budget_epsilon"]) == (2, 40, 8.0)
    assert a["remaining_epsilon"] == pytest.approx(8.0 - a["epsilon"])
    assert not a["exhausted"]
    assert b["epsilon"] > 8.0 and b["exhausted"] and b["remaining_epsilon"] < 0


def test_device_with_a_budget_but_no_events_shows_zero(report):
    idle = report["devices"][-1]

    assert idle == {
        "device": "idle",
        "epsilon": 0.0,
        "budget_epsilon": 2.0,
        "remaining_epsilon": 2.0,
        "rounds_trained": 0,
        "steps": 0,
        "exhausted": False,
        "accountant": "rdp",
        "delta": DELTA,
        "ledger_delta": None,
        "epsilon_next_round": None,
        "next_round_within_budget": None,
        "rounds": [],
    }


def test_fleet_summary(report):
    epsilons = sorted(d["epsilon"] for d in report["devices"])

    fleet = report["fleet"]
    assert fleet["max_epsilon"] == epsilons[-1]
    assert fleet["median_epsilon"] == pytest.approx((epsilons[1] + epsilons[2]) / 2)
    assert (fleet["num_devices"], fleet["num_trained"], fleet["num_exhausted"]) == (4, 3, 1)


def test_assumptions_say_what_is_and_is_not_protected(report):
    text = " ".join(report["assumptions"]).lower()

    for phrase in ("record-level", "poisson", "secagg+", "plaintext", "example counts"):
        assert phrase in text
    assert "noise and the poisson sampling are secret" in text


def test_default_accountant_is_prv(ledger):
    report = build_report(ledger, {"a": 8.0, "b": 8.0, "c": 8.0}, DELTA)

    assert report["accountant"] == "prv"
    assert report["devices"][0]["epsilon"] == epsilon_for(ledger.events_for("a"), DELTA, "prv")


def test_empty_fleet():
    report = build_report(PrivacyLedger(), {}, DELTA)

    assert report["devices"] == []
    assert report["fleet"] == {
        "max_epsilon": 0.0,
        "median_epsilon": 0.0,
        "num_devices": 0,
        "num_trained": 0,
        "num_exhausted": 0,
        "rounds": [],
        "next_round": {
            "max_epsilon": None,
            "max_epsilon_increase": None,
            "median_epsilon_increase": None,
            "num_within_budget": 0,
        },
    }
    assert report["ledger_deltas"] == [] and report["delta_matches_ledger"]


def test_device_without_a_budget_is_refused(ledger):
    with pytest.raises(ConfigError, match="'b' trained but have no privacy budget"):
        build_report(ledger, {"a": 8.0, "c": 8.0}, DELTA)


@pytest.mark.parametrize("budget", [0.0, -1.0, float("inf"), True, "8"])
def test_invalid_budget_is_refused(ledger, budget):
    with pytest.raises(ConfigError, match="budget of device 'a'"):
        build_report(ledger, {"a": budget, "b": 8.0, "c": 8.0}, DELTA)


def test_invalid_arguments_are_refused(ledger):
    budgets = {"a": 8.0, "b": 8.0, "c": 8.0}
    with pytest.raises(PrivacyError, match="delta"):
        build_report(ledger, budgets, 0.0)
    with pytest.raises(ConfigError, match="unknown privacy accountant"):
        build_report(ledger, budgets, DELTA, "gdp")
    with pytest.raises(PrivacyError, match="PrivacyLedger"):
        build_report(ledger.to_dict(), budgets, DELTA)  # type: ignore[arg-type]


def test_write_report_round_trips(tmp_path, report):
    path = tmp_path / "privacy_report.json"

    write_report(report, path)

    assert json.loads(path.read_text()) == report
    assert os.listdir(tmp_path) == ["privacy_report.json"]


def test_failed_write_keeps_the_old_report(tmp_path, report, monkeypatch):
    path = tmp_path / "privacy_report.json"
    path.write_text("old")

    def crash(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PrivacyError, match="cannot write privacy report"):
        write_report(report, path)

    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["privacy_report.json"]


def test_non_json_report_is_refused(tmp_path):
    with pytest.raises(PrivacyError, match="not plain JSON"):
        write_report({"epsilon": float("nan")}, tmp_path / "r.json")


# ---------------------------------------------------------------- noise source
def test_noise_from_the_os_csprng_is_stated_without_a_warning(ledger):
    run = RunInfo(status="complete", secagg=True, reproducible_noise=False)

    report = build_report(ledger, {"a": 8.0, "b": 8.0, "c": 8.0}, DELTA, "rdp", run=run)

    assert report["noise_source"] == {"source": "os-csprng-chacha20", "reproducible": False}
    assert REPRODUCIBLE_NOISE_WARNING not in report["notes"]
    assert "reproducible_noise" not in report["run"]  # said once, at the top level


def test_reproducible_noise_is_stated_with_a_warning_in_words(ledger):
    run = RunInfo(status="running", rounds_planned=5, rounds_completed=2, reproducible_noise=True)

    report = build_report(ledger, {"a": 8.0, "b": 8.0, "c": 8.0}, DELTA, "rdp", run=run)

    assert report["noise_source"] == {"source": "seeded-chacha20", "reproducible": True}
    warning = report["notes"][0]  # first: it qualifies every number in the report
    assert warning == REPRODUCIBLE_NOISE_WARNING
    for words in (
        "run's seed (config.json)",
        "the coordinator included",
        "epsilon stated here does not hold against them",
    ):
        assert words in warning
    assert "in progress" in report["notes"][1]


def test_the_noise_source_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"RunInfo\.reproducible_noise must be a bool"):
        RunInfo(reproducible_noise="false")  # type: ignore[arg-type]
