"""The coordinator's strategy: budget-aware sampling and weighted averaging of LoRA updates.

Devices send adapter *updates* (local − global). Without SecAgg+ the strategy
validates each update and takes their example-weighted mean; with SecAgg+ it
only ever sees the already-summed mean (every result carries the same
unmasked aggregate) and validates that. Either way the next global adapter is
``global + mean update``, checkpointed each round, and evaluated on the
coordinator's own held-out set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from client.app import NUM_ROUNDS_KEY, ROUND_KEY
from fedlora.config import FedloraConfig
from fedlora.errors import UpdateError
from server.aggregate import apply_update, validate_update, weighted_mean
from server.budget import FleetBudget
from server.checkpoint import save_checkpoint

log = logging.getLogger("fedlora.server")

Evaluator = Callable[[list[np.ndarray]], float]
RoundObserver = Callable[[dict[str, Any]], None]


@dataclass
class _RoundState:
    started: float = 0.0
    sampled: int = 0
    eligible: int = 0
    aggregated: int = 0
    rejected: int = 0
    failures: int = 0
    declined: int = 0
    train_losses: list[float] = field(default_factory=list)
    skipped_reason: str | None = None


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
    ) -> None:
        self.cfg = cfg
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

    # ------------------------------------------------------------ lifecycle
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._round = _RoundState(started=time.perf_counter())
        self.global_arrays = parameters_to_ndarrays(parameters)
        fleet = self.cfg.fleet
        client_manager.wait_for(fleet.min_devices, timeout=int(self.cfg.secagg.timeout_s))
        proxies = {p.node_id: p for p in client_manager.all().values()}
        # Order by device id (stable across runs), not by Flower's random node ids.
        known = self.budget.node_device
        ordered = sorted(proxies, key=lambda nid: (known.get(nid, "~"), nid))
        eligible = self.budget.eligible(ordered)
        self._round.eligible = len(eligible)
        k = min(fleet.devices_per_round, len(eligible))
        if k < fleet.min_devices:
            self._round.skipped_reason = (
                f"only {len(eligible)} device(s) have privacy budget left "
                f"(fewer than fleet.min_devices={fleet.min_devices})"
            )
            log.warning("round %d skipped: %s", server_round, self._round.skipped_reason)
            return []
        # Choose positions, not ids: Flower node ids are uint64 and numpy would turn a mix
        # of large ones into float64.
        picked = self._rng.choice(len(eligible), size=k, replace=False)
        chosen = sorted(eligible[int(i)] for i in picked)
        self._round.sampled = k
        ins = FitIns(
            parameters,
            {ROUND_KEY: server_round, NUM_ROUNDS_KEY: self.cfg.training.rounds},
        )
        return [(proxies[nid], ins) for nid in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
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
            try:
                self.budget.record(proxy.node_id, res.metrics)
                arrays = parameters_to_ndarrays(res.parameters)
                if self.cfg.secagg.enabled:
                    # SecAgg+ hands every result the same dequantized aggregate (float64).
                    arrays = [a.astype(np.float32) for a in arrays]
                validate_update(arrays, self.shapes, who=f"update from node {proxy.node_id}")
            except UpdateError as exc:
                st.rejected += 1
                log.warning("round %d: rejected: %s", server_round, exc)
                continue
            accepted.append((arrays, res.num_examples))
            loss = res.metrics.get("train_loss")
            if isinstance(loss, float) and loss >= 0:
                st.train_losses.append(loss)
        st.aggregated = len(accepted)
        if not accepted:
            return None, {"aggregated": 0}
        mean = weighted_mean(accepted)
        try:
            validate_update(mean, self.shapes, who="aggregate")
        except UpdateError as exc:
            log.error("round %d: aggregate discarded: %s", server_round, exc)
            st.aggregated = 0
            return None, {"aggregated": 0}
        self.global_arrays = apply_update(self.global_arrays, mean)
        save_checkpoint(self.run_dir / "checkpoints", server_round, self.names, self.global_arrays)
        return ndarrays_to_parameters(self.global_arrays), {"aggregated": len(accepted)}

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
        loss = self.evaluator(arrays)
        st = self._round
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round,
            "eval_loss": loss,
            "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "num_devices": st.aggregated if server_round > 0 else 0,
            "sampled": st.sampled,
            "eligible": st.eligible,
            "failures": st.failures,
            "declined": st.declined,
            "rejected": st.rejected,
            "train_loss": float(np.mean(st.train_losses)) if st.train_losses else None,
            "secagg": self.cfg.secagg.enabled,
            "dp": self.cfg.privacy.enabled,
            "max_epsilon": self.budget.worst_epsilon(),
            "devices_exhausted": self.budget.num_exhausted(),
            "round_s": (now - st.started) if server_round > 0 else 0.0,
            "wall_s": now - self._t0,
        }
        if st.skipped_reason:
            row["skipped"] = st.skipped_reason
        self.rows.append(row)
        if self.observer is not None:
            self.observer(row)
        return loss, {"eval_loss": loss}


def _describe_failure(f: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(f, BaseException):
        return str(f).strip().splitlines()[-1] if str(f).strip() else type(f).__name__
    proxy, res = f
    return f"node {proxy.node_id}: {res.status.message}"
