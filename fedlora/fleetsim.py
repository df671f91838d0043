"""The simulated fleet's devices: which profile each has, when it is online, when it drops.

Every answer is a deterministic function of the run's seed, the device id and (for
availability and dropouts) the round, computed by hashing, with no state and no
shared random stream: the coordinator's sampler and each simulated device compute
the same answers independently, in any process, in any order, for one device at a
time, and a seed reproduces a run.

This is simulation only. The coordinator applies availability only to devices that
said at discovery that they are simulated with a profile (:data:`PROFILE_PROPERTY`),
and the mod that makes a simulated device slow or drop out
(:func:`fedlora.client.simulated.simulated_fleet_mod`) is installed only by ``fedlora
simulate`` and does nothing on a node with its own data (a deployed device).

Imports no torch and no Flower.
"""

from __future__ import annotations

import hashlib

from fedlora.config import DeviceProfile, FleetSection

#: Discovery property a simulated device with a profile reports (its profile's name).
PROFILE_PROPERTY = "profile"

#: Where a dropping device disappears: (stage, "before" its code runs | "after" it ran).
#: "after" a training stage: the device trained and recorded its spend, but no reply left.
SECAGG_DROP_POINTS: tuple[tuple[str, str], ...] = (
    ("setup", "before"),
    ("share_keys", "before"),
    ("collect_masked_vectors", "before"),
    ("collect_masked_vectors", "after"),
    ("unmask", "before"),
)
PLAIN_DROP_POINTS: tuple[tuple[str, str], ...] = (("fit", "before"), ("fit", "after"))


def unit(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) determined by ``seed`` and ``parts`` (stable everywhere)."""
    key = "\x1f".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


def profile_of(fleet: FleetSection, seed: int, device: str) -> DeviceProfile | None:
    """The device's profile, drawn with probability ``share``; None without profiles."""
    if not fleet.profiles:
        return None
    u = unit(seed, "profile", device)
    acc = 0.0
    for p in fleet.profiles:
        acc += p.share
        if u < acc:
            return p
    return fleet.profiles[-1]  # shares sum to 1 up to rounding


def tier_rank(profile: DeviceProfile | None, lora_r: int) -> int:
    """The LoRA rank a device of ``profile`` trains (its ``lora_rank``, else ``lora_r``)."""
    if profile is None or profile.lora_rank is None:
        return lora_r
    return profile.lora_rank


def is_online(fleet: FleetSection, seed: int, device: str, server_round: int) -> bool:
    """Whether the device is online in ``server_round`` (always, without profiles)."""
    p = profile_of(fleet, seed, device)
    return p is None or unit(seed, "online", device, server_round) < p.availability


def drop_point(
    fleet: FleetSection, seed: int, device: str, server_round: int, *, secagg: bool
) -> tuple[str, str] | None:
    """Where the device drops out of ``server_round`` if it is sampled, or None.

    It drops with its profile's ``dropout`` probability, at one of the round's stages
    (:data:`SECAGG_DROP_POINTS` or :data:`PLAIN_DROP_POINTS`) drawn uniformly.
    """
    p = profile_of(fleet, seed, device)
    if p is None or unit(seed, "dropout", device, server_round) >= p.dropout:
        return None
    points = SECAGG_DROP_POINTS if secagg else PLAIN_DROP_POINTS
    return points[int(unit(seed, "drop-stage", device, server_round) * len(points))]


def simulated_delay_s(profile: DeviceProfile | None, train_s: float) -> float:
    """Extra wall clock a device of ``profile`` takes after ``train_s`` of training."""
    if profile is None or not train_s > 0:
        return 0.0
    return (1.0 / profile.speed - 1.0) * train_s


def data_scale(fleet: FleetSection, seed: int, device: str) -> float:
    """How much the device's embedded-fleet record count is scaled by its profile."""
    p = profile_of(fleet, seed, device)
    return 1.0 if p is None else p.data_scale
