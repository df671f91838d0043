"""Partitioners: natural keeps devices, iid balances, dirichlet skews labels as alpha shrinks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedlora.data.partition import partition_records
from fedlora.data.records import Record
from fedlora.errors import ConfigError, DataError


def _records(devices: int = 6, per_device: int = 30, labels: int = 5) -> list[Record]:
    return [
        Record(device=f"d{d}", text=f"d{d} note {i}", label=f"L{(d + i) % labels}")
        for d in range(devices)
        for i in range(per_device)
    ]


def _label_skew(parts: dict[str, list[str]], label_of: dict[str, str]) -> float:
    """Mean total-variation distance between each device's label mix and the global mix."""
    everything = Counter(label_of[t] for texts in parts.values() for t in texts)
    labels = sorted(everything)
    total = np.array([everything[x] for x in labels], dtype=float)
    total /= total.sum()
    distances = []
    for texts in parts.values():
        counts = Counter(label_of[t] for t in texts)
        mix = np.array([counts[x] for x in labels], dtype=float) / len(texts)
        distances.append(0.5 * np.abs(mix - total).sum())
    return float(np.mean(distances))


def test_natural_keeps_device_keys_and_texts() -> None:
    records = _records()

    parts = partition_records(records, "natural", None, seed=0)

    assert list(parts) == [f"d{i}" for i in range(6)]
    assert parts["d2"] == [r.text for r in records if r.device == "d2"]
    assert parts.dropped == 0


def test_natural_subset_is_seeded_and_too_many_devices_suggests_other_schemes() -> None:
    records = _records(devices=10)

    first = partition_records(records, "natural", 4, seed=1)
    again = partition_records(records, "natural", 4, seed=1)
    picks = {tuple(partition_records(records, "natural", 4, seed=s)) for s in range(10)}

    assert list(first) == list(again) and len(first) == 4
    assert len(picks) > 1
    with pytest.raises(DataError, match="'iid' or 'dirichlet'"):
        partition_records(records, "natural", 11, seed=0)


def test_iid_deals_every_record_once_in_balanced_shares() -> None:
    records = _records(devices=3, per_device=34)

    parts = partition_records(records, "iid", 7, seed=0)

    sizes = [len(v) for v in parts.values()]
    assert list(parts) == [f"device-{i:04d}" for i in range(7)]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(t for v in parts.values() for t in v) == sorted(r.text for r in records)


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    records = _records(devices=4, per_device=250, labels=10)
    label_of = {r.text: r.label or "" for r in records}

    skewed = partition_records(records, "dirichlet", 10, alpha=0.05, seed=0)
    even = partition_records(records, "dirichlet", 10, alpha=100.0, seed=0)

    assert _label_skew(skewed, label_of) > 0.5
    assert _label_skew(even, label_of) < 0.1
    kept = sum(len(v) for v in even.values())
    assert kept == len(records)  # large alpha: nobody dropped, nothing lost


def test_dirichlet_without_labels_uses_the_source_device() -> None:
    records = [Record(device=f"d{d}", text=f"{d}-{i}") for d in range(3) for i in range(40)]

    parts = partition_records(records, "dirichlet", 3, alpha=0.01, seed=3)

    sources = [{t.split("-")[0] for t in texts} for texts in parts.values()]
    assert sum(len(s) for s in sources) <= 4  # nearly one source device each


def test_devices_with_fewer_than_two_records_are_dropped_and_counted() -> None:
    records = [*_records(devices=3, per_device=5), Record("lonely", "only one")]

    parts = partition_records(records, "natural", None, seed=0)

    assert "lonely" not in parts and parts.dropped == 1
    with pytest.raises(DataError, match="a fleet needs 2"):
        partition_records([*_records(devices=1, per_device=5), Record("x", "y")], "natural")


def test_invalid_scheme_and_alpha_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="partition must be one of"):
        partition_records(_records(), "random", 3)
    with pytest.raises(ConfigError, match="alpha"):
        partition_records(_records(), "dirichlet", 3, alpha=0.0)
    with pytest.raises(ConfigError, match="num_devices"):
        partition_records(_records(), "iid", 0)
