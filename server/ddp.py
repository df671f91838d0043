"""The coordinator's side of device-level DP: the distributed discrete Gaussian's
parameters, each round's rotation seed, the decoded sum, and the ledger's events.

With ``privacy.unit`` "device" or "both" (:class:`fedlora.config.DeviceLevelSection`)
every sampled device encodes its whole update as :mod:`fedlora.ddp.encoding` does (clip,
rotate, scale, round, add its share of discrete Gaussian noise, mod 2^b) and SecAgg+
sums the encodings; the coordinator only ever holds the noisy sum. What it decides, once
per run and in public:

- the grid and the noise (:meth:`DeviceLevelDP.plan`): the noise multiplier that lets
  ``participations`` rounds fit ``privacy.device.epsilon`` (no amplification by sampling
  is claimed), then the finest grid whose sum does not wrap around 2^b (probability at
  most ``wrap_probability``) with the per-device σ calibrated exactly for that grid's
  sensitivity and ``min_survivors`` devices;
- a fresh rotation seed per round (the OS CSPRNG, or the run seed under
  ``privacy.reproducible_noise``): public, sent in the training request with the rest of
  the parameters (:mod:`fedlora.ddp.wire`);
- which rounds may be unmasked: fewer survivors than ``min_survivors`` would release a
  sum with less noise than the budget was calibrated for, so such a round halts.

After a round is unmasked it records one device-level event per device in the sum, with
the number of devices whose noise the sum actually holds (dropouts reduce it; a device
of :class:`fedlora.server.secagg.FedloraSecAggPlus` that was left out as a liar adds
none).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.config import FedloraConfig, resolve_device_level
from fedlora.ddp.encoding import DDPParams, choose_params, decode
from fedlora.ddp.params import bytes_per_value, wrap_probability
from fedlora.ddp.wire import to_fit_config
from fedlora.errors import ConfigError, UpdateError
from fedlora.privacy import DISTRIBUTED_DISCRETE_GAUSSIAN, DDGEvent, calibrate_ddg_noise

_SEED_DOMAIN = b"fedlora/ddp/v1/rotation/"


@dataclass(frozen=True)
class DevicePlan:
    """What one run's device-level DP was planned with (written to the run's report)."""

    params: DDPParams
    participations: int
    min_survivors: int
    max_summands: int
    wrap_bound: float

    def to_dict(self) -> dict[str, Any]:
        """The plan as the run writes it (``privacy/device_plan.json``) and the privacy
        report shows it."""
        p = self.params
        return {
            "mechanism": DISTRIBUTED_DISCRETE_GAUSSIAN,
            "bits": p.bits,
            "clip_norm": p.clip,
            "scale": p.scale,
            "noise_stddev": p.noise_stddev,
            "l2_sensitivity": p.l2_sensitivity,
            "adapter_values": p.dimension,
            "dimension": p.padded_dimension,
            "block": p.block,
            "beta": p.beta,
            "participations": self.participations,
            "min_survivors": self.min_survivors,
            "max_summands": self.max_summands,
            "wrap_probability": self.wrap_bound,
            "wrap_probability_bound": wrap_probability(p, self.max_summands),
            "bytes_per_value": bytes_per_value(p),
        }


def plan(cfg: FedloraConfig, dimension: int) -> DevicePlan:
    """The run's grid and noise for an update of ``dimension`` values; a
    :class:`ConfigError` naming the numbers when no grid of 2^bits fits the noise."""
    participations, survivors = resolve_device_level(cfg)
    d = cfg.privacy.device
    max_summands = cfg.fleet.devices_per_round

    def sigma_for(l2_sensitivity: float, padded_dimension: int) -> float:
        return calibrate_ddg_noise(
            d.epsilon,
            d.delta,
            participations=participations,
            survivors=survivors,
            l2_sensitivity=l2_sensitivity,
            dimension=padded_dimension,
        )

    try:
        params = choose_params(
            clip=d.clip_norm,
            bits=d.bits,
            dimension=dimension,
            max_summands=max_summands,
            min_survivors=survivors,
            sigma_for=sigma_for,
            wrap_bound=d.wrap_probability,
        )
    except ConfigError as exc:
        raise ConfigError(f"privacy.device (bits {d.bits}): {exc}") from None
    return DevicePlan(params, participations, survivors, max_summands, d.wrap_probability)


class DeviceLevelDP:
    """One run's device-level DP at the coordinator (see the module docstring)."""

    def __init__(self, cfg: FedloraConfig, shapes: Sequence[tuple[int, ...]]) -> None:
        self.cfg = cfg
        self.shapes = [tuple(s) for s in shapes]
        self.plan = plan(cfg, sum(math.prod(s) for s in self.shapes))
        self._seeds: dict[int, int] = {}

    @property
    def params(self) -> DDPParams:
        return self.plan.params

    @property
    def vector_shapes(self) -> list[tuple[int, ...]]:
        """What every masked vector holds: a count (1 per device), then the encoding."""
        return [(1,), (self.params.padded_dimension,)]

    def rotation_seed(self, server_round: int) -> int:
        """The round's public rotation seed (63 bits: it travels as a Flower int)."""
        seed = self._seeds.get(server_round)
        if seed is None:
            if self.cfg.privacy.reproducible_noise:
                material = _SEED_DOMAIN + f"{self.cfg.seed}/{server_round}".encode()
                seed = int.from_bytes(hashlib.sha256(material).digest()[:8], "big") >> 1
            else:
                seed = secrets.randbits(63)
            self._seeds[server_round] = seed
        return seed

    def fit_config(self, server_round: int) -> dict[str, int | float]:
        """The training request's device-level entries for ``server_round``."""
        return to_fit_config(self.params, self.rotation_seed(server_round), self.plan.min_survivors)

    def enough(self, survivors: int) -> str | None:
        """Why a sum of ``survivors`` devices must not be unmasked, or None."""
        if survivors < self.plan.min_survivors:
            return (
                f"only {survivors} device(s) survived to the masked sum; the noise was sized "
                f"for at least privacy.device.min_survivors={self.plan.min_survivors}, so the "
                "sum is not unmasked"
            )
        if survivors > self.plan.max_summands:
            return f"{survivors} devices in the sum, more than the grid was sized for"
        return None

    def decode(
        self, server_round: int, total: Sequence[np.ndarray], survivors: int
    ) -> list[np.ndarray]:
        """The noisy mean update (float64, the adapter's shapes) from the unmasked sum
        ``[count, encoding]`` of ``survivors`` devices."""
        count = int(np.asarray(total[0]).reshape(-1)[0])
        if count != survivors % self.params.modulus:
            raise UpdateError(f"the unmasked sum counts {count} device(s), {survivors} were summed")
        flat = decode(
            np.asarray(total[1]).reshape(-1),
            self.params,
            self.rotation_seed(server_round),
            survivors,
        )
        out, at = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[at : at + n].reshape(shape))
            at += n
        return out

    def event(self, device: str, server_round: int, survivors: int, run: str) -> DDGEvent:
        """The device-level event of one device in a sum of ``survivors`` devices."""
        d = self.cfg.privacy.device
        return DDGEvent(
            device=device,
            round=server_round,
            noise_stddev=float(self.params.noise_stddev),
            survivors=survivors,
            l2_sensitivity=float(self.params.l2_sensitivity),
            dimension=int(self.params.padded_dimension),
            delta=float(d.delta),
            run=run,
        )
