"""Dealing records out to simulated devices.

* ``natural``: one device per ``Record.device`` (the real, non-IID split);
  asked for fewer devices than there are, it picks that many at random from
  those with enough records (so nothing counts as dropped).
* ``iid``: shuffle all records and deal them evenly (a baseline without skew).
* ``dirichlet``: for every label, split its records across devices in
  proportions drawn from Dirichlet(alpha) (Hsu et al., 2019): small alpha gives
  each device few labels, large alpha approaches ``iid``. The label is
  ``Record.label``, or the source device when a record has none.

A device needs at least :data:`MIN_RECORDS` records (one to train on, one held
out); devices with fewer are dropped and counted in ``Partition.dropped``.
Record order within a device follows the input; the seed drives every choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from fedlora.data.records import Record
from fedlora.errors import ConfigError, DataError

Scheme = Literal["natural", "iid", "dirichlet"]
SCHEMES: tuple[str, ...] = ("natural", "iid", "dirichlet")
MIN_RECORDS = 2
MIN_DEVICES = 2


class Partition(dict[str, list[str]]):
    """Device id → texts, sorted by id; ``dropped`` counts devices with too few records."""

    def __init__(self, devices: Mapping[str, list[str]], dropped: int = 0) -> None:
        super().__init__(sorted(devices.items()))
        self.dropped = dropped


def partition_records(
    records: Sequence[Record],
    scheme: Scheme | str = "natural",
    num_devices: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> Partition:
    """Split records into devices; ``num_devices=None`` keeps the number of source devices."""
    if scheme not in SCHEMES:
        raise ConfigError(f"partition must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if num_devices is not None and (
        isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1
    ):
        raise ConfigError(f"num_devices must be a positive integer, got {num_devices!r}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"dirichlet alpha must be a positive number, got {alpha!r}")
    if not records:
        raise DataError("there are no records to partition; check the data source")
    rng = np.random.default_rng(seed)
    if scheme == "natural":
        return _natural(records, num_devices, rng)
    count = num_devices or len({r.device for r in records})
    if scheme == "iid":
        order = rng.permutation(len(records))
        shares = [list(part) for part in np.array_split(order, count)]
    else:
        shares = _dirichlet_shares(records, count, alpha, rng)
    devices = {_device_name(i): [records[j].text for j in share] for i, share in enumerate(shares)}
    return _drop_small(devices, scheme)


def _natural(
    records: Sequence[Record], num_devices: int | None, rng: np.random.Generator
) -> Partition:
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(record.device, []).append(record.text)
    if num_devices is None:
        return _drop_small(groups, "natural")
    if num_devices > len(groups):
        raise DataError(
            f"asked for {num_devices} devices but the data has only {len(groups)}; "
            "use partition 'iid' or 'dirichlet' to split it into more"
        )
    eligible = sorted(d for d, texts in groups.items() if len(texts) >= MIN_RECORDS)
    if num_devices > len(eligible):
        raise DataError(
            f"asked for {num_devices} devices but only {len(eligible)} have at least "
            f"{MIN_RECORDS} records; ask for fewer or use partition 'iid' or 'dirichlet'"
        )
    chosen = rng.choice(len(eligible), size=num_devices, replace=False)
    picked = {eligible[int(i)]: groups[eligible[int(i)]] for i in chosen}
    return _checked(Partition(picked), "natural")


def _dirichlet_shares(
    records: Sequence[Record], count: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    by_label: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        label = record.label if record.label is not None else record.device
        by_label.setdefault(label, []).append(i)
    shares: list[list[int]] = [[] for _ in range(count)]
    for label in sorted(by_label):
        indices = rng.permutation(by_label[label])
        proportions = rng.dirichlet(np.full(count, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
        for share, part in zip(shares, np.split(indices, cuts), strict=True):
            share.extend(int(i) for i in part)
    return [sorted(share) for share in shares]


def _drop_small(devices: Mapping[str, list[str]], scheme: str) -> Partition:
    kept = {d: texts for d, texts in devices.items() if len(texts) >= MIN_RECORDS}
    return _checked(Partition(kept, dropped=len(devices) - len(kept)), scheme)


def _checked(partition: Partition, scheme: str) -> Partition:
    if len(partition) < MIN_DEVICES:
        raise DataError(
            f"the {scheme} partition leaves {len(partition)} device(s) with at least "
            f"{MIN_RECORDS} records ({partition.dropped} dropped); a fleet needs "
            f"{MIN_DEVICES}: add data, ask for fewer devices or raise alpha"
        )
    return partition


def _device_name(index: int) -> str:
    return f"device-{index:04d}"
