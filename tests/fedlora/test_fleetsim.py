"""Simulated device profiles: validated config, and seeded, reproducible draws per device
and round whose frequencies are the configured probabilities."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedlora import fleetsim
from fedlora.config import CONFIG_VERSION, DeviceProfile, FedloraConfig, FleetSection
from fedlora.errors import ConfigError

PHONE = {
    "name": "phone-low",
    "share": 0.5,
    "speed": 0.25,
    "availability": 0.6,
    "dropout": 0.1,
    "budget_epsilon": 4.0,
}
LAPTOP = {"name": "laptop", "share": 0.5}


def fleet(*profiles: dict, **changes: object) -> FleetSection:
    cfg = FedloraConfig.from_dict({"fleet": {"profiles": list(profiles), **changes}})
    return cfg.fleet


# ------------------------------------------------------------ config
def test_profiles_load_with_defaults_and_round_trip():
    cfg = FedloraConfig.from_dict({"fleet": {"profiles": [PHONE, LAPTOP]}})

    phone, laptop = cfg.fleet.profiles
    assert phone == DeviceProfile(**PHONE)
    assert (laptop.speed, laptop.availability, laptop.dropout) == (1.0, 1.0, 0.0)
    assert (laptop.budget_epsilon, laptop.data_scale) == (None, 1.0)
    saved = cfg.to_dict()
    assert saved["version"] == CONFIG_VERSION == 6
    assert FedloraConfig.from_dict(json.loads(json.dumps(saved))) == cfg


def test_without_profiles_the_fleet_is_as_before():
    """Defaults are today's behaviour; a version-2 file loads meaning what it meant."""
    cfg = FedloraConfig()
    assert cfg.fleet.profiles == () and cfg.fleet.fraction_per_round is None
    v2 = {**FedloraConfig().to_dict(), "version": 2}
    del v2["fleet"]["profiles"], v2["fleet"]["fraction_per_round"]
    del v2["data"]["server_eval_max"], v2["privacy"]["reproducible_noise"]
    # (and with the seeded DP noise of every config before version 4)
    assert FedloraConfig.from_dict(v2) == cfg.replace(
        data={"server_eval_max": None}, privacy={"reproducible_noise": True}
    )
    assert fleetsim.profile_of(cfg.fleet, 0, "device-0001") is None
    assert fleetsim.is_online(cfg.fleet, 0, "device-0001", 3)
    assert fleetsim.drop_point(cfg.fleet, 0, "device-0001", 3, secagg=True) is None


def test_the_coordinators_held_out_set_is_capped_and_seeded():
    from fedlora.data.fleet import build_fleet

    full = build_fleet(None, num_devices=30, seed=0)
    capped = build_fleet(None, num_devices=30, seed=0, server_eval_max=50)

    assert len(full.server_eval) > 50 and capped.server_eval == full.server_eval[:50]
    assert capped.devices == full.devices  # what devices train on is unchanged
    assert "server eval capped at 50" in capped.description
    with pytest.raises(ConfigError, match=r"data\.server_eval_max must be"):
        FedloraConfig.from_dict({"data": {"server_eval_max": 0}})


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        ([{"name": "a", "share": 0.5}], r"fleet.profiles: shares must sum to 1, got 0.5 \(a 0.5\)"),
        ([{"name": "a", "share": 1, "availability": 1.5}], r"fleet.profiles\[0\].availability"),
        ([{"name": "a", "share": 1, "dropout": -0.1}], r"fleet.profiles\[0\].dropout must be a"),
        ([{"name": "a", "share": 1, "speed": 0}], r"fleet.profiles\[0\].speed must be in \(0, 1\]"),
        ([{"name": "a", "share": 1, "speed": 2}], r"fleet.profiles\[0\].speed"),
        ([{"name": "a", "share": 1, "budget_epsilon": 0}], r"profiles\[0\].budget_epsilon"),
        ([{"name": "a", "share": 1, "data_scale": -1}], r"profiles\[0\].data_scale"),
        ([LAPTOP, {"name": "b", "share": 0}], r"fleet.profiles\[1\].share must be in \(0, 1\]"),
        ([{"name": "a"}], r"fleet.profiles\[0\].share is required"),
        ([{"share": 1.0}], r"fleet.profiles\[0\].name is required"),
        ([{"name": "a", "share": "1"}], r"fleet.profiles\[0\].share must be a number"),
        ([{"name": "a", "share": 1, "sped": 1}], r"unknown config key fleet.profiles\[0\].'sped'"),
        ([LAPTOP, LAPTOP], r"the name 'laptop' is used twice"),
        (["laptop"], r"fleet.profiles\[0\] must be an object"),
        ({"laptop": 1}, r"fleet.profiles must be a list of objects"),
    ],
)
def test_bad_profiles_are_one_line_errors_naming_the_key(profiles, message):
    with pytest.raises(ConfigError, match=message) as info:
        FedloraConfig.from_dict({"fleet": {"profiles": profiles}})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_the_fraction_per_round_is_in_0_1(value):
    with pytest.raises(ConfigError, match=r"fleet\.fraction_per_round must be in"):
        FedloraConfig.from_dict({"fleet": {"fraction_per_round": value}})


def test_data_scale_needs_the_embedded_fleet():
    with pytest.raises(ConfigError, match=r"profiles\[0\].data_scale applies to the embedded"):
        FedloraConfig.from_dict(
            {
                "data": {"path": "x.jsonl"},
                "fleet": {"profiles": [{**LAPTOP, "share": 1, "data_scale": 2}]},
            }
        )


# ------------------------------------------------------------ draws
DEVICES = [f"device-{i:04d}" for i in range(2000)]


def test_profile_assignment_is_seeded_and_follows_the_shares():
    f = fleet({**PHONE, "share": 0.3}, {**LAPTOP, "share": 0.7})

    first = [fleetsim.profile_of(f, 0, d) for d in DEVICES]
    assert first == [fleetsim.profile_of(f, 0, d) for d in DEVICES]  # reproducible
    assert first != [fleetsim.profile_of(f, 1, d) for d in DEVICES]  # the seed matters
    counts = Counter(p.name for p in first if p is not None)
    assert counts["phone-low"] / len(DEVICES) == pytest.approx(0.3, abs=0.03)
    assert counts["phone-low"] + counts["laptop"] == len(DEVICES)


def test_availability_is_a_seeded_draw_per_device_and_round_at_its_probability():
    f = fleet({**PHONE, "share": 1.0})

    draws = [fleetsim.is_online(f, 0, d, r) for d in DEVICES[:500] for r in range(1, 5)]
    assert draws == [fleetsim.is_online(f, 0, d, r) for d in DEVICES[:500] for r in range(1, 5)]
    assert sum(draws) / len(draws) == pytest.approx(0.6, abs=0.03)
    # not the same devices every round
    by_round = [{d for d in DEVICES[:500] if fleetsim.is_online(f, 0, d, r)} for r in (1, 2)]
    assert by_round[0] != by_round[1]
    always = fleet({**PHONE, "share": 1.0, "availability": 1.0})
    never = fleet({**PHONE, "share": 1.0, "availability": 0.0})
    assert all(fleetsim.is_online(always, 0, d, 1) for d in DEVICES[:200])
    assert not any(fleetsim.is_online(never, 0, d, 1) for d in DEVICES[:200])


@pytest.mark.parametrize("secagg", [True, False])
def test_dropouts_happen_at_their_probability_at_every_stage(secagg):
    f = fleet({**PHONE, "share": 1.0, "dropout": 0.2})
    points = fleetsim.SECAGG_DROP_POINTS if secagg else fleetsim.PLAIN_DROP_POINTS

    draws = [fleetsim.drop_point(f, 0, d, r, secagg=secagg) for d in DEVICES for r in (1, 2)]
    dropped = [p for p in draws if p is not None]
    assert len(dropped) / len(draws) == pytest.approx(0.2, abs=0.02)
    assert set(dropped) == set(points)  # every stage, before and after training
    assert draws == [
        fleetsim.drop_point(f, 0, d, r, secagg=secagg) for d in DEVICES for r in (1, 2)
    ]
    none = fleet({**PHONE, "share": 1.0, "dropout": 0.0})
    assert all(fleetsim.drop_point(none, 0, d, 1, secagg=secagg) is None for d in DEVICES)


def test_a_slow_device_waits_in_proportion_to_its_training_time():
    slow = DeviceProfile(name="slow", share=1.0, speed=0.25)
    assert fleetsim.simulated_delay_s(slow, 2.0) == pytest.approx(6.0)
    assert fleetsim.simulated_delay_s(DeviceProfile(name="fast", share=1.0), 2.0) == 0.0
    assert fleetsim.simulated_delay_s(None, 2.0) == 0.0


def test_unit_draws_are_stable_and_uniform():
    assert fleetsim.unit(0, "online", "device-0001", 1) == fleetsim.unit(
        0, "online", "device-0001", 1
    )
    values = [fleetsim.unit(7, "x", i) for i in range(4000)]
    assert all(0 <= v < 1 for v in values)
    assert sum(v < 0.25 for v in values) / len(values) == pytest.approx(0.25, abs=0.03)


def test_a_profile_scales_its_devices_records_in_the_embedded_fleet():
    from fedlora.data.synthetic import default_records

    f = fleet(
        {"name": "big", "share": 0.5, "data_scale": 2.0},
        {"name": "small", "share": 0.5, "data_scale": 0.5},
    )

    plain = Counter(r.device for r in default_records(20, 0))
    records = default_records(20, 0, scale=lambda d: fleetsim.data_scale(f, 0, d))
    scaled = Counter(r.device for r in records)
    for device, n in plain.items():
        expected = max(2, round(n * fleetsim.data_scale(f, 0, device)))
        assert scaled[device] == expected
    assert {fleetsim.data_scale(f, 0, d) for d in plain} == {0.5, 2.0}
    first = [r.text for r in records if r.device == "device-0000"][:20]
    assert first == [r.text for r in default_records(20, 0) if r.device == "device-0000"][:20]
