import dataclasses
import json

import numpy as np
import pytest

from fedlora.errors import PrivacyError
from fedlora.privacy.events import DPSGDEvent
from tests.privacy._helpers import event


def test_valid_event_keeps_its_fields():
    e = event(device="phone-7", round=3, noise_multiplier=1.3, sample_rate=0.05, steps=40)

    assert (e.device, e.round, e.noise_multiplier, e.sample_rate, e.steps, e.delta) == (
        "phone-7",
        3,
        1.3,
        0.05,
        40,
        1e-5,
    )
    assert e.mechanism == "poisson_subsampled_gaussian"


def test_event_is_frozen():
    e = event()

    with pytest.raises(dataclasses.FrozenInstanceError):
        e.steps = 99  # type: ignore[misc]


def test_numpy_scalars_are_stored_as_python_numbers():
    e = event(round=np.int64(2), noise_multiplier=np.float64(1.5), steps=np.int32(7))

    assert type(e.round) is int and type(e.steps) is int
    assert type(e.noise_multiplier) is float
    assert e == event(round=2, noise_multiplier=1.5, steps=7)


def test_full_batch_and_zero_steps_are_valid():
    assert event(sample_rate=1.0).sample_rate == 1.0
    assert event(steps=0).steps == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", ""),
        ("device", "   "),
        ("device", 7),
        ("round", -1),
        ("round", True),
        ("round", 1.0),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", float("inf")),
        ("noise_multiplier", float("nan")),
        ("noise_multiplier", 1),  # an int is not a float: types are exact
        ("noise_multiplier", True),
        ("noise_multiplier", "1.0"),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("sample_rate", float("nan")),
        ("sample_rate", 1),
        ("steps", -1),
        ("steps", 2.0),
        ("steps", False),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", 1),
        ("mechanism", "laplace"),
        ("mechanism", None),
    ],
)
def test_invalid_field_is_refused_with_one_line(field, value):
    with pytest.raises(PrivacyError) as err:
        event(**{field: value})

    assert field in str(err.value)
    assert "\n" not in str(err.value)


def test_dict_round_trip_through_json():
    e = event(noise_multiplier=0.87, sample_rate=0.013, steps=123, round=9)

    back = DPSGDEvent.from_dict(json.loads(json.dumps(e.to_dict())))

    assert back == e
    assert set(e.to_dict()) == {
        "device",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "delta",
        "mechanism",
    }


def test_from_dict_refuses_unknown_key():
    d = event().to_dict() | {"epsilon": 0.1}

    with pytest.raises(PrivacyError, match=r"unknown field.*epsilon"):
        DPSGDEvent.from_dict(d)


@pytest.mark.parametrize("key", ["steps", "mechanism", "delta"])
def test_from_dict_refuses_missing_key(key):
    d = event().to_dict()
    del d[key]

    with pytest.raises(PrivacyError, match=f"missing field.*{key}"):
        DPSGDEvent.from_dict(d)


@pytest.mark.parametrize(
    ("key", "value"),
    [("steps", "10"), ("steps", 10.0), ("noise_multiplier", 1), ("round", None)],
)
def test_from_dict_refuses_wrong_type(key, value):
    d = event().to_dict() | {key: value}

    with pytest.raises(PrivacyError, match=key):
        DPSGDEvent.from_dict(d)


def test_from_dict_refuses_non_object():
    with pytest.raises(PrivacyError, match="JSON object"):
        DPSGDEvent.from_dict([1, 2])
