"""The fleet: disjoint, deterministic splits; the coordinator never evaluates on train text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data.fleet import build_fleet
from fedlora.data.synthetic import default_records
from fedlora.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def default_fleet():
    return build_fleet(None, num_devices=8, seed=0)


def test_default_fleet_has_held_out_data_on_every_device(default_fleet) -> None:
    fleet = default_fleet

    assert fleet.device_ids == tuple(f"device-{i:04d}" for i in range(8))
    for device in fleet.devices:
        assert len(device.heldout) >= 1 and len(device.train) >= 1
        assert len(device.heldout) < len(device.train)
    assert "embedded synthetic device notes: 8 devices (natural)" in fleet.description


def test_server_eval_comes_from_every_device_and_holds_no_train_text(default_fleet) -> None:
    fleet = default_fleet
    train = {t for d in fleet.devices for t in d.train}
    source = {r.text: r.device for r in default_records(8, seed=0)}

    assert not train & set(fleet.server_eval)
    assert {source[t] for t in fleet.server_eval} == set(fleet.device_ids)


def test_splits_are_deterministic_per_seed(default_fleet) -> None:
    again = build_fleet(None, num_devices=8, seed=0)
    other = build_fleet(None, num_devices=8, seed=1)

    assert again == default_fleet
    assert other.devices[0].train != default_fleet.devices[0].train


def test_num_records_counts_every_split(default_fleet) -> None:
    fleet = default_fleet
    on_devices = sum(len(d.train) + len(d.heldout) for d in fleet.devices)

    assert fleet.num_records == on_devices + len(fleet.server_eval)


def test_device_lookup_and_unknown_device(default_fleet) -> None:
    assert default_fleet.device("device-0003").device == "device-0003"
    with pytest.raises(DataError, match="unknown device 'phone-9'"):
        default_fleet.device("phone-9")


def test_fleet_from_a_jsonl_file_with_dirichlet_partition(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"device": f"u{i % 4}", "text": f"note {i}", "label": f"t{i % 3}"})
        for i in range(120)
    ]
    path.write_text("\n".join(lines), encoding="utf-8")

    fleet = build_fleet(path, num_devices=5, partition="dirichlet", alpha=1.0, seed=2)

    assert all(d.device.startswith("device-") for d in fleet.devices)
    assert "dirichlet alpha=1.0" in fleet.description
    texts = [t for d in fleet.devices for t in d.train + d.heldout] + list(fleet.server_eval)
    assert len(texts) == len(set(texts)) <= 120


def test_invalid_fractions_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="heldout_fraction"):
        build_fleet(None, num_devices=2, heldout_fraction=0.0)
    with pytest.raises(ConfigError, match="below 1"):
        build_fleet(None, num_devices=2, heldout_fraction=0.5, server_fraction=0.5)


def test_missing_source_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_fleet(tmp_path / "missing.jsonl", num_devices=2)


def test_embedded_devices_one_at_a_time_are_the_fleets_devices():
    """A worker writes only the devices it serves; they are exactly build_fleet's."""
    from fedlora.data.fleet import EmbeddedDevices

    fleet = build_fleet(None, num_devices=40, seed=3, heldout_fraction=0.2, server_fraction=0.1)
    lazy = EmbeddedDevices(40, seed=3, heldout_fraction=0.2, server_fraction=0.1)

    assert len(lazy) == 40
    for i in (0, 1, 17, 39):
        assert lazy.device(i) == fleet.devices[i]
    assert [lazy.device_id(i) for i in range(40)] == list(fleet.device_ids)
    assert [lazy.num_train(i) for i in range(40)] == [len(d.train) for d in fleet.devices]
    with pytest.raises(DataError, match="partition-id 40 is outside the fleet of 40"):
        lazy.device(40)


def test_the_runtime_serves_a_device_without_building_the_fleet():
    from fedlora import runtime
    from fedlora.config import FedloraConfig

    runtime.clear()
    cfg = FedloraConfig().replace(fleet={"num_devices": 30})
    assert runtime.device_info(cfg, 7) == ("device-0007", len(runtime.device_data(cfg, 7).train))
    assert not runtime._fleets  # no whole fleet was built for it
    assert runtime.device_data(cfg, 7) == runtime.fleet(cfg).devices[7]
    iid = cfg.replace(data={"partition": "iid"})  # needs every record: the whole fleet
    assert runtime.device_data(iid, 3) == runtime.fleet(iid).devices[3]
    runtime.clear()
