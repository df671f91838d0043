"""The run configuration: typed sections, validated, saved next to the artefacts.

A config is JSON (or TOML) with the sections below; every key is optional and
unknown keys are refused (a typo must not silently fall back to a default).
``FedloraConfig.to_dict()`` is the *resolved* config written to
``RUN_DIR/config.json``; loading that file reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from fedlora.errors import ConfigError

CONFIG_FORMAT = "fedlora.config"
#: 2: privacy.max_update_norm, and secagg.clipping_range 8 -> 64 (see ``_from_v1``).
#: 3: fleet.profiles, fleet.fraction_per_round, data.server_eval_max (see ``_from_v2``).
#: 4: privacy.reproducible_noise; DP noise from the OS CSPRNG by default (see ``_from_v3``).
#: 5: secagg.dropout_rate; SecAgg+'s sparse share graph by default (see ``_from_v4``).
#: 6: training.learning_rate null by default, the adapter variant's (see ``_from_v5``).
CONFIG_VERSION = 6
#: Keys ``fedlora simulate`` adds to ``RUN_DIR/config.json`` (what was loaded, package versions).
RUN_METADATA_KEYS = ("resolved", "versions")

#: Every linear layer of a LLaMA decoder block: a LLaMA's default LoRA targets (and, before
#: targets were chosen per model family, every model's: ``fedlora.adapter.default_targets``).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelSection:
    """``path``: a local Hugging Face causal-LM checkpoint; null = the embedded default."""

    path: str | None = None


#: ``lora.variant``: plain LoRA (A and B trained), or FFA-LoRA (A frozen, B trained).
LORA_VARIANTS = ("lora", "ffa")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scaling (``alpha / r``), dropout and the linear layers it adapts.

    ``target_modules`` null (the default): every attention and MLP projection of the
    model's family, chosen when the adapter is attached (``fedlora.adapter.default_targets``;
    q/k/v/o + gate/up/down for LLaMA, Qwen2, Mistral and Gemma, which is what the default
    was before it depended on the model; qkv/o + gate_up/down for Phi-3), never the
    embeddings or ``lm_head``. The adapter records what was targeted. A list is used as
    given: each entry names a linear layer exactly or by a dotted suffix.

    ``variant``: ``"lora"`` (the default) trains and exchanges both ``lora_A`` and
    ``lora_B``; ``"ffa"`` (FFA-LoRA, Sun et al. 2024) freezes every ``lora_A`` at a value
    drawn from the run's seed and the module's name (the same on every device and on the
    coordinator) and trains and exchanges ``lora_B`` only, so the mean of the devices'
    updates is exactly the mean of their ``ΔW = ΔB·A``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    variant: str = "lora"

    def __post_init__(self) -> None:
        if self.variant not in LORA_VARIANTS:
            raise ConfigError(
                f"lora variant must be one of {', '.join(LORA_VARIANTS)}, got {self.variant!r}"
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"lora alpha must be a number, got {self.alpha!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"lora alpha must be positive, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"lora dropout must be a number, got {self.dropout!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        modules = self.target_modules
        if modules is None:
            return
        if isinstance(modules, str) or not all(isinstance(m, str) and m for m in modules):
            raise ConfigError(
                f"lora target_modules must be a list of module names, got {modules!r}"
            )
        if not modules or len(set(modules)) != len(modules):
            raise ConfigError(f"lora target_modules must be non-empty and unique, got {modules!r}")
        object.__setattr__(self, "target_modules", tuple(modules))


@dataclass(frozen=True)
class DataSection:
    """Where device data comes from and how it is split.

    ``path``: JSONL (``device``, ``text``) or a directory of per-device text
    files; null is the embedded fleet.
    """

    path: str | None = None
    partition: str = "natural"
    dirichlet_alpha: float = 0.5
    heldout_fraction: float = 0.1
    server_fraction: float = 0.1
    #: The coordinator's held-out set is a seeded sample of at most this many of the
    #: records set aside on every device (``server_fraction``), so evaluating a round
    #: does not take longer as the fleet grows (null: all of them). 1,000 is about five
    #: times what the default 20-device fleet sets aside (214 records); a 100-device
    #: embedded fleet sets aside 1,009.
    server_eval_max: int | None = 1000
    seq_len: int = 64

    def __post_init__(self) -> None:
        _require(
            self.partition in ("natural", "iid", "dirichlet"),
            f"data.partition must be natural, iid or dirichlet, got {self.partition!r}",
        )
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha must be > 0")
        _require(0 < self.heldout_fraction < 1, "data.heldout_fraction must be in (0, 1)")
        _require(0 < self.server_fraction < 1, "data.server_fraction must be in (0, 1)")
        _require(
            self.server_eval_max is None or self.server_eval_max >= 1,
            f"data.server_eval_max must be ≥ 1 (or null for no limit), got {self.server_eval_max}",
        )
        _require(
            8 <= self.seq_len <= 4096, f"data.seq_len must be in [8, 4096], got {self.seq_len}"
        )


@dataclass(frozen=True)
class DeviceProfile:
    """A class of simulated device: how fast, how often online, how flaky, how much data.

    Simulation only: a deployed device is what it is, and nothing here reaches it.
    ``share`` is the probability that a simulated device has this profile (a seeded
    draw per device, :func:`fedlora.fleetsim.profile_of`); the shares of a fleet's
    profiles sum to 1.

    - ``speed``: compute speed relative to this machine, in (0, 1]. A device with
      speed s waits (1/s − 1)·(its training time) after training: simulated wall
      clock, not extra compute (its fit metrics say how long: ``simulated_delay_s``).
    - ``availability``: probability that the device is online in a round; an offline
      device is not sampled (decided per device and round from the seed).
    - ``dropout``: probability that a sampled device disappears mid-round, at a stage
      drawn from the seed (before or after training, at any SecAgg+ stage).
    - ``budget_epsilon``: the device's own privacy budget, capped at privacy.epsilon
      (null: the run's).
    - ``data_scale``: multiplies the device's number of records in the embedded
      fleet (log-normal, median 100); 1 with ``data.path`` set.
    - ``lora_rank``: the device's tier with ``lora.variant: "ffa"``: it trains only the
      first ``lora_rank`` columns of every ``lora_B`` (of ``lora.r``) and sends zeros in
      the others (null: all ``lora.r``).
    """

    name: str
    share: float
    speed: float = 1.0
    availability: float = 1.0
    dropout: float = 0.0
    budget_epsilon: float | None = None
    data_scale: float = 1.0
    lora_rank: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name), "name must be a non-empty string")
        _require(
            self.lora_rank is None or self.lora_rank >= 1,
            f"lora_rank must be a positive integer (or null), got {self.lora_rank}",
        )
        _require(0 < self.share <= 1, f"share must be in (0, 1], got {self.share}")
        _require(0 < self.speed <= 1, f"speed must be in (0, 1], got {self.speed}")
        for key in ("availability", "dropout"):
            value = getattr(self, key)
            _require(0 <= value <= 1, f"{key} must be a probability in [0, 1], got {value}")
        _require(
            self.budget_epsilon is None
            or (self.budget_epsilon > 0 and math.isfinite(self.budget_epsilon)),
            f"budget_epsilon must be a positive number (or null), got {self.budget_epsilon}",
        )
        _require(
            self.data_scale > 0 and math.isfinite(self.data_scale),
            f"data_scale must be a positive number, got {self.data_scale}",
        )


@dataclass(frozen=True)
class FleetSection:
    """How many simulated devices, and how many the coordinator samples per round.

    Each round samples ``devices_per_round`` devices, or with ``fraction_per_round``
    set ceil(fraction · A) of the A devices that are online and have budget left, at
    least ``min_devices`` and at most ``devices_per_round``; fewer than
    ``min_devices`` such devices and the round is skipped. ``profiles`` (empty: every
    device is always online, never drops and runs at this machine's speed) describes
    the simulated fleet's device classes (:class:`DeviceProfile`).
    """

    num_devices: int = 20
    devices_per_round: int = 10
    min_devices: int = 3
    fraction_per_round: float | None = None
    profiles: tuple[DeviceProfile, ...] = ()

    def __post_init__(self) -> None:
        _require(self.num_devices >= 2, f"fleet.num_devices must be ≥ 2, got {self.num_devices}")
        _require(self.devices_per_round >= 1, "fleet.devices_per_round must be ≥ 1")
        _require(self.min_devices >= 1, "fleet.min_devices must be ≥ 1")
        _require(
            self.min_devices <= self.devices_per_round,
            "fleet.min_devices must be ≤ fleet.devices_per_round",
        )
        f = self.fraction_per_round
        _require(
            f is None or 0 < f <= 1,
            f"fleet.fraction_per_round must be in (0, 1] (or null to sample "
            f"fleet.devices_per_round), got {f}",
        )
        profiles = tuple(self.profiles)
        for i, p in enumerate(profiles):
            _require(
                isinstance(p, DeviceProfile),
                f'fleet.profiles[{i}] must be an object like {{"name": "phone-low", "share": 0.5}}',
            )
        names = [p.name for p in profiles]
        dup = sorted({n for n in names if names.count(n) > 1})
        _require(not dup, f"fleet.profiles: the name {dup[0] if dup else ''!r} is used twice")
        if profiles:
            total = math.fsum(p.share for p in profiles)
            parts = " + ".join(f"{p.name} {p.share:g}" for p in profiles)
            _require(
                abs(total - 1) <= 1e-6,
                f"fleet.profiles: shares must sum to 1, got {total:g} ({parts})",
            )
        object.__setattr__(self, "profiles", profiles)


#: ``training.server_optimizer``: see :mod:`fedlora.server.optimizers`.
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")

#: ``training.learning_rate`` null: the local learning rate of each ``lora.variant``, the
#: best measured at ε = 8 on the default fleet and the utility bench (README, "DP recipe";
#: bench/recipe.py, bench/results/recipe/). FFA-LoRA trains B only and needs the larger step.
DEFAULT_LEARNING_RATE = {"lora": 0.2, "ffa": 0.5}


@dataclass(frozen=True)
class TrainingSection:
    """Rounds and local training; ``round_deadline_s`` is how long a round waits for updates.

    ``round_deadline_s``: seconds from a round's first message (SecAgg+'s setup, or the
    plain training request) until its updates must be in; a device whose update comes
    later is left out of the round and counted as ``late`` in its metrics row. null: no
    deadline of its own, the coordinator then waits ``secagg.timeout_s`` for updates as
    for any other reply.
    """

    rounds: int = 5
    local_steps: int = 10
    batch_size: int = 16
    #: null: the adapter variant's, :data:`DEFAULT_LEARNING_RATE` (read it through
    #: :attr:`FedloraConfig.learning_rate`, which resolves it).
    learning_rate: float | None = None
    round_deadline_s: float | None = None
    #: How the coordinator applies the round's mean update Δ (:mod:`fedlora.server.optimizers`):
    #: "fedavg" adds it as is; "fedavgm" (server momentum) and "fedadam" treat it as a
    #: pseudo-gradient. ``server_learning_rate`` null: the optimizer's default (fedavgm 1.0,
    #: fedadam 0.01); ``server_momentum``: fedavgm's β, fedadam's β1.
    server_optimizer: str = "fedavg"
    server_learning_rate: float | None = None
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, f"training.rounds must be ≥ 1, got {self.rounds}")
        _require(self.local_steps >= 1, "training.local_steps must be ≥ 1")
        _require(self.batch_size >= 1, "training.batch_size must be ≥ 1")
        lr_local = self.learning_rate
        _require(
            lr_local is None or (lr_local > 0 and math.isfinite(lr_local)),
            f"training.learning_rate must be a positive number (or null), got {lr_local}",
        )
        _require(
            self.round_deadline_s is None
            or (self.round_deadline_s > 0 and math.isfinite(self.round_deadline_s)),
            "training.round_deadline_s must be a positive number of seconds (or null for "
            f"none), got {self.round_deadline_s}",
        )
        _require(
            self.server_optimizer in SERVER_OPTIMIZERS,
            f"training.server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, "
            f"got {self.server_optimizer!r}",
        )
        lr = self.server_learning_rate
        _require(
            lr is None or (lr > 0 and math.isfinite(lr)),
            f"training.server_learning_rate must be a positive number (or null), got {lr}",
        )
        _require(
            lr is None or self.server_optimizer != "fedavg",
            "training.server_learning_rate applies to fedavgm and fedadam; fedavg adds the "
            "mean update as it is (leave it null)",
        )
        _require(
            0 <= self.server_momentum < 1,
            f"training.server_momentum must be in [0, 1), got {self.server_momentum}",
        )


@dataclass(frozen=True)
class DeviceLevelSection:
    """Device-level DP (``privacy.unit`` "device" or "both"): the distributed discrete
    Gaussian of Kairouz, Liu & Steinke (ICML 2021) inside SecAgg+.

    Every sampled device clips its whole update (all tensors) to L2 norm ``clip_norm``,
    rotates it (randomized Walsh–Hadamard, signs from a seed the coordinator draws per
    round), scales it onto an integer grid, rounds it, adds its own share of discrete
    Gaussian noise drawn from its OS CSPRNG, and masks the result mod 2^``bits``: the
    coordinator only ever sees the noisy sum. Each device's share is sized so that the
    noise of ``min_survivors`` devices meets the budget; the coordinator halts a round
    with fewer survivors instead of unmasking it.

    ``epsilon`` at ``delta`` is the budget of one device's whole contribution over the
    run; the noise is calibrated so that ``participations`` rounds fit it, and the
    coordinator samples no device whose next round would exceed it. No amplification by
    sampling is claimed (a device cannot check the coordinator's draw).
    ``participations`` null: ceil(rounds · devices_per_round / num_devices), a device's
    expected share of the rounds. ``min_survivors`` null: ceil((1 − secagg.dropout_rate) ·
    devices_per_round). ``wrap_probability``: the largest probability the integer sum may
    wrap around the modulus in a round (the grid is chosen so that it does not, with honest
    devices).
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    bits: int = 16
    participations: int | None = None
    min_survivors: int | None = None
    wrap_probability: float = 1e-9

    def __post_init__(self) -> None:
        _require(
            self.epsilon > 0 and math.isfinite(self.epsilon),
            f"privacy.device.epsilon must be a positive number, got {self.epsilon}",
        )
        _require(0 < self.delta < 1, f"privacy.device.delta must be in (0, 1), got {self.delta}")
        _require(
            self.clip_norm > 0 and math.isfinite(self.clip_norm),
            f"privacy.device.clip_norm must be a positive number, got {self.clip_norm}",
        )
        _require(
            8 <= self.bits <= 32,
            f"privacy.device.bits must be between 8 and 32 (the SecAgg+ modulus is 2^bits), "
            f"got {self.bits}",
        )
        _require(
            self.participations is None or self.participations >= 1,
            f"privacy.device.participations must be ≥ 1 (or null), got {self.participations}",
        )
        _require(
            self.min_survivors is None or self.min_survivors >= 1,
            f"privacy.device.min_survivors must be ≥ 1 (or null), got {self.min_survivors}",
        )
        _require(
            0 < self.wrap_probability < 1,
            f"privacy.device.wrap_probability must be in (0, 1), got {self.wrap_probability}",
        )


PRIVACY_UNITS = ("record", "device", "both")
"""``privacy.unit``: what one DP guarantee protects (a record, a device's whole data, both)."""


@dataclass(frozen=True)
class PrivacySection:
    """Record-level DP-SGD on each device.

    Each device has a budget ``epsilon`` at ``delta``. With ``noise_multiplier``
    null the device calibrates σ so that its whole planned schedule fits the
    budget; with a fixed σ it trains until the next round would exceed the
    budget, then declines (and the coordinator stops sampling it).

    Each device draws its DP noise and its Poisson batches from a CSPRNG seeded by its
    operating system (:class:`fedlora.privacy.noise.SecureRandom`), which nobody else knows.
    """

    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "prv"
    #: Each device scales its whole update (local − global, all tensors) down to this L2
    #: norm before it is masked and sent, so no one device can dominate the sum; the
    #: coordinator refuses a plain update above it. null: no bound.
    #:
    #: Default 64: on the default config a round-1 update of the 20 embedded devices has
    #: L2 norm 5.7-17.8 (median 10.1; measured 2026-11-28, 10 DP-SGD steps, seed 0). It is
    #: DP noise almost entirely, about lr·σ·C·sqrt(steps·numel)/B = 7.8·σ for the 39,040
    #: adapter values (without DP the median is 1.7). 64 is ~6x the median and 3.6x the
    #: largest, so honest updates are not clipped while a device with very few records
    #: (q = 1, σ large) or a hostile one is held to a few honest devices' weight.
    #: It must not exceed secagg.clipping_range: |x_i| <= ||x||_2 <= max_update_norm then
    #: keeps every value inside SecAgg+'s quantization range, which would otherwise clip
    #: values silently. Clipping the DP-SGD output is post-processing: it costs no privacy.
    max_update_norm: float | None = 64.0
    #: Research only. true: each *simulated* device draws its DP noise and Poisson batches
    #: from a source seeded by (run seed, device, round)
    #: (:class:`fedlora.privacy.noise.SeededRandom`),
    #: so a simulation reproduces bit for bit. Anyone with the run's seed (config.json), the
    #: coordinator included, can then regenerate every device's noise and subtract it from
    #: the aggregate: ε does not hold against them, and the privacy report says so. A
    #: deployed device refuses to train with it and ``fedlora run`` refuses to submit it.
    #: false (default): the OS CSPRNG, unknown to everyone but the device.
    reproducible_noise: bool = False
    #: What the guarantee protects: "record" (each device's DP-SGD, ``epsilon``/``delta``
    #: above), "device" (a device's whole update, distributed noise under SecAgg+:
    #: ``device``), or "both".
    unit: str = "record"
    device: DeviceLevelSection = field(default_factory=DeviceLevelSection)

    @property
    def record_level(self) -> bool:
        """Whether devices train with DP-SGD (record-level DP)."""
        return self.enabled and self.unit in ("record", "both")

    @property
    def device_level(self) -> bool:
        """Whether devices add distributed noise to their whole update (device-level DP)."""
        return self.enabled and self.unit in ("device", "both")

    def __post_init__(self) -> None:
        _require(
            self.unit in PRIVACY_UNITS,
            f"privacy.unit must be one of {', '.join(PRIVACY_UNITS)}, got {self.unit!r}",
        )
        _require(
            isinstance(self.reproducible_noise, bool),
            f"privacy.reproducible_noise must be true or false, got {self.reproducible_noise!r}",
        )
        _require(
            self.epsilon > 0 and math.isfinite(self.epsilon),
            f"privacy.epsilon must be a positive number, got {self.epsilon}",
        )
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm must be > 0")
        _require(
            self.noise_multiplier is None or self.noise_multiplier > 0,
            "privacy.noise_multiplier must be > 0 (or null to calibrate it from epsilon)",
        )
        _require(
            self.accountant in ("prv", "rdp"),
            f"privacy.accountant must be prv or rdp, got {self.accountant!r}",
        )
        _require(
            self.max_update_norm is None
            or (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)),
            "privacy.max_update_norm must be a positive number (or null for no bound), "
            f"got {self.max_update_norm}",
        )


@dataclass(frozen=True)
class SecAggSection:
    """Flower SecAgg+ parameters. Only the adapter update is masked.

    ``clipping_range``: SecAgg+ clips every value to ±clipping_range and quantizes that
    interval to ``quantization_range`` levels. 64 (Flower's default is 8) leaves room for
    ``privacy.max_update_norm`` = 64, which must not exceed it; a level is then
    128 / 2^22 = 3.1e-5, against update values of about 0.05 (a 2026-11-28 measurement on
    the default config).

    ``num_shares`` and ``reconstruction_threshold``: how many devices hold shares of each
    device's secrets (k) and how many of those it takes to rebuild one (t).
    null (the default since config version 5): the sparse graph of SecAgg+, k ≈ c·log₂ n
    for n sampled devices, and t a strict majority of k
    (:func:`fedlora.server.secagg_graph.share_graph`). ``dropout_rate`` (δ) sets both:
    k is the smallest for which a fraction δ of independent dropouts leaves some device
    with fewer than t surviving share holders with probability ≤ 2^-20 per round, and
    the same bound covers colluders (a fraction δ of the fleet, with the coordinator)
    holding t shares of one device's secrets. A larger δ survives more dropouts and
    colluders and costs a denser graph: δ = 0.1 gives k = 35 of 100 sampled devices and
    39 of 1,000; δ = 0.3 needs all 100 and 213 of 1,000. Where no smaller k meets the
    bound (10 sampled devices at δ = 0.1), every device shares with every other.
    A fraction in (0, 1] keeps Flower's meaning: ``num_shares`` of the sampled devices
    (1.0: every device, the full O(n²) graph of SecAgg, what every config before version 5
    used), ``reconstruction_threshold`` of the shares (0.6 before version 5).

    ``timeout_s`` bounds every wait of the coordinator, with or without SecAgg+: for
    devices to connect, for the replies to each SecAgg+ stage (Flower passes it to all
    four), for plain training replies, and for devices' ledger reports. A round's
    training replies wait ``training.round_deadline_s`` instead, when that is set.
    """

    enabled: bool = True
    num_shares: float | None = None
    reconstruction_threshold: float | None = None
    dropout_rate: float = 0.1
    clipping_range: float = 64.0
    quantization_range: int = 2**22
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require(
            self.num_shares is None or 0 < self.num_shares <= 1,
            "secagg.num_shares is a fraction in (0, 1] (1.0: every sampled device), or null "
            f"for SecAgg+'s sparse graph, got {self.num_shares}",
        )
        _require(
            self.reconstruction_threshold is None or 0 < self.reconstruction_threshold <= 1,
            "secagg.reconstruction_threshold is a fraction in (0, 1] of the shares, or null "
            f"for a strict majority of them, got {self.reconstruction_threshold}",
        )
        _require(
            0 <= self.dropout_rate < 0.5,
            "secagg.dropout_rate is the fraction of sampled devices expected to drop out in a "
            f"round, in [0, 0.5) (a majority must survive), got {self.dropout_rate}",
        )
        _require(self.clipping_range > 0, "secagg.clipping_range must be > 0")
        _require(self.quantization_range >= 2**8, "secagg.quantization_range must be ≥ 256")
        _require(
            self.timeout_s > 0 and math.isfinite(self.timeout_s),
            "secagg.timeout_s must be a positive number of seconds (Flower's None waits "
            f"forever), got {self.timeout_s}",
        )


@dataclass(frozen=True)
class ExportSection:
    """What the run's final step exports (``fedlora export`` does the same on demand).

    ``formats``: registry names (``int8``, ``gguf-f16``, ``gguf-q8_0``, ``gguf-q4_k_m``, ...);
    ``profile``: a device class (``phone-low``, ``phone-high``, ``laptop``) whose format is
    exported as well. GGUF formats need llama-cpp-python (the ``dev`` extra).

    ``gates``: per artefact name, quality-gate keys that replace its default gate, e.g.
    ``{"int8": {"max_perplexity_increase": 0.05}}`` (keys ``max_kl``,
    ``min_top1_agreement``, ``max_perplexity_increase``; ``merged-fp32`` names the merged
    model). Empty (the default): every artefact keeps its format's gate. ``fedlora export
    --gate NAME.KEY=VALUE`` overrides these for one export.
    """

    enabled: bool = True
    formats: tuple[str, ...] = ("int8",)
    profile: str | None = None
    gates: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class FedloraConfig:
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSection = field(default_factory=DataSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    export: ExportSection = field(default_factory=ExportSection)

    def __post_init__(self) -> None:
        _require(
            self.fleet.devices_per_round <= self.fleet.num_devices,
            f"fleet.devices_per_round ({self.fleet.devices_per_round}) exceeds "
            f"fleet.num_devices ({self.fleet.num_devices})",
        )
        if self.data.path is not None:
            for i, p in enumerate(self.fleet.profiles):
                _require(
                    p.data_scale == 1,
                    f"fleet.profiles[{i}].data_scale applies to the embedded fleet only "
                    f"(data.path is set): remove it or set it to 1, got {p.data_scale:g}",
                )
        for i, p in enumerate(self.fleet.profiles):
            if p.lora_rank is None:
                continue
            _require(
                self.lora.variant == "ffa",
                f'fleet.profiles[{i}].lora_rank needs lora.variant "ffa" (nested ranks '
                "aggregate exactly only with lora_A frozen and shared), got "
                f"{self.lora.variant!r}",
            )
            _require(
                p.lora_rank <= self.lora.r,
                f"fleet.profiles[{i}].lora_rank ({p.lora_rank}) exceeds lora.r "
                f"({self.lora.r}), the rank every device's lora_A has",
            )
        norm = self.privacy.max_update_norm
        if norm is not None:
            _require(
                norm <= self.secagg.clipping_range,
                f"privacy.max_update_norm ({norm:g}) exceeds secagg.clipping_range "
                f"({self.secagg.clipping_range:g}): a value of an update that large could "
                "leave SecAgg+'s range and be clipped silently; lower the first or raise "
                "the second",
            )
        if self.privacy.device_level:
            self._check_device_level()
        if self.secagg.enabled:
            _require(
                self.fleet.min_devices >= 3,
                "SecAgg+ needs at least 3 devices per round: raise fleet.min_devices "
                "or disable secagg",
            )

    def _check_device_level(self) -> None:
        unit = self.privacy.unit
        _require(
            self.secagg.enabled,
            f'privacy.unit "{unit}" adds each device\'s share of the noise inside SecAgg+, '
            "which is disabled: enable secagg (without it the coordinator would see every "
            "device's update)",
        )
        _require(
            not any(p.lora_rank is not None for p in self.fleet.profiles),
            f'privacy.unit "{unit}" gives every device the same weight in the sum; '
            "fleet.profiles[].lora_rank (nested ranks, weighed per column) does not combine "
            "with it yet",
        )
        participations, survivors = resolve_device_level(self)
        d = self.privacy.device
        _require(
            participations <= self.training.rounds,
            f"privacy.device.participations ({participations}) exceeds training.rounds "
            f"({self.training.rounds})",
        )
        _require(
            survivors <= self.fleet.devices_per_round,
            f"privacy.device.min_survivors ({survivors}) exceeds fleet.devices_per_round "
            f"({self.fleet.devices_per_round}): no round could be aggregated",
        )
        _require(
            d.min_survivors is None or d.min_survivors >= 2,
            "privacy.device.min_survivors must be ≥ 2: the sum of one device's update is "
            "that update",
        )

    @property
    def learning_rate(self) -> float:
        """The devices' local learning rate: ``training.learning_rate``, or when null the
        default of ``lora.variant`` (:data:`DEFAULT_LEARNING_RATE`)."""
        lr = self.training.learning_rate
        return DEFAULT_LEARNING_RATE[self.lora.variant] if lr is None else lr

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION}
        out.update(_to_plain(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FedloraConfig:
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object with sections like 'training'")
        data = dict(data)
        # What fedlora writes beside a config in RUN_DIR/config.json; not settings.
        for meta in RUN_METADATA_KEYS:
            data.pop(meta, None)
        fmt = data.pop("format", CONFIG_FORMAT)
        version = data.pop("version", CONFIG_VERSION)
        _require(fmt == CONFIG_FORMAT, f"not a fedlora config (format {fmt!r})")
        _require(
            version in (1, 2, 3, 4, 5, CONFIG_VERSION), f"unsupported config version {version}"
        )
        if version == 1:
            data = _from_v1(data)
        if version in (1, 2):
            data = _from_v2(data)
        if version in (1, 2, 3):
            data = _from_v3(data)
        if version in (1, 2, 3, 4):
            data = _from_v4(data)
        if version in (1, 2, 3, 4, 5):
            data = _from_v5(data)
        return _from_plain(cls, data, "")

    def replace(self, **sections: Any) -> FedloraConfig:
        """A copy with some fields replaced, e.g. ``replace(training={"rounds": 3})``."""
        merged = self.to_dict()
        for name, value in sections.items():
            if isinstance(value, dict):
                merged.setdefault(name, {}).update(value)
            else:
                merged[name] = value
        return FedloraConfig.from_dict(merged)


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 config as version 2 reads it, meaning what it meant then.

    Version 1 (every RUN_DIR/config.json written before 2026-11-28) had no update
    clipping and a SecAgg+ clipping range of 8: its runs reload and rerun unclipped,
    rather than being refused for a bound of 64 above a range of 8.
    """
    out = dict(data)
    for section, key, then in (
        ("privacy", "max_update_norm", None),
        ("secagg", "clipping_range", 8.0),
    ):
        values = out.get(section, {})
        if isinstance(values, dict) and key not in values:
            out[section] = {**values, key: then}
    return out


def _from_v2(data: dict[str, Any]) -> dict[str, Any]:
    """A version-2 config as version 3 reads it, meaning what it meant then.

    Version 3 added device profiles and a fraction to sample (absent: as before) and a
    cap on the coordinator's held-out set; a version-2 file evaluates on all of it.
    """
    values = data.get("data", {})
    if isinstance(values, dict) and "server_eval_max" not in values:
        return {**data, "data": {**values, "server_eval_max": None}}
    return data


def _from_v3(data: dict[str, Any]) -> dict[str, Any]:
    """A version-3 config as version 4 reads it, meaning what it meant then.

    Before version 4 every device seeded its DP noise and Poisson batches from the run's
    seed (simulated devices by their index, deployed ones by a hash of their id), so a
    run of a version-3 config had reproducible noise: it reloads (and reruns, and is
    reported) as ``privacy.reproducible_noise: true``.
    """
    values = data.get("privacy", {})
    if isinstance(values, dict) and "reproducible_noise" not in values:
        return {**data, "privacy": {**values, "reproducible_noise": True}}
    return data


def _from_v4(data: dict[str, Any]) -> dict[str, Any]:
    """A version-4 config as version 5 reads it, meaning what it meant then.

    Before version 5 SecAgg+ shared every device's secrets with every other sampled
    device (``num_shares`` 1.0) and needed 0.6 of the shares to rebuild one: a file that
    set neither reloads (and reruns, and resumes) with that full graph, not the sparse
    one that null now means.
    """
    values = data.get("secagg", {})
    if not isinstance(values, dict):
        return data
    then = {"num_shares": 1.0, "reconstruction_threshold": 0.6}
    return {**data, "secagg": {**then, **values}}


def _from_v5(data: dict[str, Any]) -> dict[str, Any]:
    """A version-5 config as version 6 reads it, meaning what it meant then.

    Before version 6 every adapter variant trained at ``training.learning_rate`` 0.2 when
    the file did not set it: such a file reloads (and reruns, and resumes) at 0.2, not at
    the variant's default that null now means (FFA's is 0.5).
    """
    values = data.get("training", {})
    if not isinstance(values, dict):
        return data
    return {**data, "training": {"learning_rate": 0.2, **values}}


def load_config(path: str | Path) -> FedloraConfig:
    """Read a JSON or TOML config file; every error is one ConfigError line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        kind = "TOML" if p.suffix == ".toml" else "JSON"
        raise ConfigError(f"config file {p} is not valid {kind}: {exc}") from None
    try:
        return FedloraConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


# ---------------------------------------------------------------- plumbing
T = TypeVar("T")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: str, where: str) -> Any:
    """Check ``value`` against the annotation string ``tp`` (fields use PEP 563 strings)."""
    optional = tp.endswith("| None")
    base = tp.removesuffix("| None").strip()
    if value is None:
        _require(optional, f"{where} must not be null")
        return None
    if base == "bool":
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if base == "int":
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{where} must be an integer, got {value!r}",
        )
        return value
    if base == "float":
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{where} must be a number, got {value!r}",
        )
        return float(value)
    if base == "str":
        _require(isinstance(value, str), f"{where} must be a string, got {value!r}")
        return value
    if base == "dict[str, dict[str, float]]":
        _require(
            isinstance(value, dict)
            and all(isinstance(v, dict) for v in value.values())
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool)
                for v in value.values()
                for x in v.values()
            ),
            f"{where} must be an object of objects of numbers, like "
            f'{{"int8": {{"max_perplexity_increase": 0.05}}}}, got {value!r}',
        )
        return {str(k): {str(g): float(x) for g, x in v.items()} for k, v in value.items()}
    if base == "tuple[str, ...]":
        _require(
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
            f"{where} must be a list of strings, got {value!r}",
        )
        return tuple(value)
    raise AssertionError(f"unhandled config type {tp} at {where}")  # programming error


def _from_plain(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!r}; valid keys"
            f"{' in ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        where = f"{prefix}.{name}" if prefix else name
        sub = _SECTIONS.get(str(f.type))
        if str(f.type) == "tuple[DeviceProfile, ...]":
            kwargs[name] = _profiles(value, where)
        elif sub is not None:
            _require(isinstance(value, dict), f"config section {where!r} must be an object")
            kwargs[name] = _from_plain(sub, value, where)
        else:
            kwargs[name] = _coerce(value, str(f.type), where)
    return cls(**kwargs)


def _profiles(value: Any, where: str) -> tuple[DeviceProfile, ...]:
    """``fleet.profiles``: a list of objects, each error naming its key, e.g.
    ``fleet.profiles[1].availability must be a probability in [0, 1], got 1.5``."""
    _require(
        isinstance(value, (list, tuple)),
        f'{where} must be a list of objects like [{{"name": "phone-low", "share": 0.5}}]',
    )
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        _require(isinstance(item, dict), f"{at} must be an object, got {item!r}")
        for key in ("name", "share"):
            _require(key in item, f"{at}.{key} is required")
        try:
            out.append(_from_plain(DeviceProfile, item, at))
        except ConfigError as exc:  # __post_init__ names the field only: add where it is
            msg = str(exc)
            own = msg.split(" ", 1)[0] in {f.name for f in dataclasses.fields(DeviceProfile)}
            raise ConfigError(f"{at}.{msg}" if own else msg) from None
    return tuple(out)


_SECTIONS: dict[str, type] = {
    "ModelSection": ModelSection,
    "LoraSettings": LoraSettings,
    "DataSection": DataSection,
    "FleetSection": FleetSection,
    "TrainingSection": TrainingSection,
    "PrivacySection": PrivacySection,
    "DeviceLevelSection": DeviceLevelSection,
    "SecAggSection": SecAggSection,
    "ExportSection": ExportSection,
}


def resolve_device_level(cfg: FedloraConfig) -> tuple[int, int]:
    """``(participations, min_survivors)`` of device-level DP, nulls resolved
    (:class:`DeviceLevelSection`)."""
    d, fleet = cfg.privacy.device, cfg.fleet
    participations = d.participations
    if participations is None:
        share = cfg.training.rounds * fleet.devices_per_round / fleet.num_devices
        participations = max(1, math.ceil(share - 1e-9))
    survivors = d.min_survivors
    if survivors is None:
        wanted = (1 - cfg.secagg.dropout_rate) * fleet.devices_per_round
        survivors = max(2, min(fleet.devices_per_round, math.ceil(wanted - 1e-9)))
    return participations, survivors


def config_from_run_config(run_config: dict[str, Any]) -> FedloraConfig:
    """Resolve the config a Flower app was started with (``flwr run`` or ``fedlora``).

    ``fedlora-config-json`` carries a resolved config inline (what ``fedlora``
    passes); ``fedlora-config`` names a config file (what ``pyproject.toml``
    passes to ``flwr run .``); neither means the built-in defaults.
    """
    inline = run_config.get("fedlora-config-json")
    if isinstance(inline, str) and inline:
        return FedloraConfig.from_dict(json.loads(inline))
    path = run_config.get("fedlora-config")
    if isinstance(path, str) and path:
        return load_config(path)
    return FedloraConfig()
