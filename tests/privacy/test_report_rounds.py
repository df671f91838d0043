"""The report's round-by-round ε, next-round cost, exhaustion rules, and an independent check."""

import logging
import warnings

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from fedlora.errors import ConfigError
from fedlora.privacy import report as report_module
from fedlora.privacy.accountants import epsilon_for
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.report import RunInfo, build_report, epsilons_of
from tests.privacy._helpers import event

DELTA = 1e-5


def _ledger() -> PrivacyLedger:
    # "a" trains rounds 1-3, "b" rounds 2-3 with its own q, "c" only round 3 like "a"'s round 1.
    # Appended out of round order for "a" to check prefixes follow rounds, not file order.
    return PrivacyLedger(
        [
            event(device="a", round=2, noise_multiplier=0.8, sample_rate=0.1, steps=20),
            event(device="a", round=1, noise_multiplier=0.8, sample_rate=0.1, steps=20),
            event(device="b", round=2, noise_multiplier=1.0, sample_rate=0.2, steps=15),
            event(device="a", round=3, noise_multiplier=0.9, sample_rate=0.1, steps=20),
            event(device="b", round=3, noise_multiplier=1.0, sample_rate=0.2, steps=15),
            event(device="c", round=3, noise_multiplier=0.8, sample_rate=0.1, steps=20),
        ]
    )


@pytest.fixture(scope="module")
def ledger():
    return _ledger()


@pytest.fixture(scope="module")
def report(ledger):
    return build_report(ledger, {"a": 10.0, "b": 10.0, "c": 10.0}, DELTA, fleet_size=5)


def _by_device(report):
    return {d["device"]: d for d in report["devices"]}


def test_each_round_is_the_epsilon_of_the_ledger_prefix(ledger, report):
    a = _by_device(report)["a"]
    events = sorted(ledger.events_for("a"), key=lambda e: e.round)

    assert [r["round"] for r in a["rounds"]] == [1, 2, 3]
    for k, r in enumerate(a["rounds"], start=1):
        assert r["epsilon"] == epsilon_for(events[:k], DELTA, "prv")
        assert (r["noise_multiplier"], r["sample_rate"], r["steps"]) == (
            events[k - 1].noise_multiplier,
            events[k - 1].sample_rate,
            events[k - 1].steps,
        )
    assert a["epsilon"] == a["rounds"][-1]["epsilon"]
    increases = [r["epsilon_increase"] for r in a["rounds"]]
    assert sum(increases) == pytest.approx(a["epsilon"])
    assert all(x > 0 for x in increases)


def test_next_round_repeats_the_last_round(ledger, report):
    a = _by_device(report)["a"]
    events = ledger.events_for("a")
    again = event(device="a", round=4, noise_multiplier=0.9, sample_rate=0.1, steps=20)

    assert a["epsilon_next_round"] == epsilon_for([*events, again], DELTA, "prv")
    assert a["epsilon_next_round"] > a["epsilon"]
    assert a["next_round_within_budget"] is True


def _dp_accounting_pld(groups):
    acc = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in groups:
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
        )
    return float(acc.get_epsilon(DELTA))


def _opacus_prv(groups):
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    for sigma, q, steps in groups:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(DELTA))


def test_every_epsilon_matches_independent_accountants_within_1_percent(ledger, report):
    logging.getLogger("absl").setLevel(logging.ERROR)
    pytest.importorskip("opacus.accountants")
    checked = 0
    for d in report["devices"]:
        events = sorted(ledger.events_for(d["device"]), key=lambda e: e.round)
        for k, r in enumerate(d["rounds"], start=1):
            groups = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events[:k]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pld, opacus = _dp_accounting_pld(groups), _opacus_prv(groups)
            assert r["epsilon"] == pytest.approx(pld, rel=0.01), (d["device"], k)
            assert r["epsilon"] == pytest.approx(opacus, rel=0.01), (d["device"], k)
            checked += 1
    assert checked == 6


def test_devices_with_the_same_history_share_one_computation(ledger, monkeypatch):
    calls = []
    real = report_module._epsilon_of

    def counting(history, delta, accountant):
        calls.append(history)
        return real(history, delta, accountant)

    monkeypatch.setattr(report_module, "_epsilon_of", counting)
    build_report(ledger, {"a": 10.0, "b": 10.0, "c": 10.0}, DELTA, "rdp")

    # a: 3 prefixes + next; b: 2 + next; c: its round 1 and its next are a's first two.
    assert len(calls) == len(set(calls)) == 7


def test_fleet_by_round(report):
    a, b, c = (_by_device(report)[k] for k in "abc")
    rounds = report["fleet"]["rounds"]

    assert [(r["round"], r["devices_trained"]) for r in rounds] == [(1, 1), (2, 2), (3, 3)]
    assert rounds[0]["max_epsilon"] == a["rounds"][0]["epsilon"]
    assert rounds[0]["median_epsilon"] == 0.0  # four of five devices not trained yet
    assert rounds[1]["max_epsilon"] == max(a["rounds"][1]["epsilon"], b["rounds"][0]["epsilon"])
    assert rounds[2]["max_epsilon"] == report["fleet"]["max_epsilon"]
    # After round 3: a, b, c and two devices that never trained (ε = 0).
    assert rounds[2]["median_epsilon"] == c["epsilon"] == a["rounds"][0]["epsilon"]


def test_fleet_counts_unnamed_devices_that_never_trained(report):
    fleet = report["fleet"]

    assert (fleet["num_devices"], fleet["num_trained"]) == (5, 3)
    assert fleet["median_epsilon"] == _by_device(report)["c"]["epsilon"]
    assert any("2 device(s) of the fleet never trained" in n for n in report["notes"])


def test_fleet_next_round(report):
    trained = report["devices"]
    nxt = report["fleet"]["next_round"]

    assert nxt["max_epsilon"] == max(d["epsilon_next_round"] for d in trained)
    increases = sorted(d["epsilon_next_round"] - d["epsilon"] for d in trained)
    assert nxt["max_epsilon_increase"] == increases[-1]
    assert nxt["median_epsilon_increase"] == increases[1]
    assert nxt["num_within_budget"] == 3


def _budget_between(ledger, device):
    """A budget above the device's ε but below its next round's."""
    probe = build_report(ledger, {"a": 100.0, "b": 100.0, "c": 100.0}, DELTA, "rdp")  # any mode
    d = _by_device(probe)[device]
    return (d["epsilon"] + d["epsilon_next_round"]) / 2


@pytest.mark.parametrize(
    ("noise", "exhausted"), [("fixed", True), ("calibrated", False), (None, False)]
)
def test_next_round_decides_exhaustion_only_with_a_fixed_noise_multiplier(ledger, noise, exhausted):
    budget = _budget_between(ledger, "a")

    report = build_report(ledger, {"a": budget, "b": 100.0, "c": 100.0}, DELTA, "rdp", noise=noise)

    a = _by_device(report)["a"]
    assert a["epsilon"] < budget < a["epsilon_next_round"]
    assert a["next_round_within_budget"] is False
    assert a["exhausted"] is exhausted
    assert report["fleet"]["num_exhausted"] == int(exhausted)
    assert report["noise"] == noise and report["exhaustion_rule"].startswith("a device is")


def test_fixed_noise_devices_that_never_trained_are_not_exhausted(ledger):
    report = build_report(
        ledger, {"a": 10.0, "b": 10.0, "c": 10.0, "idle": 1.0}, DELTA, "rdp", noise="fixed"
    )

    idle = _by_device(report)["idle"]
    assert not idle["exhausted"] and idle["next_round_within_budget"] is None


@pytest.mark.parametrize("noise", ["fixed", "calibrated", None])
def test_a_spent_budget_is_exhausted_in_every_mode(ledger, noise):
    probe = _by_device(build_report(ledger, {"a": 100.0, "b": 1.0, "c": 1.0}, DELTA, "rdp"))
    spent = probe["a"]["epsilon"] * (1 + 1e-12)  # within the coordinator's tolerance

    report = build_report(ledger, {"a": spent, "b": 100, "c": 100}, DELTA, "rdp", noise=noise)

    assert _by_device(report)["a"]["exhausted"]


def test_in_progress_run_is_said_so():
    run = RunInfo(status="running", rounds_planned=10, rounds_completed=3, secagg=True)

    report = build_report(_ledger(), {"a": 10.0, "b": 10.0, "c": 10.0}, DELTA, "rdp", run=run)

    assert report["run"] == {
        "status": "running",
        "in_progress": True,
        "rounds_planned": 10,
        "rounds_completed": 3,
        "secagg": True,
        "unreconciled": None,
        "resumed_at": [],
    }
    assert "in progress after round 3 of 10" in report["notes"][0]


def test_another_delta_is_reported_with_a_note(ledger):
    report = build_report(ledger, {"a": 10.0, "b": 10.0, "c": 10.0}, 1e-6, "rdp")

    assert report["delta"] == 1e-6 and report["ledger_deltas"] == [DELTA]
    assert not report["delta_matches_ledger"]
    assert all(d["delta"] == 1e-6 and d["ledger_delta"] == DELTA for d in report["devices"])
    assert _by_device(report)["a"]["epsilon"] == epsilon_for(ledger.events_for("a"), 1e-6, "rdp")
    assert any("delta=1e-06" in n and "delta=1e-05" in n for n in report["notes"])


def test_without_secagg_the_assumptions_say_so(ledger):
    run = RunInfo(status="complete", secagg=False)

    report = build_report(ledger, {"a": 10.0, "b": 10.0, "c": 10.0}, DELTA, "rdp", run=run)

    assert "without SecAgg+" in report["assumptions"][-1]


def test_worker_processes_give_the_same_epsilons(monkeypatch):
    histories = [((1.0 + i / 100, 0.1, 10),) for i in range(4)]
    monkeypatch.setattr(report_module, "PARALLEL_MIN_HISTORIES", 2)
    seen = []

    parallel = epsilons_of(histories, DELTA, "rdp", workers=2, progress=lambda d, t: seen.append(t))

    assert parallel == epsilons_of(histories, DELTA, "rdp", workers=1)
    assert seen == [4, 4, 4, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise": "adaptive"}, "noise must be one of"),
        ({"fleet_size": 2}, "the fleet has 2 device"),
        ({"fleet_size": -1}, "fleet_size must be"),
        ({"workers": 0}, "workers must be"),
        ({"run": {"status": "running"}}, "run must be a RunInfo"),
    ],
)
def test_invalid_options_are_refused(ledger, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_report(ledger, {"a": 10.0, "b": 10.0, "c": 10.0}, DELTA, "rdp", **kwargs)


def test_invalid_run_info_is_refused():
    with pytest.raises(ConfigError, match="run status"):
        RunInfo(status="paused")
    with pytest.raises(ConfigError, match="rounds_planned"):
        RunInfo(rounds_planned=-1)
