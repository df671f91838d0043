"""The fleet: per-device train / held-out texts plus the coordinator's eval set.

:func:`build_fleet` is the one front door: load records (the embedded default,
a JSONL file, a directory, or a play in the tinyshakespeare layout), partition
them into devices, then split each device. Every device keeps at least one
record held out; ``server_eval`` is a seeded slice taken from every device
that no device trains on (checked on the text itself, so a duplicate note can
not leak a training text into the coordinator's evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from fedlora.data.partition import partition_records
from fedlora.data.records import Record, read_records
from fedlora.data.shakespeare import looks_like_play, shakespeare_records
from fedlora.data.synthetic import default_records
from fedlora.errors import ConfigError, DataError

DEFAULT_NUM_DEVICES = 20
_SPLIT_STREAM = 2


@dataclass(frozen=True)
class DeviceData:
    device: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class Fleet:
    devices: tuple[DeviceData, ...]
    server_eval: tuple[str, ...]
    description: str

    @cached_property
    def _by_id(self) -> dict[str, DeviceData]:
        return {d.device: d for d in self.devices}

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(d.device for d in self.devices)

    @property
    def num_records(self) -> int:
        """Every record in the fleet: device train + held-out, plus ``server_eval``."""
        on_devices = sum(len(d.train) + len(d.heldout) for d in self.devices)
        return on_devices + len(self.server_eval)

    def device(self, device_id: str) -> DeviceData:
        try:
            return self._by_id[device_id]
        except KeyError:
            known = ", ".join(self.device_ids[:3])
            raise DataError(
                f"unknown device {device_id!r}; the fleet has {len(self.devices)} devices "
                f"({known}, ...)"
            ) from None


def load_records(source: str | Path) -> tuple[list[Record], str]:
    """Records from a path, and a few words saying what was read."""
    path = Path(source)
    if looks_like_play(path):
        return shakespeare_records(path), f"play {path.name} (one device per role)"
    kind = "directory" if path.is_dir() else "file"
    return read_records(path), f"{kind} {path}"


def build_fleet(
    source: str | Path | None,
    *,
    num_devices: int | None = None,
    partition: str = "natural",
    alpha: float = 0.5,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    server_fraction: float = 0.1,
    server_eval_max: int | None = None,
    scale: Callable[[str], float] | None = None,
) -> Fleet:
    """Build the fleet; ``source=None`` is the embedded synthetic fleet (20 devices by default).

    ``server_eval_max`` caps the coordinator's set (the first of its seeded order).
    ``scale(device)`` multiplies an embedded device's number of records (device profiles'
    ``data_scale``); it does not apply to data read from ``source``.
    """
    if not 0 < heldout_fraction < 1 or not 0 <= server_fraction < 1:
        raise ConfigError(
            "heldout_fraction must be in (0, 1) and server_fraction in [0, 1), got "
            f"{heldout_fraction} and {server_fraction}"
        )
    if heldout_fraction + server_fraction >= 1:
        raise ConfigError("heldout_fraction + server_fraction must be below 1 to leave train data")
    if source is None:
        count = DEFAULT_NUM_DEVICES if num_devices is None else num_devices
        records = default_records(count, seed, "private", scale=scale)
        what = "embedded synthetic device notes"
    else:
        records, what = load_records(source)
    parts = partition_records(records, partition, num_devices, alpha, seed)
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    devices: list[DeviceData] = []
    server: list[str] = []
    for device, texts in parts.items():
        data, to_server = _split_device(device, texts, heldout_fraction, server_fraction, rng)
        devices.append(data)
        server.extend(to_server)
    trained = {t for d in devices for t in d.train}
    kept = [t for t in server if t not in trained]
    server_eval = tuple(kept[int(i)] for i in rng.permutation(len(kept)))[:server_eval_max]
    scheme = f"dirichlet alpha={alpha}" if partition == "dirichlet" else partition
    n_train = sum(len(d.train) for d in devices)
    n_held = sum(len(d.heldout) for d in devices)
    notes = [f"seed {seed}"]
    if parts.dropped:
        notes.append(f"{parts.dropped} devices dropped with fewer than 2 records")
    if len(kept) < len(server):
        notes.append(f"{len(server) - len(kept)} server texts dropped as duplicates of train texts")
    if len(server_eval) < len(kept):
        notes.append(f"server eval capped at {len(server_eval)} of {len(kept)} texts")
    description = (
        f"{what}: {len(devices)} devices ({scheme}), {n_train} train / {n_held} held-out "
        f"records on devices, {len(server_eval)} server eval records; {', '.join(notes)}"
    )
    return Fleet(devices=tuple(devices), server_eval=server_eval, description=description)


def local_device_data(
    path: str | Path, device: str, *, heldout_fraction: float = 0.1, seed: int = 0
) -> DeviceData:
    """One deployed device's own records (``fedlora device --data PATH``), split train/held-out.

    Every record in the file belongs to this device, whatever its ``device``
    field says: the file *is* the device's local store. The split is seeded, so
    a restarted device trains on the same records.
    """
    records = read_records(path)
    texts = [r.text for r in records]
    if len(texts) < 2:
        raise DataError(
            f"{path} holds {len(texts)} record(s); a device needs at least 2 "
            "(one to train on, one held out)"
        )
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    data, _ = _split_device(device, texts, heldout_fraction, 0.0, rng)
    return data


def _split_device(
    device: str,
    texts: list[str],
    heldout_fraction: float,
    server_fraction: float,
    rng: np.random.Generator,
) -> tuple[DeviceData, list[str]]:
    n = len(texts)
    n_held, n_server = _split_sizes(n, heldout_fraction, server_fraction)
    order = rng.permutation(n)
    held = sorted(int(i) for i in order[:n_held])
    to_server = sorted(int(i) for i in order[n_held : n_held + n_server])
    train = sorted(int(i) for i in order[n_held + n_server :])
    data = DeviceData(
        device=device,
        train=tuple(texts[i] for i in train),
        heldout=tuple(texts[i] for i in held),
    )
    return data, [texts[i] for i in to_server]


def _split_sizes(n: int, heldout_fraction: float, server_fraction: float) -> tuple[int, int]:
    """(held-out, server) record counts of a device with ``n`` records; the rest trains."""
    n_held = max(1, round(heldout_fraction * n))
    spare = n - n_held - 1  # leave at least one record to train on
    n_server = min(spare, max(1, round(server_fraction * n))) if server_fraction > 0 else 0
    return n_held, n_server


class EmbeddedDevices:
    """The embedded fleet's devices (natural partition) one at a time, without the fleet.

    :func:`build_fleet` writes every device's notes and keeps them all; a simulation
    worker only ever needs the few devices it is serving. This gives the same
    :class:`DeviceData` as ``build_fleet(None, ...).devices[i]`` for one device, from its
    own notes and its place in the seeded split stream (which only the record counts of
    the devices before it determine), and a device's id and training-record count
    without writing any note. It holds one integer per device.
    """

    def __init__(
        self,
        num_devices: int,
        *,
        seed: int = 0,
        heldout_fraction: float = 0.1,
        server_fraction: float = 0.1,
        scale: Callable[[str], float] | None = None,
    ) -> None:
        from fedlora.data.synthetic import device_note_count

        self.seed = seed
        self.heldout_fraction = heldout_fraction
        self.server_fraction = server_fraction
        self.scale = scale
        self.counts = [device_note_count(i, seed, scale) for i in range(num_devices)]

    def __len__(self) -> int:
        return len(self.counts)

    def device_id(self, index: int) -> str:
        from fedlora.data.synthetic import device_name

        self._check(index)
        return device_name(index)

    def num_train(self, index: int) -> int:
        self._check(index)
        n = self.counts[index]
        n_held, n_server = _split_sizes(n, self.heldout_fraction, self.server_fraction)
        return n - n_held - n_server

    def device(self, index: int) -> DeviceData:
        from fedlora.data.synthetic import device_notes

        self._check(index)
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM])
        for n in self.counts[:index]:
            rng.permutation(n)  # what build_fleet's split drew for the devices before
        texts = [r.text for r in device_notes(index, self.seed, self.scale)]
        data, _ = _split_device(
            self.device_id(index), texts, self.heldout_fraction, self.server_fraction, rng
        )
        return data

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.counts):
            raise DataError(f"partition-id {index} is outside the fleet of {len(self.counts)}")
