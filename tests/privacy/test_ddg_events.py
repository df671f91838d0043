"""Device-level events (DDGEvent): validation, JSON, and their place in the ledger and reports."""

import dataclasses
import json

import numpy as np
import pytest

from fedlora.errors import PrivacyError, UpdateError
from fedlora.privacy import epsilon_for
from fedlora.privacy.events import (
    DISTRIBUTED_DISCRETE_GAUSSIAN,
    MECHANISMS,
    DDGEvent,
    DPSGDEvent,
    event_from_dict,
)
from fedlora.privacy.ledger import PrivacyLedger, events_digest
from fedlora.privacy.report import build_report
from fedlora.privacy.spend import decode_events, encode_events
from tests.privacy._helpers import ddg_event, event


# ---------------------------------------------------------------- the event
def test_valid_event_keeps_its_fields_and_is_device_level():
    e = ddg_event(device="phone-7", round=3, noise_stddev=2.5, survivors=7, dimension=512)

    assert (e.device, e.round, e.noise_stddev, e.survivors, e.l2_sensitivity, e.dimension) == (
        "phone-7",
        3,
        2.5,
        7,
        1.0,
        512,
    )
    assert e.mechanism == DISTRIBUTED_DISCRETE_GAUSSIAN == "distributed_discrete_gaussian"
    assert e.unit == "device"
    assert event().unit == "record"
    assert DISTRIBUTED_DISCRETE_GAUSSIAN in MECHANISMS


def test_event_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ddg_event().survivors = 3  # type: ignore[misc]


def test_numpy_scalars_are_stored_as_python_numbers():
    e = ddg_event(noise_stddev=np.float64(2.0), survivors=np.int64(5), dimension=np.int32(8))

    assert type(e.noise_stddev) is float and type(e.survivors) is int
    assert type(e.dimension) is int
    assert e == ddg_event(noise_stddev=2.0, survivors=5, dimension=8)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", ""),
        ("device", 3),
        ("round", -1),
        ("round", 1.0),
        ("round", True),
        ("noise_stddev", 0.0),
        ("noise_stddev", -1.0),
        ("noise_stddev", float("inf")),
        ("noise_stddev", 2),  # an int: JSON keeps 2 and 2.0 apart
        ("survivors", 0),
        ("survivors", 2.0),
        ("l2_sensitivity", 0.0),
        ("l2_sensitivity", float("nan")),
        ("dimension", 0),
        ("dimension", False),
        ("delta", 0.0),
        ("delta", 1.0),
        ("run", None),
        ("mechanism", "poisson_subsampled_gaussian"),
        ("mechanism", "laplace"),
    ],
)
def test_invalid_field_is_refused(field, value):
    with pytest.raises(PrivacyError, match=field):
        ddg_event(**{field: value})


def test_a_dpsgd_event_cannot_claim_the_ddg_mechanism():
    with pytest.raises(PrivacyError, match="mechanism"):
        event(mechanism=DISTRIBUTED_DISCRETE_GAUSSIAN)


@pytest.mark.parametrize("run", ["", "run-9"])
def test_json_round_trip(run):
    e = ddg_event(run=run)

    text = json.dumps(e.to_dict())

    assert DDGEvent.from_dict(json.loads(text)) == e
    assert event_from_dict(json.loads(text)) == e
    assert ("run" in e.to_dict()) == bool(run)


def test_event_from_dict_dispatches_on_mechanism():
    record, device = event(round=2), ddg_event(round=2)

    assert type(event_from_dict(record.to_dict())) is DPSGDEvent
    assert type(event_from_dict(device.to_dict())) is DDGEvent
    assert event_from_dict(record.to_dict()) == record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d | {"steps": 3}, "unknown field"),
        (lambda d: {k: v for k, v in d.items() if k != "dimension"}, "missing field"),
        (lambda d: d | {"survivors": "10"}, "survivors"),
        (lambda d: d | {"noise_stddev": 4}, "noise_stddev"),
    ],
)
def test_bad_stored_event_is_refused(change, message):
    bad = change(ddg_event().to_dict())

    with pytest.raises(PrivacyError, match=message):
        event_from_dict(bad)
    with pytest.raises(PrivacyError, match=message):
        DDGEvent.from_dict(bad)


def test_event_from_dict_refuses_non_objects_and_unknown_mechanisms():
    with pytest.raises(PrivacyError, match="JSON object"):
        event_from_dict([1])
    with pytest.raises(PrivacyError, match="mechanism"):
        event_from_dict(event().to_dict() | {"mechanism": "laplace"})


# ---------------------------------------------------------------- the ledger
def both_units_ledger() -> PrivacyLedger:
    return PrivacyLedger(
        [
            event(device="a", round=1, run="r"),
            ddg_event(device="a", round=1, run="r"),
            event(device="a", round=2, run="r"),
            ddg_event(device="b", round=2, run="r", delta=1e-7),
        ]
    )


def test_ledger_holds_both_units_for_one_round_and_round_trips(tmp_path):
    ledger = both_units_ledger()
    path = tmp_path / "ledger.json"

    ledger.save(path)
    loaded = PrivacyLedger.load(path)

    assert loaded == ledger
    assert [type(e) for e in loaded.events] == [DPSGDEvent, DDGEvent, DPSGDEvent, DDGEvent]
    assert json.loads(path.read_text())["version"] == 1  # same format, new content


def test_ledger_checksum_covers_device_level_events(tmp_path):
    path = tmp_path / "ledger.json"
    both_units_ledger().save(path)
    data = json.loads(path.read_text())
    data["events"][1]["noise_stddev"] = 40.0  # claims more noise than was added
    path.write_text(json.dumps(data))

    with pytest.raises(PrivacyError, match="checksum"):
        PrivacyLedger.load(path)


def test_two_device_level_events_for_one_round_are_refused():
    ledger = both_units_ledger()

    with pytest.raises(PrivacyError, match="round 1 of run r \\(device-level\\)"):
        ledger.append(ddg_event(device="a", round=1, run="r", noise_stddev=9.0))

    assert len(ledger) == 4


def test_a_stored_ledger_with_a_duplicate_device_level_round_is_refused():
    doubled = [ddg_event(round=1).to_dict(), ddg_event(round=1, survivors=3).to_dict()]
    ledger = PrivacyLedger().to_dict() | {"events": doubled, "sha256": events_digest(doubled)}

    with pytest.raises(PrivacyError, match=r"event 1: .*accounted once"):
        PrivacyLedger.from_dict(ledger)


def test_accessors_default_to_record_level_events():
    ledger = both_units_ledger()

    assert ledger.events_for("a") == (
        event(device="a", round=1, run="r"),
        event(device="a", round=2, run="r"),
    )
    assert ledger.events_for("b") == ()  # b only has device-level events
    assert ledger.events_for("a", unit="device") == (ddg_event(device="a", round=1, run="r"),)
    assert len(ledger.events_for("a", unit=None)) == 3
    assert ledger.rounds_for("a") == (1, 2)
    assert ledger.rounds_for("b") == ()
    assert ledger.rounds_for("b", run="r", unit="device") == (2,)
    assert ledger.rounds_for("a", unit=None) == (1, 2)
    assert ledger.devices() == ("a",)  # b has no record-level event
    assert ledger.devices(unit="device") == ("a", "b")
    assert ledger.devices(None) == ("a", "b")
    assert [type(e) for e in ledger.events_of("record")] == [DPSGDEvent, DPSGDEvent]
    assert [e.device for e in ledger.events_of("device")] == ["a", "b"]
    assert len(ledger.events_of(None)) == len(ledger) == 4


def test_unknown_unit_is_refused():
    with pytest.raises(PrivacyError, match="unit"):
        both_units_ledger().events_for("a", unit="records")


def test_delta_is_fixed_per_device_and_unit():
    ledger = both_units_ledger()
    ledger.append(ddg_event(device="a", round=3, run="r"))  # same device-level δ: fine

    with pytest.raises(PrivacyError, match="device-level delta"):
        ledger.append(ddg_event(device="a", round=4, run="r", delta=1e-6))


def test_record_level_accountants_never_see_device_level_events_from_the_ledger():
    ledger = both_units_ledger()

    assert epsilon_for(ledger.events_for("a"), 1e-5, "rdp") == epsilon_for(
        [event(device="a", round=1), event(device="a", round=2)], 1e-5, "rdp"
    )


OLD_LEDGER = {
    # Written before device-level events existed (DP-SGD only, one without a run).
    "format": "fedlora.privacy.ledger",
    "version": 1,
    "events": [
        {
            "delta": 1e-05,
            "device": "d0",
            "mechanism": "poisson_subsampled_gaussian",
            "noise_multiplier": 1.1,
            "round": 1,
            "sample_rate": 0.25,
            "steps": 4,
        },
        {
            "delta": 1e-05,
            "device": "d0",
            "mechanism": "poisson_subsampled_gaussian",
            "noise_multiplier": 1.1,
            "round": 2,
            "run": "7",
            "sample_rate": 0.25,
            "steps": 4,
        },
    ],
    "sha256": "d38a71f5aa64cd560ec0f126ea3f173cdb68c8875a734ce2f4854cc0ab227763",
}


def test_old_ledger_loads_unchanged():
    ledger = PrivacyLedger.from_dict(OLD_LEDGER)

    assert [type(e) for e in ledger.events] == [DPSGDEvent, DPSGDEvent]
    assert ledger.rounds_for("d0") == (1, 2)
    assert ledger.to_dict() == OLD_LEDGER


# ---------------------------------------------------------------- a device's spend report
def test_spend_report_carries_both_kinds_and_selects_one():
    events = list(both_units_ledger().events)
    text = encode_events(events)

    record = decode_events(text, "d", max_events=2)
    device = decode_events(text, "d", max_events=2, unit="device")

    assert record == [events[0], events[2]]
    assert device == [events[1], events[3]]
    assert decode_events(text, "d", max_events=4, unit=None) == events


def test_spend_report_with_a_malformed_device_level_event_is_refused():
    bad = ddg_event().to_dict() | {"survivors": 0}

    with pytest.raises(UpdateError, match="malformed"):
        decode_events(json.dumps([event().to_dict(), bad]), "d", max_events=2)


def test_spend_report_counts_events_of_the_unit_asked_for():
    text = encode_events([ddg_event(round=r) for r in (1, 2, 3)])

    with pytest.raises(UpdateError, match="3 events; at most 2"):
        decode_events(text, "d", max_events=2, unit="device")


def test_the_record_level_report_reads_only_record_level_events():
    record_only = PrivacyLedger([event(device="a", round=1), event(device="a", round=2)])
    both = PrivacyLedger(
        [
            *record_only.events,
            ddg_event(device="a", round=1, delta=1e-7),
            ddg_event(device="b", round=2, delta=1e-7),  # b: device-level only, no budget
        ]
    )

    report = build_report(both, {"a": 8.0}, 1e-5, "rdp")

    assert report == build_report(record_only, {"a": 8.0}, 1e-5, "rdp")
    assert report["ledger_deltas"] == [1e-5]
