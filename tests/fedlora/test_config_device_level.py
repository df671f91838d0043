"""``privacy.unit`` and ``privacy.device``: device-level DP's configuration, refused in one
line where it cannot work, and its nulls resolved as the README says."""

from __future__ import annotations

import pytest

from fedlora.config import FedloraConfig, resolve_device_level
from fedlora.errors import ConfigError


def _cfg(**privacy):
    return FedloraConfig.from_dict({"privacy": {"unit": "device", **privacy}})


def test_units_select_which_mechanisms_run():
    record = FedloraConfig()
    assert (record.privacy.record_level, record.privacy.device_level) == (True, False)
    device = _cfg()
    assert (device.privacy.record_level, device.privacy.device_level) == (False, True)
    both = FedloraConfig.from_dict({"privacy": {"unit": "both"}})
    assert (both.privacy.record_level, both.privacy.device_level) == (True, True)
    off = FedloraConfig.from_dict({"privacy": {"unit": "both", "enabled": False}})
    assert (off.privacy.record_level, off.privacy.device_level) == (False, False)


def test_nulls_resolve_to_the_expected_share_of_rounds_and_the_dropout_rate():
    cfg = FedloraConfig.from_dict(
        {
            "privacy": {"unit": "device"},
            "fleet": {"num_devices": 100, "devices_per_round": 10},
            "training": {"rounds": 25},
            "secagg": {"dropout_rate": 0.2},
        }
    )
    # ceil(25 · 10 / 100) = 3 participations; ceil(0.8 · 10) = 8 survivors
    assert resolve_device_level(cfg) == (3, 8)
    explicit = cfg.replace(
        privacy={"unit": "device", "device": {"participations": 5, "min_survivors": 6}}
    )
    assert resolve_device_level(explicit) == (5, 6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"privacy": {"unit": "user"}}, "privacy.unit must be one of record, device, both"),
        ({"privacy": {"unit": "device"}, "secagg": {"enabled": False}}, "enable secagg"),
        ({"privacy": {"unit": "device", "device": {"bits": 40}}}, "between 8 and 32"),
        ({"privacy": {"unit": "device", "device": {"clip_norm": 0}}}, "clip_norm"),
        ({"privacy": {"unit": "device", "device": {"min_survivors": 1}}}, "min_survivors"),
        ({"privacy": {"unit": "device", "device": {"min_survivors": 11}}}, "exceeds fleet"),
        ({"privacy": {"unit": "device", "device": {"participations": 99}}}, "exceeds training"),
        ({"privacy": {"unit": "device", "device": {"epsilon": -1}}}, "privacy.device.epsilon"),
        ({"privacy": {"unit": "device", "device": {"colour": 1}}}, "unknown config key"),
        (
            {
                "privacy": {"unit": "device"},
                "lora": {"variant": "ffa"},
                "fleet": {"profiles": [{"name": "low", "share": 1.0, "lora_rank": 2}]},
            },
            "nested ranks",
        ),
    ],
)
def test_a_device_level_config_that_cannot_work_is_refused_in_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        FedloraConfig.from_dict(data)
    assert "\n" not in str(err.value)


def test_the_config_round_trips_with_its_device_section():
    cfg = _cfg(device={"bits": 20, "clip_norm": 0.5})
    again = FedloraConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.privacy.device.bits == 20
