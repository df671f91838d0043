"""Which devices a round samples: the coordinator's seeded draw, and its forecast.

The coordinator (:meth:`fedlora.server.strategy.LoraFedAvg.configure_fit`) samples each
round from the devices with budget left that are online, ordered by device id, with one
numpy generator seeded by ``cfg.seed``: :func:`sample_size` devices, drawn by
:func:`draw`. :func:`forecast` replays the same draws from the seed for a fleet whose
devices all stay eligible, which is what the simulation's calibration prefetch
(:mod:`fedlora.simprefetch`) needs to know before the run: who trains in which round.

A forecast can be wrong (a device declines, fails, runs out of budget, or the run
resumes with the sampler elsewhere); it is only ever used to compute ahead, never to
decide anything. No Flower and no torch here: the prefetch imports it in a small process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from fedlora import fleetsim
from fedlora.config import FedloraConfig, FleetSection

T = TypeVar("T")


def sample_size(fleet: FleetSection, available: int) -> int:
    """How many of ``available`` devices to sample: ``devices_per_round``, or the
    ``fraction_per_round`` of them (at least ``min_devices``, at most
    ``devices_per_round``); never more than there are."""
    k = fleet.devices_per_round
    if fleet.fraction_per_round is not None:
        wanted = math.ceil(fleet.fraction_per_round * available - 1e-9)
        k = min(k, max(fleet.min_devices, wanted))
    return min(k, available)


def draw(rng: np.random.Generator, pool: Sequence[T], k: int) -> list[T]:
    """``k`` members of ``pool`` without replacement, sorted as ``pool`` is.

    Positions are drawn, not members: Flower node ids are uint64, and numpy would turn a
    mix of large ones into float64.
    """
    picked = sorted(int(i) for i in rng.choice(len(pool), size=k, replace=False))
    return [pool[i] for i in picked]


def forecast(cfg: FedloraConfig, devices: Sequence[str], rounds: int) -> list[list[str]]:
    """The devices each round ``1..rounds`` of a fresh run samples (index 0 is round 1),
    if every one of ``devices`` stays eligible: the coordinator's draws replayed.

    Devices are online as :func:`fedlora.fleetsim.is_online` says (always without
    profiles); a round with fewer than ``fleet.min_devices`` online is skipped, as the
    coordinator skips it, without a draw.
    """
    rng = np.random.default_rng(cfg.seed)
    ordered = sorted(devices)
    out: list[list[str]] = []
    for server_round in range(1, rounds + 1):
        pool = [d for d in ordered if fleetsim.is_online(cfg.fleet, cfg.seed, d, server_round)]
        k = sample_size(cfg.fleet, len(pool))
        out.append(draw(rng, pool, k) if k >= cfg.fleet.min_devices else [])
    return out
