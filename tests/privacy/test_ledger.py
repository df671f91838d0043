import hashlib
import json
import os

import pytest

from fedlora.errors import PrivacyError
from fedlora.privacy.ledger import LEDGER_FORMAT, PrivacyLedger, events_digest
from tests.privacy._helpers import event


@pytest.fixture
def ledger():
    return PrivacyLedger(
        [
            event(device="b", round=1, steps=5),
            event(device="a", round=1, steps=7),
            event(device="b", round=2, noise_multiplier=1.2, steps=6),
            event(device="a", round=4, sample_rate=0.2),
        ]
    )


# ---------------------------------------------------------------- recording
def test_queries_by_device(ledger):
    assert ledger.devices() == ("a", "b")
    assert [e.steps for e in ledger.events_for("b")] == [5, 6]
    assert ledger.rounds_for("a") == (1, 4)
    assert ledger.events_for("nobody") == ()
    assert ledger.rounds_for("nobody") == ()
    assert len(ledger) == 4
    assert [e.device for e in ledger.events] == ["b", "a", "b", "a"]


def test_events_is_a_snapshot(ledger):
    before = ledger.events

    ledger.append(event(device="c", round=1))

    assert len(before) == 4
    assert len(ledger.events) == 5


def test_duplicate_device_round_is_refused(ledger):
    with pytest.raises(PrivacyError, match="already has an event for device 'a' in round 4"):
        ledger.append(event(device="a", round=4, steps=1))

    assert len(ledger) == 4


def test_same_round_on_other_device_is_fine(ledger):
    ledger.append(event(device="c", round=4))

    assert ledger.rounds_for("c") == (4,)


def test_changing_a_devices_delta_is_refused(ledger):
    with pytest.raises(PrivacyError, match="delta is fixed"):
        ledger.append(event(device="a", round=5, delta=1e-6))


def test_only_events_are_recorded():
    with pytest.raises(PrivacyError, match="DPSGDEvent"):
        PrivacyLedger().append({"device": "a"})  # type: ignore[arg-type]


# ---------------------------------------------------------------- serialisation
def test_to_dict_layout_and_checksum(ledger):
    d = ledger.to_dict()

    assert d["format"] == "fedlora.privacy.ledger"
    assert d["version"] == 1
    assert len(d["events"]) == 4
    canonical = json.dumps(d["events"], sort_keys=True, separators=(",", ":"))
    assert d["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()


def test_dict_round_trip(ledger):
    back = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))

    assert back == ledger
    assert back.events == ledger.events


def test_save_load_round_trip(tmp_path, ledger):
    path = tmp_path / "ledger.json"

    ledger.save(path)
    back = PrivacyLedger.load(path)

    assert back == ledger
    assert sorted(os.listdir(tmp_path)) == ["ledger.json"]  # no temporary left behind


def test_save_replaces_existing_file(tmp_path, ledger):
    path = tmp_path / "ledger.json"
    PrivacyLedger().save(path)

    ledger.save(path)

    assert len(PrivacyLedger.load(path)) == 4


def test_failed_save_leaves_old_file_intact(tmp_path, ledger, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger.save(path)
    before = path.read_bytes()
    bigger = PrivacyLedger([*ledger.events, event(device="z", round=9)])

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PrivacyError, match=r"cannot write ledger.*No space left"):
        bigger.save(path)

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ledger.json"]


def test_save_into_missing_directory_is_a_privacy_error(tmp_path, ledger):
    with pytest.raises(PrivacyError, match="cannot write ledger"):
        ledger.save(tmp_path / "no" / "such" / "dir" / "ledger.json")


# ---------------------------------------------------------------- tampering
def _saved(tmp_path, ledger):
    path = tmp_path / "ledger.json"
    ledger.save(path)
    return path, json.loads(path.read_text())


def _write(path, data):
    path.write_text(json.dumps(data))


def test_edited_value_is_detected(tmp_path, ledger):
    path, data = _saved(tmp_path, ledger)
    data["events"][0]["noise_multiplier"] = 10.0  # a smaller epsilon on paper
    _write(path, data)

    with pytest.raises(PrivacyError) as err:
        PrivacyLedger.load(path)

    message = str(err.value)
    assert "checksum mismatch: it was edited or corrupted; restore it from backup" in message
    assert str(path) in message
    assert "\n" not in message


def test_removed_event_is_detected(tmp_path, ledger):
    path, data = _saved(tmp_path, ledger)
    del data["events"][-1]
    _write(path, data)

    with pytest.raises(PrivacyError, match="checksum mismatch"):
        PrivacyLedger.load(path)


def test_bad_checksum_is_detected(tmp_path, ledger):
    path, data = _saved(tmp_path, ledger)
    data["sha256"] = "0" * 64
    _write(path, data)

    with pytest.raises(PrivacyError, match="checksum mismatch"):
        PrivacyLedger.load(path)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("steps", "10", "event 1: .*steps"),
        ("steps", 10.5, "event 1: .*steps"),
        ("noise_multiplier", 1, "event 1: .*noise_multiplier"),
        ("round", True, "event 1: .*round"),
        ("mechanism", "laplace", "event 1: .*mechanism"),
    ],
)
def test_wrong_type_is_refused_even_with_a_valid_checksum(tmp_path, ledger, key, value, match):
    path, data = _saved(tmp_path, ledger)
    data["events"][1][key] = value
    data["sha256"] = events_digest(data["events"])  # a tool that "fixes" the checksum
    _write(path, data)

    with pytest.raises(PrivacyError, match=match):
        PrivacyLedger.load(path)


def test_missing_event_key_is_refused_even_with_a_valid_checksum(tmp_path, ledger):
    path, data = _saved(tmp_path, ledger)
    del data["events"][2]["sample_rate"]
    data["sha256"] = events_digest(data["events"])
    _write(path, data)

    with pytest.raises(PrivacyError, match=r"event 2: .*missing field.*sample_rate"):
        PrivacyLedger.load(path)


def test_duplicate_round_in_file_is_refused(tmp_path, ledger):
    path, data = _saved(tmp_path, ledger)
    data["events"].append(dict(data["events"][0]))
    data["sha256"] = events_digest(data["events"])
    _write(path, data)

    with pytest.raises(PrivacyError, match=r"event 4: .*already has an event"):
        PrivacyLedger.load(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "something.else"}, "not a ledger"),
        ({"version": 2}, "version 2 is not supported"),
        ({"version": True}, "version True is not supported"),
        ({"events": {"0": {}}}, "'events' must be a list"),
        ({"extra": 1}, "unknown keys: \\['extra'\\]"),
        ({"sha256": None}, "checksum mismatch"),
    ],
)
def test_malformed_top_level_is_refused(ledger, change, match):
    data = ledger.to_dict() | change

    with pytest.raises(PrivacyError, match=match):
        PrivacyLedger.from_dict(data)


def test_missing_top_level_key_is_refused(ledger):
    data = ledger.to_dict()
    del data["sha256"]

    with pytest.raises(PrivacyError, match="missing keys: \\['sha256'\\]"):
        PrivacyLedger.from_dict(data)


def test_nan_in_events_is_refused(tmp_path, ledger):
    path = tmp_path / "ledger.json"
    text = json.dumps(ledger.to_dict())
    text = text.replace('"noise_multiplier": 1.2', '"noise_multiplier": NaN')
    path.write_text(text)

    with pytest.raises(PrivacyError, match="not plain JSON"):
        PrivacyLedger.load(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(PrivacyError, match="does not exist"):
        PrivacyLedger.load(tmp_path / "ledger.json")


def test_bad_json_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"format": "fedlora.privacy.ledger", "events": [')

    with pytest.raises(PrivacyError, match="not valid JSON"):
        PrivacyLedger.load(path)


def test_not_an_object_is_refused():
    with pytest.raises(PrivacyError, match="expected a JSON object"):
        PrivacyLedger.from_dict([])


def test_format_constant():
    assert LEDGER_FORMAT == "fedlora.privacy.ledger"
