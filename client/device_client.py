"""The device client: what a device does with each message (train with DP-SGD, evaluate).

Per round a sampled device: loads the global adapter → checks its privacy
budget (declining if the round would take it past the budget) → trains on its
own records with DP-SGD → records what it spent in its own ledger → returns
the adapter *update* (local − global). With SecAgg+ on, ``secaggplus_mod``
masks that update before it leaves the device.

The DP noise and the Poisson batches come from a CSPRNG the device seeds from its
operating system each round (:class:`fedlora.privacy.noise.SecureRandom`): nothing the
coordinator sends, the run's seed included, predicts them. Only a *simulated* device
of a run with ``privacy.reproducible_noise`` seeds them from (run seed, device,
round); a deployed device refuses such a run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient

from fedlora import fleetsim, runtime
from fedlora.client.ledger import load_device_ledger, save_device_ledger
from fedlora.client.train import LocalTrainingPlan, train_lora
from fedlora.config import DeviceProfile, FedloraConfig
from fedlora.data.fleet import DeviceData
from fedlora.ddp.wire import from_fit_config
from fedlora.errors import BudgetExhaustedError, DataError, PrivacyError, UpdateError
from fedlora.evaluation import mean_token_loss
from fedlora.privacy import (
    DDGEvent,
    DPSGDEvent,
    PrivacyLedger,
    calibrate_noise_multiplier,
    device_budget,
    epsilon_for,
    epsilon_for_device,
)
from fedlora.privacy.calibration_cache import SharedCalibrations
from fedlora.privacy.noise import RandomSource, SecureRandom, SeededRandom
from fedlora.privacy.spend import EVENTS_KEY, QUERY_KEY, RUNS_KEY, encode_events
from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
from fedlora.secagg import PROTOCOL_KEY, PROTOCOL_VERSION


def plan_noise(
    cfg: FedloraConfig,
    ledger: PrivacyLedger,
    device: str,
    server_round: int,
    num_rounds: int,
    sample_rate: float,
    budget_epsilon: float | None = None,
    shared: SharedCalibrations | None = None,
) -> float | None:
    """σ for this round, or raise BudgetExhaustedError if the device must decline.

    Calibrated mode: the smallest σ such that the history already spent plus
    every remaining round of the run (the worst case: sampled every time)
    stays within the budget. Fixed-σ mode: the configured σ, if one more round
    keeps ε within the budget. ``shared``: a simulation's calibrations filed by its other
    processes (:mod:`fedlora.privacy.calibration_cache`).
    """
    p = cfg.privacy
    if not p.record_level:
        return None
    budget = p.epsilon if budget_epsilon is None else budget_epsilon
    history = ledger.events_for(device)
    steps = cfg.training.local_steps
    if p.noise_multiplier is None:
        try:
            return calibrate_noise_multiplier(
                budget,
                p.delta,
                sample_rate,
                steps,
                max(1, num_rounds - server_round + 1),
                history=history,
                accountant=p.accountant,
                shared=shared,
            )
        except BudgetExhaustedError as exc:
            # Said as a decline, so the coordinator stops asking (not counted as a fault).
            raise BudgetExhaustedError(
                f"device {device} declines round {server_round}: {exc}"
            ) from None
    event = DPSGDEvent(
        device=device,
        round=server_round,
        noise_multiplier=p.noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=p.delta,
    )
    eps = epsilon_for((*history, event), p.delta, p.accountant)
    if eps > budget:
        raise BudgetExhaustedError(
            f"device {device} declines round {server_round}: it would reach ε={eps:.3f} "
            f"> budget {budget:g} (δ={p.delta:g}, {p.accountant})"
        )
    return p.noise_multiplier


def plan_device_level(
    cfg: FedloraConfig,
    ledger: PrivacyLedger,
    device: str,
    server_round: int,
    run: str,
    config: dict[str, Any],
) -> DDGEvent | None:
    """The device-level event this round will cost (None without device-level DP), or
    raise: :class:`BudgetExhaustedError` (a decline) if it would take the device past
    ``privacy.device.epsilon``, :class:`UpdateError` if the request lacks the parameters.

    The event counts the noise of ``min_survivors`` devices, the least the coordinator
    may unmask: the device's own ledger is the bound that holds whatever the round's
    dropouts, the coordinator's records the survivors there were.
    """
    p = cfg.privacy
    if not p.device_level:
        return None
    wired = from_fit_config(config)
    if wired is None:
        raise UpdateError(
            f"device {device}: round {server_round} of a device-level DP run came without "
            "the noise parameters; nothing was trained"
        )
    params, _seed, min_survivors = wired
    event = DDGEvent(
        device=device,
        round=server_round,
        noise_stddev=float(params.noise_stddev),
        survivors=min_survivors,
        l2_sensitivity=float(params.l2_sensitivity),
        dimension=int(params.padded_dimension),
        delta=p.device.delta,
        run=run,
    )
    eps = epsilon_for_device((*ledger.events_for(device, unit="device"), event), p.device.delta)
    if eps > p.device.epsilon * (1 + 1e-9):
        raise BudgetExhaustedError(
            f"device {device} declines round {server_round}: its device-level ε would reach "
            f"{eps:.3f} > budget {p.device.epsilon:g} (δ={p.device.delta:g})"
        )
    return event


#: ``hook(partition_id, records) -> records`` changes a simulated device's records before
#: it uses them; only ``fedlora audit`` passes one (its canaries, :mod:`fedlora.data.canaries`).
DataHook = Callable[[int, DeviceData], DeviceData]


class DeviceClient(NumPyClient):
    """One device: its data, its model replica (shared per worker), its ledger."""

    def __init__(
        self,
        cfg: FedloraConfig,
        context: Context,
        device_root: Path | None = None,
        data_hook: DataHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.context = context
        node = context.node_config
        data_path = node.get("data-path")
        #: A device with its own data (``fedlora device``), not one of a simulated fleet.
        self.deployed = bool(data_path)
        if data_path:
            # A deployed device (``fedlora device``): its own records on its own disk.
            self.device = str(node.get("device-id") or Path(str(data_path)).stem)
            self.index = _device_index(self.device)
            self._data = runtime.local_data(cfg, str(data_path), self.device)
            self._num_train = len(self._data.train)
            self.profile: DeviceProfile | None = None  # a real device: never simulated
        else:
            pid = node.get("partition-id")
            if pid is None:
                raise DataError(
                    "this node has neither 'data-path' nor 'partition-id': start it with "
                    "`fedlora device --data PATH` or as part of a simulated fleet"
                )
            # Its records are read when it trains or evaluates, not to answer discovery.
            self.index = int(pid)
            self.device, self._num_train = runtime.device_info(cfg, self.index)
            self._data = None
            if data_hook is not None:  # the audit's canaries: the records change, so read now
                self._data = data_hook(self.index, runtime.device_data(cfg, self.index))
                self._num_train = len(self._data.train)
            self.profile = fleetsim.profile_of(cfg.fleet, cfg.seed, self.device)
        # The device's own cap: it never trains past min(its budget, the run's budget).
        own = node.get("budget-epsilon")
        if own is None and self.profile is not None:
            own = self.profile.budget_epsilon
        self.budget_epsilon = device_budget(
            cfg.privacy.epsilon, None if own is None else float(own)
        )
        ledger_path = node.get("ledger-path")
        if ledger_path:
            self.ledger_path: Path | None = Path(str(ledger_path))
        elif device_root is not None:  # a simulated device's "local disk"
            self.ledger_path = device_root / self.device / "ledger.json"
        else:
            self.ledger_path = None

    @property
    def data(self) -> DeviceData:
        """The device's records (a simulated device's are loaded on first use)."""
        if self._data is None:
            self._data = runtime.device_data(self.cfg, self.index)
        return self._data

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        """What the coordinator may know before sampling: who this is and its budget.

        Asked with :data:`fedlora.privacy.spend.QUERY_KEY`, also what this device spent in the
        current run, read from its own ledger: how the coordinator learns about a round
        whose training reply it never got (see :mod:`fedlora.server.reconcile`).
        """
        props: dict[str, Any] = {
            "device": self.device,
            PROTOCOL_KEY: PROTOCOL_VERSION,  # the SecAgg+ this device speaks
        }
        privacy = self.cfg.privacy
        if privacy.unit != "device" or not privacy.enabled:
            # Under device-level DP alone the record count is the device's data too: the
            # coordinator gets nothing but the noisy sum (every update weighs 1).
            props["num_records"] = self._num_train
        if privacy.record_level:
            props["budget_epsilon"] = self.budget_epsilon
        if self.profile is not None:  # simulated: the coordinator applies its availability
            props[fleetsim.PROFILE_PROPERTY] = self.profile.name
        if config.get(QUERY_KEY):
            asked = config.get(RUNS_KEY)
            runs = set(str(asked).split(",")) if asked else {str(self.context.run_id)}
            ledger = load_device_ledger(self.context, self.ledger_path)
            props[EVENTS_KEY] = encode_events(
                [e for e in ledger.events_for(self.device, unit="record") if e.run in runs]
            )
        return props

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [a.copy() for a in runtime.model_bundle(self.cfg).initial_arrays]

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        from fedlora.adapter import get_adapter_arrays, set_adapter_arrays

        cfg = self.cfg
        server_round = int(config[ROUND_KEY])
        num_rounds = int(config[NUM_ROUNDS_KEY])
        if cfg.privacy.reproducible_noise and self.deployed:
            # The run config comes from the coordinator: it must not be able to make a
            # device's noise predictable. Refused before anything is spent.
            raise PrivacyError(
                f"device {self.device} refuses round {server_round}: the run sets "
                "privacy.reproducible_noise, which would let anyone with the run's seed (the "
                "coordinator included) predict its DP noise; a deployed device draws it from "
                "its OS CSPRNG only"
            )
        bundle = runtime.model_bundle(cfg)
        set_adapter_arrays(bundle.model, parameters)
        ids, mask = runtime.encoded(cfg, f"device:{self.device}", self.data.train)
        plan_base = LocalTrainingPlan(
            steps=cfg.training.local_steps,
            expected_batch_size=cfg.training.batch_size,
            learning_rate=cfg.learning_rate,
            max_grad_norm=cfg.privacy.max_grad_norm,
            noise_multiplier=None,
            seed=_seed(cfg.seed, self.index, server_round),
        )
        q = plan_base.sample_rate(int(ids.shape[0]))

        ledger = load_device_ledger(self.context, self.ledger_path)
        run = str(self.context.run_id)
        if server_round in ledger.rounds_for(self.device, run=run, unit=None):
            raise BudgetExhaustedError(
                f"device {self.device} already trained in round {server_round}; "
                "a replayed request is refused so no step is counted twice"
            )
        # A simulated device reads the σ its simulation's prefetch calibrated ahead of it
        # (the same float its own search finds); a deployed one always searches itself.
        shared = None if self.deployed else SharedCalibrations.from_env()
        sigma = plan_noise(
            cfg, ledger, self.device, server_round, num_rounds, q, self.budget_epsilon, shared
        )
        device_event = plan_device_level(cfg, ledger, self.device, server_round, run, config)
        plan = LocalTrainingPlan(
            **{
                **plan_base.__dict__,
                "noise_multiplier": sigma,
                "randomness": None if sigma is None else self.randomness(server_round),
            }
        )

        # FFA-LoRA's nested ranks: a simulated device of a lower tier trains only the first
        # `rank` columns of each lora_B and sends zeros in the rest.
        rank = fleetsim.tier_rank(self.profile, cfg.lora.r)
        started = time.perf_counter()
        result = train_lora(bundle.model, ids, mask, plan, rank=rank if rank < cfg.lora.r else None)
        train_s = time.perf_counter() - started
        local = get_adapter_arrays(bundle.model)
        raw = [(lo - gl).astype(np.float32) for lo, gl in zip(local, parameters, strict=True)]
        # Before the mod masks it: one device's update is bounded, whatever its data did.
        update, norm = clip_update_norm(raw, cfg.privacy.max_update_norm)

        metrics: dict[str, Any] = {
            "device": self.device,
            "round": server_round,
            "run": run,
            "steps": result.steps,
            "dp": sigma is not None,
            # Seconds of local training compute (DP-SGD steps), as this device measured it.
            "train_s": train_s,
        }
        if device_event is None:
            metrics.update(
                train_loss=result.mean_loss if math.isfinite(result.mean_loss) else -1.0,
                empty_batches=result.empty_batches,
                sample_rate=result.sample_rate,
                # Post-processing of the DP-SGD output, so it costs no privacy; SecAgg+
                # hides the update itself but not these two numbers.
                update_norm=norm,
                clipped=update is not raw,
            )
        else:
            # Device-level DP covers only what goes through the noisy sum: nothing the
            # device's data decides travels beside it (loss, norm, record count).
            ledger.append(device_event)
            save_device_ledger(self.context, ledger, self.ledger_path)
            if sigma is not None:  # "both": the coordinator checks the DP-SGD event's q
                metrics["sample_rate"] = result.sample_rate
        if cfg.lora.variant == "ffa":
            metrics["lora_rank"] = rank  # the coordinator weighs B's columns by it
        if sigma is not None:
            event = DPSGDEvent(
                device=self.device,
                round=server_round,
                noise_multiplier=sigma,
                sample_rate=result.sample_rate,
                steps=result.steps,
                delta=cfg.privacy.delta,
                run=run,
            )
            ledger.append(event)
            save_device_ledger(self.context, ledger, self.ledger_path)
            metrics.update(
                noise_multiplier=sigma,
                delta=cfg.privacy.delta,
                epsilon=epsilon_for(
                    ledger.events_for(self.device, unit="record"),
                    cfg.privacy.delta,
                    cfg.privacy.accountant,
                ),
                budget_epsilon=self.budget_epsilon,
            )
        if not math.isfinite(norm):
            # Spent (and recorded) but not sent: a NaN would reach the coordinator as garbage
            # after SecAgg+ quantization, where it can no longer be told from a real value.
            raise UpdateError(
                f"device {self.device}: training in round {server_round} diverged (the update "
                "has NaN or Inf values); nothing was sent, lower training.learning_rate"
            )
        # Under device-level DP alone every update weighs 1 (the record count stays here).
        weight = 1 if device_event is not None and sigma is None else int(ids.shape[0])
        return update, weight, metrics

    def randomness(self, server_round: int) -> RandomSource:
        """Where this device's DP noise and Poisson batches come from in ``server_round``."""
        return round_randomness(self.cfg, self.index, server_round, deployed=self.deployed)

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        from fedlora.adapter import set_adapter_arrays

        bundle = runtime.model_bundle(self.cfg)
        set_adapter_arrays(bundle.model, parameters)
        ids, mask = runtime.encoded(self.cfg, f"heldout:{self.device}", self.data.heldout)
        loss = mean_token_loss(bundle.model, ids, mask)
        return loss, int(ids.shape[0]), {"device": self.device}


def round_randomness(
    cfg: FedloraConfig, device_index: int, server_round: int, *, deployed: bool
) -> RandomSource:
    """Where a device's DP noise and Poisson batches come from in one round.

    A fresh OS-seeded CSPRNG, unless a *simulated* device runs with
    ``privacy.reproducible_noise`` (research): then a source seeded from (run seed,
    device, round), which anyone with the run's config can regenerate. A deployed
    device never gets a seeded source (``DeviceClient.fit`` refuses such a run first).
    """
    if cfg.privacy.reproducible_noise and not deployed:
        return SeededRandom(_seed(cfg.seed, device_index, server_round))
    return SecureRandom()


def clip_update_norm(
    update: list[np.ndarray], max_norm: float | None
) -> tuple[list[np.ndarray], float]:
    """``(update scaled to L2 norm <= max_norm, its norm before)``, over all tensors at once.

    Returns ``update`` itself (the same list) when it is within the bound, when
    ``max_norm`` is None, or when its norm is not finite (the caller refuses to send it).
    The norm is accumulated in float64; the scaled float32 values land within a few ulps
    of ``max_norm``, which the coordinator's check allows for.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    if max_norm is None or not math.isfinite(norm) or norm <= max_norm:
        return update, norm
    scale = max_norm / norm
    return [(u.astype(np.float64) * scale).astype(np.float32) for u in update], norm


def _device_index(device: str) -> int:
    """A stable number for a deployed device, from its id (seeds its training without DP)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(device.encode()).digest()[:4], "big")


def _seed(seed: int, device_index: int, server_round: int) -> int:
    """The seed of a device's round: of its Poisson batches without DP, and of its DP noise
    and batches in a simulation with ``privacy.reproducible_noise``."""
    return (seed * 1_000_003 + device_index * 10_007 + server_round) % (2**63)
