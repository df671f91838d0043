"""The embedded fleet: deterministic, non-IID in labels, quantity and style; public is generic."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from fedlora.data import topics
from fedlora.data.synthetic import MAX_NOTES, MIN_NOTES, default_records
from fedlora.errors import ConfigError

TOPIC_NAMES = {t.name for t in topics.TOPICS}


def _by_device(records):
    devices = defaultdict(list)
    for r in records:
        devices[r.device].append(r)
    return devices


def test_same_seed_same_records_and_devices_are_stable_across_fleet_sizes() -> None:
    small = default_records(3, seed=7)
    again = default_records(3, seed=7)
    large = default_records(5, seed=7)
    other = default_records(3, seed=8)

    assert small == again
    assert small == [r for r in large if r.device in {"device-0000", "device-0001", "device-0002"}]
    assert small != other


def test_devices_differ_in_quantity_and_topic_mixture() -> None:
    devices = _by_device(default_records(20, seed=0))

    sizes = [len(v) for v in devices.values()]
    top_share = [
        Counter(r.label for r in v).most_common(1)[0][1] / len(v) for v in devices.values()
    ]
    public = default_records(20, seed=0, split="public")
    public_top = Counter(r.label for r in public).most_common(1)[0][1] / len(public)

    assert sorted(devices) == [f"device-{i:04d}" for i in range(20)]
    assert all(MIN_NOTES <= s <= MAX_NOTES for s in sizes)
    assert max(sizes) >= 2.5 * min(sizes)  # quantity skew
    assert sum(top_share) / len(top_share) > 0.45  # label skew: a device writes mostly one topic
    assert public_top < 0.15  # the public split is uniform over the ten topics
    assert {r.label for v in devices.values() for r in v} <= TOPIC_NAMES


def test_each_writer_has_personal_people_and_public_text_has_none() -> None:
    private = default_records(20, seed=0)
    public = default_records(1, seed=0, split="public", num_records=3000)

    def names_in(text: str) -> set[str]:
        return {p for p in topics.PRIVATE_PEOPLE if re.search(rf"\b{p.lower()}\b", text.lower())}

    names_per_device = {
        device: set().union(*(names_in(r.text) for r in recs))
        for device, recs in _by_device(private).items()
    }
    public_text = " ".join(r.text for r in public)

    assert all(2 <= len(names) <= 6 for names in names_per_device.values())
    assert len(set().union(*names_per_device.values())) > 20  # writers know different people
    assert not any(p in public_text for p in topics.PRIVATE_PEOPLE + topics.PRIVATE_PLACES)
    assert {r.device for r in public} == {"public"} and len(public) == 3000


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_devices"):
        default_records(0)
    with pytest.raises(ConfigError, match="split"):
        default_records(2, split="secret")  # type: ignore[arg-type]
