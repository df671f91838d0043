"""The coordinator's strategy: budget-aware sampling and weighted averaging of LoRA updates.

Devices send adapter *updates* (local − global). Every result's plaintext
claims (device id, round, run, DP-SGD event, example count) are checked first;
without SecAgg+ each update is then validated (shapes, dtype, finite, inside
±clipping_range, norm ≤ max_update_norm) and the accepted ones averaged by
example count, so a rejected update has no effect on the mean. With SecAgg+ the
claims are checked *before* the unmask stage (:meth:`LoraFedAvg.screen_secagg`, called
by :class:`fedlora.server.secagg.FedloraSecAggPlus`): a rejected device's masked vector
is left out of the sum and it is unmasked as a dropout, so the aggregate the strategy
gets is already the mean of the accepted updates; one that no set of clipped updates
could produce is still discarded. Either way the next
global adapter is ``global + mean update``, checkpointed each round, and
evaluated on the coordinator's own held-out set. Rejections are logged and
counted per reason (:data:`fedlora.server.aggregate.REASONS`) in the round's metrics.

A round can also end without an aggregate because devices dropped out: a SecAgg+
round that kept fewer devices than its reconstruction threshold stops
(:meth:`LoraFedAvg.round_failed`, the row's ``failed``), and the global adapter stays
as it was. Either way every training reply that arrived has its privacy event
recorded, used or not. The round's row also counts the devices whose update missed
the deadline (``late``), the devices lost per protocol stage (``dropouts``), and the
training requests whose spend the ledger has yet to learn (``unreconciled``; see
:mod:`fedlora.server.rounds` and :mod:`fedlora.server.reconcile`), and what the round cost: the
devices' training time against the round's (``train_s_*``, ``framework_s``) and the
bytes sent each way (``bytes_*``).

Each round samples ``fleet.devices_per_round`` devices (or ``fleet.fraction_per_round``
of them) by device id from those with budget left that are online: a simulated device
with a profile is online as its seeded draw says (:mod:`fedlora.fleetsim`), any other
device always.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedlora import fleetsim
from fedlora.config import FedloraConfig
from fedlora.errors import PrivacyError, UpdateError
from fedlora.protocol import NUM_ROUNDS_KEY, ROUND_KEY
from fedlora.server.aggregate import (
    UpdateRejected,
    check_tier,
    nested_column_scale,
    rescale_columns,
    secagg_error_bound,
    validate_claims,
    validate_event,
    validate_num_examples,
    validate_update,
    weighted_mean,
)
from fedlora.server.budget import FleetBudget
from fedlora.server.checkpoint import save_checkpoint
from fedlora.server.ddp import DeviceLevelDP
from fedlora.server.exchange import wait_for_nodes
from fedlora.server.optimizers import ServerOptimizer
from fedlora.server.sampling import draw, sample_size

log = logging.getLogger("server")

#: Room for the .npy header in front of a serialized tensor (numpy writes 128 bytes or so).
_NPY_HEADER_BYTES = 4096
#: What an aggregate out of range or above the norm bound says about the round's devices.
_UNCLIPPED = ("out_of_range", "norm")

Evaluator = Callable[[list[np.ndarray]], float]
RoundObserver = Callable[[dict[str, Any]], None]


@dataclass
class _RoundState:
    started: float = 0.0
    sampled: int = 0
    eligible: int = 0
    online: int = 0
    aggregated: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    clipped: int = 0
    failures: int = 0
    declined: int = 0
    train_losses: list[float] = field(default_factory=list)
    #: ``train_s`` of every training reply received (seconds of local training compute).
    train_s: list[float] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    late: int = 0
    dropouts: dict[str, int] = field(default_factory=dict)
    #: SecAgg+'s share graph this round: (k share holders per device, threshold t).
    secagg_graph: tuple[int, int] | None = None
    #: SecAgg+: node id → its result's verdict, reached before the unmask stage
    #: (:meth:`LoraFedAvg.screen_secagg`; None: accepted).
    verdicts: dict[int, UpdateRejected | None] = field(default_factory=dict)
    #: SecAgg+: results rejected only after unmasking (no verdict from before): in the sum.
    rejected_in_sum: int = 0
    #: (num_examples, LoRA rank) of each accepted update (FFA-LoRA's nested ranks).
    tiers: list[tuple[int, int]] = field(default_factory=list)
    #: Device-level DP: the devices charged for this round's unmasked sum (0: none).
    charged: int = 0
    skipped_reason: str | None = None
    discarded_reason: str | None = None
    failed_reason: str | None = None

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())


class LoraFedAvg(Strategy):
    """FedAvg over LoRA adapter updates with per-device privacy budgets."""

    def __init__(
        self,
        cfg: FedloraConfig,
        initial_arrays: list[np.ndarray],
        names: list[str],
        evaluator: Evaluator,
        budget: FleetBudget,
        run_dir: Path,
        observer: RoundObserver | None = None,
        run_id: str | None = None,
    ) -> None:
        """``run_id``: the Flower run id devices report (metrics ``run``); when given, an
        update for another run is refused."""
        self.cfg = cfg
        self.run_id = run_id
        self.names = names
        self.shapes = [tuple(a.shape) for a in initial_arrays]
        self.global_arrays = [a.astype(np.float32) for a in initial_arrays]
        self.evaluator = evaluator
        self.budget = budget
        self.run_dir = run_dir
        self.observer = observer
        self.rows: list[dict[str, Any]] = []
        self._rng = np.random.default_rng(cfg.seed)
        self._t0 = time.perf_counter()
        self._round = _RoundState()
        #: The file holding the current global adapter (None until one is written).
        self.checkpoint: Path | None = None
        #: Device-level DP (``privacy.unit`` "device" or "both"), planned for this adapter.
        self.device_level = DeviceLevelDP(cfg, self.shapes) if cfg.privacy.device_level else None
        if self.device_level is not None:
            ddp, survivors = self.device_level, self.device_level.plan.min_survivors
            budget.next_device_event = lambda device: ddp.event(device, 1, survivors, "")
        #: Turns the round's mean update into the next global adapter (training.server_optimizer).
        self.server_optimizer = ServerOptimizer(cfg.training, names)

    def restore(
        self,
        arrays: list[np.ndarray],
        *,
        checkpoint: Path,
        sampler_state: dict[str, Any],
        rows: list[dict[str, Any]],
        wall_s: float,
    ) -> None:
        """Continue from a committed round (:mod:`fedlora.server.resume`): its global adapter,
        the server optimizer's state saved beside it, the sampler exactly where it was, the
        metrics rows so far and the wall clock."""
        shapes = [tuple(a.shape) for a in arrays]
        if shapes != self.shapes:
            raise ValueError(f"checkpoint shapes {shapes} do not match the adapter's {self.shapes}")
        self.global_arrays = [a.astype(np.float32) for a in arrays]
        self.checkpoint = checkpoint
        self.server_optimizer.load(checkpoint, self.shapes)
        self._rng.bit_generator.state = sampler_state
        self.rows = list(rows)
        self._t0 = time.perf_counter() - wall_s

    @property
    def sampler_state(self) -> dict[str, Any]:
        """The device sampler's bit-generator state (JSON-serialisable)."""
        return dict(self._rng.bit_generator.state)

    # ------------------------------------------------------------ lifecycle
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._round = _RoundState(started=time.perf_counter())
        self.global_arrays = parameters_to_ndarrays(parameters)
        fleet = self.cfg.fleet
        wait_for_nodes(client_manager, fleet.min_devices, self.cfg.secagg.timeout_s)
        proxies = {p.node_id: p for p in client_manager.all().values()}
        # Order by device id (stable across runs), not by Flower's random node ids.
        known = self.budget.node_device
        ordered = sorted(proxies, key=lambda nid: (known.get(nid, "~"), nid))
        eligible = self.budget.eligible(ordered)
        self._round.eligible = len(eligible)
        # A simulated device with a profile is online in a round as its seeded draw says
        # (fedlora.fleetsim); every other device is taken to be online.
        pool = [nid for nid in eligible if self._online(known.get(nid), server_round)]
        self._round.online = len(pool)
        k = sample_size(fleet, len(pool))
        if k < fleet.min_devices:
            offline = len(eligible) - len(pool)
            self._round.skipped_reason = (
                f"only {len(pool)} device(s) have privacy budget left"
                + (f" and are online ({offline} offline)" if offline else "")
                + f" (fewer than fleet.min_devices={fleet.min_devices})"
            )
            log.warning("round %d skipped: %s", server_round, self._round.skipped_reason)
            return []
        chosen = sorted(draw(self._rng, pool, k))
        self._round.sampled = k
        fit_config: dict[str, Scalar] = {
            ROUND_KEY: server_round,
            NUM_ROUNDS_KEY: self.cfg.training.rounds,
        }
        if self.device_level is not None:
            fit_config.update(self.device_level.fit_config(server_round))
        ins = FitIns(parameters, fit_config)
        return [(proxies[nid], ins) for nid in chosen]

    def _online(self, device: str | None, server_round: int) -> bool:
        """Whether a device is online this round: drawn for a simulated device that
        reported a profile at discovery (simulation only), else always."""
        if device is None or device not in self.budget.profiles:
            return True
        return fleetsim.is_online(self.cfg.fleet, self.cfg.seed, device, server_round)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        st = self._round
        accepted = self._account(server_round, results, failures)
        if self.cfg.secagg.enabled:
            mean = self._secagg_mean(results, accepted)
        else:
            mean = self._plain_mean(accepted)
        if mean is not None and self.cfg.lora.variant == "ffa":  # nested ranks: per column
            mean = rescale_columns(mean, nested_column_scale(st.tiers, self.cfg.lora.r))
        if mean is None:
            if st.discarded_reason:
                log.error("round %d: aggregate discarded: %s", server_round, st.discarded_reason)
            return None, {"aggregated": 0}
        new_global = self.server_optimizer.step(self.global_arrays, mean)
        if not all(np.isfinite(g).all() for g in new_global):
            st.discarded_reason = "the next global adapter would not be finite"
            log.error("round %d: aggregate discarded: %s", server_round, st.discarded_reason)
            return None, {"aggregated": 0}
        st.aggregated = len(accepted)
        self.global_arrays = new_global
        self.checkpoint = save_checkpoint(
            self.run_dir / "checkpoints", server_round, self.names, self.global_arrays
        )
        self.server_optimizer.save(self.checkpoint)
        return ndarrays_to_parameters(self.global_arrays), {"aggregated": len(accepted)}

    def round_failed(
        self,
        server_round: int,
        reason: str,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[BaseException],
    ) -> None:
        """The round stopped before aggregation (SecAgg+ lost too many devices).

        The global adapter stays as it is. The training replies that did arrive are
        accounted as in :meth:`aggregate_fit`: their devices trained and spent budget
        whether or not their updates were used, so their events enter the ledger.
        """
        self._account(server_round, results, list(failures))
        self._round.failed_reason = reason

    def note_transport(self, late: int, dropouts: dict[str, int]) -> None:
        """Devices whose update missed the deadline, and devices lost per protocol stage."""
        self._round.late = late
        self._round.dropouts = dict(sorted(dropouts.items()))

    def note_secagg_graph(self, num_shares: int, threshold: int) -> None:
        """The round's SecAgg+ share graph, as the workflow sized it for the devices sampled."""
        self._round.secagg_graph = (num_shares, threshold)

    def note_traffic(self, bytes_down: int, bytes_up: int) -> None:
        """Serialized bytes of the round's messages to devices and of their replies."""
        self._round.bytes_down = bytes_down
        self._round.bytes_up = bytes_up

    def _account(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> list[tuple[list[np.ndarray], int]]:
        """Count failures and declines, check every result, record its privacy event;
        returns the accepted updates (no tensors under SecAgg+) with their weights."""
        st = self._round
        st.failures = len(failures)
        for f in failures:
            reason = _describe_failure(f)
            declined = self.budget.note_failure(str(f) if isinstance(f, BaseException) else reason)
            if declined is not None:
                st.declined += 1
                log.warning("round %d: %s declined: budget spent", server_round, declined)
            else:
                log.warning("round %d: a device failed: %s", server_round, reason)
        accepted: list[tuple[list[np.ndarray], int]] = []
        for proxy, res in results:
            train_s = res.metrics.get("train_s")
            if isinstance(train_s, float) and math.isfinite(train_s) and train_s >= 0:
                st.train_s.append(train_s)
            who = f"update from node {proxy.node_id}"
            try:
                if proxy.node_id in st.verdicts:  # checked before SecAgg+ unmasked the sum
                    verdict = st.verdicts[proxy.node_id]
                    if verdict is not None:
                        raise verdict
                    arrays: list[np.ndarray] = []
                else:
                    arrays = self._check(server_round, proxy.node_id, res, who)
                rank = check_tier(self.cfg, res.metrics, self.budget.profiles, arrays, who)
            except UpdateRejected as exc:
                st.rejected_in_sum += proxy.node_id not in st.verdicts
                st.rejected_by_reason[exc.reason] += 1
                log.warning("round %d: rejected (%s): %s", server_round, exc.reason, exc)
                continue
            accepted.append((arrays, res.num_examples))
            st.tiers.append((res.num_examples, rank))
            loss = res.metrics.get("train_loss")
            if isinstance(loss, float) and math.isfinite(loss) and loss >= 0:
                st.train_losses.append(loss)
            st.clipped += res.metrics.get("clipped") is True
        return accepted

    def charge_device_level(self, server_round: int, node_ids: list[int]) -> None:
        """A masked sum of ``node_ids`` was unmasked: each of those devices spent one
        device-level round, with the noise of all of them (the liars were left out before
        unmasking). Called by the workflow as soon as the sum exists, whether or not it
        then decodes: the coordinator holds it either way."""
        ddp = self.device_level
        if ddp is None:
            return
        run = self.run_id or ""
        for nid in node_ids:
            device = self.budget.node_device.get(nid)
            if device is None:  # pragma: no cover - screening registered every summed node
                continue
            self.budget.add_device_level(ddp.event(device, server_round, len(node_ids), run))
        self._round.charged = len(node_ids)

    # ------------------------------------------------------------ validation
    @property
    def secagg_max_weight(self) -> float:
        """SecAgg+'s ``max_weight``: the largest record count a device reported at
        discovery, as :func:`fedlora.server.app.secagg_workflow` sets it."""
        return float(max(1, max(self.budget.num_records.values(), default=0)))

    def screen_secagg(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        malformed: Mapping[int, str],
    ) -> set[int]:
        """SecAgg+'s check before unmasking: the node ids whose update must stay out of the sum.

        Each result's claims are checked as in :meth:`aggregate_fit` (and the privacy event
        of each that holds is recorded: the device trained); a node in ``malformed`` (its
        masked payload was refused, see :mod:`fedlora.secagg.packing`) is rejected after
        that. The verdicts are kept for :meth:`aggregate_fit`, which counts them and does
        not check the same result twice.
        """
        st = self._round
        refused: set[int] = set()
        for proxy, res in results:
            nid = proxy.node_id
            who = f"update from node {nid}"
            try:
                self._check(server_round, nid, res, who)
                # a tier claim that does not hold would weigh its columns wrongly in the mean
                check_tier(self.cfg, res.metrics, self.budget.profiles, [], who)
                if nid in malformed:
                    raise UpdateRejected("masked_vector", f"{who}: {malformed[nid]}")
                st.verdicts[nid] = None
            except UpdateRejected as exc:
                st.verdicts[nid] = exc
                refused.add(nid)
        return refused

    def _check(self, server_round: int, node_id: int, res: FitRes, who: str) -> list[np.ndarray]:
        """The update's tensors (empty under SecAgg+, where there is only the aggregate),
        or :class:`UpdateRejected`.

        Claims come first: an update whose device, round, run, example count or DP-SGD
        event cannot be trusted has nothing worth recording. A device whose claims hold
        but whose tensors are bad has spent its budget all the same, so its event is
        recorded before its tensors are read.
        """
        device = validate_claims(
            res.metrics,
            who,
            server_round=server_round,
            run=self.run_id,
            known_device=self.budget.node_device.get(node_id),
        )
        who = f"{who} (device {device})"
        metrics = res.metrics
        p = self.cfg.privacy
        if p.record_level and metrics["dp"] is not True:
            raise UpdateRejected("privacy_event", f"{who} trained without DP-SGD in a DP run")
        at_most = self.budget.num_records.get(device)
        if at_most is None and self.budget.num_records:
            # A device that missed discovery (a late reply, a restarted node): its word on
            # its record count would set its weight in the mean, so it may weigh no more
            # than the largest device that did report.
            at_most = int(self.secagg_max_weight)
        if self.cfg.secagg.enabled:
            # SecAgg+ scales by num_examples / max_weight; above 1 the masked sum overflows.
            cap = int(self.secagg_max_weight)
            at_most = cap if at_most is None else min(at_most, cap)
        n = validate_num_examples(res.num_examples, who, at_most=at_most)
        if metrics["dp"]:
            validate_event(
                metrics,
                device,
                n,
                who,
                steps=self.cfg.training.local_steps,
                batch_size=self.cfg.training.batch_size,
                delta=p.delta,
                noise_multiplier=p.noise_multiplier,
                accountant=p.accountant,
                history=self.budget.ledger.events_for(device, unit="record"),
                budget=self.budget.budget(device),
            )
        try:
            self.budget.record(node_id, metrics)
        except (UpdateError, PrivacyError) as exc:  # a replay: the round is in the ledger
            raise UpdateRejected("privacy_event", f"{who}: {exc}") from None
        if self.cfg.secagg.enabled:
            return []
        return self._decode_and_validate(res.parameters, who)

    def _decode_and_validate(self, parameters: Parameters, who: str) -> list[np.ndarray]:
        tensors = parameters.tensors
        if len(tensors) != len(self.shapes):
            raise UpdateRejected(
                "tensor_count",
                f"{who} has {len(tensors)} tensors, the global adapter has {len(self.shapes)}: "
                "it was trained with a different LoRA config or base model",
            )
        for i, (blob, shape) in enumerate(zip(tensors, self.shapes, strict=True)):
            # Refused before decoding (float64 is let through, to be refused by its dtype).
            limit = 8 * math.prod(shape) + _NPY_HEADER_BYTES
            if len(blob) > limit:
                raise UpdateRejected(
                    "shape",
                    f"{who}: tensor {i} is {len(blob)} bytes, an adapter tensor of shape "
                    f"{shape} is at most {limit}",
                )
        try:
            arrays = [bytes_to_ndarray(blob) for blob in tensors]
        except Exception as exc:  # arbitrary bytes from the network: any parse error
            raise UpdateRejected(
                "decode", f"{who}: its tensors are not .npy arrays ({type(exc).__name__})"
            ) from None
        validate_update(
            arrays,
            self.shapes,
            who,
            max_abs=self.cfg.secagg.clipping_range,
            max_norm=self.cfg.privacy.max_update_norm,
        )
        return arrays

    def _plain_mean(self, accepted: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray] | None:
        if not accepted:
            return None
        mean = weighted_mean(accepted)
        try:
            validate_update(mean, self.shapes, who="aggregate")
        except UpdateRejected as exc:
            self._round.discarded_reason = str(exc)
            return None
        return mean

    def _secagg_mean(
        self,
        results: list[tuple[ClientProxy, FitRes]],
        accepted: list[tuple[list[np.ndarray], int]],
    ) -> list[np.ndarray] | None:
        """The SecAgg+ aggregate (the mean of the accepted updates only: rejected ones were
        left out of the masked sum before unmasking), if it is one that clipped updates can
        produce (within quantization error); else None. A rejection that was not screened
        before unmasking (a workflow without :meth:`screen_secagg`) is inside the sum, and
        discards the round."""
        st = self._round
        if not results:
            return None
        if st.rejected_in_sum:
            # A workflow that did not screen the claims before unmasking (not fedlora's).
            st.discarded_reason = (
                f"SecAgg+ summed {st.rejected_in_sum} rejected update(s) with the others; a "
                "masked update cannot be taken out of the sum once it is unmasked"
            )
            return None
        if not accepted:
            return None
        if self.device_level is not None:
            # The decoded sum carries the devices' noise on purpose: its norm says nothing
            # about clipping. Only its shape and finiteness are checked.
            try:
                arrays = parameters_to_ndarrays(results[0][1].parameters)
                validate_update(arrays, self.shapes, "decoded sum", dtype=np.float64)
            except UpdateRejected as exc:
                st.discarded_reason = str(exc)
                return None
            return [a.astype(np.float32) for a in arrays]
        s = self.cfg.secagg
        err = secagg_error_bound(
            [n for _, n in accepted], self.secagg_max_weight, s.clipping_range, s.quantization_range
        )
        numel = sum(math.prod(shape) for shape in self.shapes)
        bound = self.cfg.privacy.max_update_norm
        try:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            # SecAgg+ dequantizes into float64; the mean of values within ±clipping_range is
            # within it too, and the mean of updates of norm ≤ bound has norm ≤ bound.
            validate_update(
                arrays,
                self.shapes,
                "SecAgg+ aggregate",
                dtype=np.float64,
                max_abs=s.clipping_range + err,
                max_norm=None if bound is None else bound + err * math.sqrt(numel),
            )
        except UpdateRejected as exc:
            hint = " (a device did not clip its update)" if exc.reason in _UNCLIPPED else ""
            st.discarded_reason = f"{exc}{hint}"
            return None
        return [a.astype(np.float32) for a in arrays]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # the coordinator evaluates on its own held-out set (``evaluate``)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        arrays = parameters_to_ndarrays(parameters)
        self.global_arrays = arrays
        eval_started = time.perf_counter()
        loss = self.evaluator(arrays)
        st = self._round
        now = time.perf_counter()
        eval_s = now - eval_started
        round_s = (now - st.started) if server_round > 0 else 0.0
        row: dict[str, Any] = {
            "round": server_round,
            "eval_loss": loss,
            "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "num_devices": st.aggregated if server_round > 0 else 0,
            "sampled": st.sampled,
            "eligible": st.eligible,
            # Of those, the devices online this round (simulated profiles' availability).
            "online": st.online,
            "failures": st.failures,
            "declined": st.declined,
            "rejected": st.rejected,
            "rejected_by_reason": dict(sorted(st.rejected_by_reason.items())),
            "late": st.late,
            "dropouts": st.dropouts,
            # Training requests whose spend the coordinator's ledger has not learned yet
            # (asked for at the next round's start and after the last round).
            "unreconciled": self.budget.num_owed(),
            "clipped": st.clipped,
            "train_loss": float(np.mean(st.train_losses)) if st.train_losses else None,
            "secagg": self.cfg.secagg.enabled,
            # SecAgg+'s share graph: each device's secrets went to k devices, any t of
            # which rebuild them (null without SecAgg+, or before a round sampled anyone)
            "secagg_shares": st.secagg_graph[0] if st.secagg_graph else None,
            "secagg_threshold": st.secagg_graph[1] if st.secagg_graph else None,
            "dp": self.cfg.privacy.record_level,
            "max_epsilon": self.budget.worst_epsilon(),
            "devices_exhausted": self.budget.num_exhausted(),
            "round_s": round_s,
            "wall_s": now - self._t0,
            **_round_costs(st, round_s, eval_s),
        }
        if self.device_level is not None:
            # Device-level DP: each device's ε over its whole updates, and how many devices'
            # noise this round's sum held (0: nothing was unmasked).
            row["max_device_epsilon"] = self.budget.worst_device_epsilon()
            row["survivors"] = st.charged
        if st.skipped_reason:
            row["skipped"] = st.skipped_reason
        if st.discarded_reason:
            row["discarded"] = st.discarded_reason
        if st.failed_reason:
            row["failed"] = st.failed_reason
        self.rows.append(row)
        if self.observer is not None:
            self.observer(row)
        return loss, {"eval_loss": loss}


def _round_costs(st: _RoundState, round_s: float, eval_s: float) -> dict[str, Any]:
    """Where a round's time and traffic went.

    ``train_s_*``: the devices' own measure of their local training compute (replies
    received); ``framework_s`` = ``round_s`` − ``train_s_max``, the round's time not
    covered by its slowest device's training (scheduling, serialisation, SecAgg+,
    waiting, a simulated slow device's delay, aggregation and the evaluation, which
    ``eval_s`` measures alone). ``bytes_*``: serialized message content sent to and
    received from devices in the round's protocol (every SecAgg+ stage; not the
    ledger queries between rounds), in total and per device sampled.
    """
    train_max = max(st.train_s, default=0.0)
    per = max(1, st.sampled)
    return {
        "train_s_total": float(sum(st.train_s)),
        "train_s_max": train_max,
        "framework_s": max(0.0, round_s - train_max),
        "eval_s": eval_s,
        "bytes_down": st.bytes_down,
        "bytes_up": st.bytes_up,
        "bytes_down_per_device": st.bytes_down / per,
        "bytes_up_per_device": st.bytes_up / per,
    }


def _describe_failure(f: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(f, BaseException):
        return str(f).strip().splitlines()[-1] if str(f).strip() else type(f).__name__
    proxy, res = f
    return f"node {proxy.node_id}: {res.status.message}"
