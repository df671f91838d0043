"""The coordinator: a Flower ServerApp running SecAgg+ over the LoRA strategy.

SecAgg+ in Flower 1.39 runs only through the legacy workflow, so ``main``
wraps the strategy in a ``LegacyContext`` and runs ``DefaultWorkflow`` with
``SecAggPlusWorkflow`` as its fit workflow (``--no-secagg`` uses Flower's
default fit workflow with the same strategy, for comparison).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fedlora import runtime
from fedlora.config import FedloraConfig, config_from_run_config
from fedlora.errors import ConfigError
from fedlora.evaluation import mean_token_loss
from server.budget import FleetBudget
from server.discovery import discover_devices
from server.reconcile import LedgerReconciler
from server.rounds import HaltHandler, ReportingSecAggPlus, RoundWorkflow
from server.strategy import LoraFedAvg, RoundObserver

log = logging.getLogger("fedlora.server")


def make_evaluator(cfg: FedloraConfig) -> Any:
    """Loss of a global adapter on the coordinator's own held-out set."""
    from fedlora.adapter import set_adapter_arrays

    texts = runtime.fleet(cfg).server_eval
    bundle = runtime.model_bundle(cfg)

    def evaluate(arrays: list[np.ndarray]) -> float:
        ids, mask = runtime.encoded(cfg, "server-eval", texts)
        set_adapter_arrays(bundle.model, arrays)
        return mean_token_loss(bundle.model, ids, mask)

    return evaluate


def secagg_workflow(
    cfg: FedloraConfig, max_weight: float, on_halt: HaltHandler | None = None
) -> SecAggPlusWorkflow:
    """SecAgg+ with ``max_weight`` = the largest record count a device reported.

    SecAgg+ scales each update by num_examples / max_weight before quantizing, so the
    tightest bound is the most precise (and a larger weight would overflow the sum).
    ``on_halt`` hears why a round stopped (:class:`server.rounds.ReportingSecAggPlus`).
    ``timeout`` bounds each of the four stages; the coordinator's :class:`RoundGrid`
    applies the same bound (and the round deadline) whatever the workflow asks.
    """
    s = cfg.secagg
    return ReportingSecAggPlus(
        num_shares=s.num_shares,
        reconstruction_threshold=s.reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=s.clipping_range,
        quantization_range=s.quantization_range,
        timeout=s.timeout_s,
        on_halt=on_halt or (lambda *_: None),
    )


def export_formats(cfg: FedloraConfig) -> tuple[str, ...]:
    """The configured formats plus the configured device profile's, without repeats."""
    from fedlora.export.profiles import profile_formats

    extra = profile_formats(cfg.export.profile) if cfg.export.profile else ()
    return tuple(dict.fromkeys((*cfg.export.formats, *extra)))


class Coordinator:
    """Everything one run of the ServerApp owns: strategy, budgets, run directory."""

    def __init__(
        self,
        cfg: FedloraConfig,
        run_dir: Path,
        observer: RoundObserver | None = None,
        expected_devices: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        # How many devices to wait for before round 1: a simulation knows its fleet;
        # a deployed coordinator waits for fleet.num_devices (settling for min_devices).
        self.expected_devices = expected_devices or cfg.fleet.num_devices
        bundle = runtime.model_bundle(cfg)
        self.budget = FleetBudget(
            cfg.privacy,
            steps_per_round=cfg.training.local_steps,
            batch_size=cfg.training.batch_size,
        )
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self._observer = observer
        self.strategy = LoraFedAvg(
            cfg,
            initial_arrays=bundle.initial_arrays,
            names=bundle.names,
            evaluator=make_evaluator(cfg),
            budget=self.budget,
            run_dir=run_dir,
            observer=self._on_round,
        )

    def _on_round(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        # The ledger is saved every round, so `fedlora report` works on a run in progress.
        self.budget.save(self.run_dir / "privacy" / "ledger.json")
        if self._observer is not None:
            self._observer(row)

    def run(self, grid: Grid, context: Context) -> None:
        devices = discover_devices(
            grid,
            expected=self.expected_devices,
            min_nodes=self.cfg.fleet.min_devices,
            timeout_s=self.cfg.secagg.timeout_s,
        )
        for node_id, props in devices.items():
            self.budget.register(node_id, props)
        legacy = LegacyContext(
            context,
            config=ServerConfig(num_rounds=self.cfg.training.rounds),
            strategy=self.strategy,
        )
        # Devices report the run id with every update; one for another run is refused.
        self.strategy.run_id = str(context.run_id)
        reconciler = LedgerReconciler(self.cfg, self.budget, run_id=self.strategy.run_id)
        DefaultWorkflow(fit_workflow=self.fit_workflow(reconciler))(grid, legacy)
        # Devices that trained in the last round but whose reply never came (or any still
        # owing from earlier rounds): their spend enters the ledger before it is final.
        reconciler.reconcile(grid, final=True)
        self.finish()

    def _expect_spend(self, server_round: int, node_ids: set[int]) -> None:
        for node_id in node_ids:
            self.budget.expect(node_id, server_round)

    def fit_workflow(self, reconciler: LedgerReconciler) -> RoundWorkflow:
        """Each round: ledger reconciliation, then SecAgg+ (or plain) fit with bounded waits."""
        cfg = self.cfg
        inner: Any = default_fit_workflow
        if cfg.secagg.enabled:
            # max_weight from the record counts just discovered.
            max_weight = self.strategy.secagg_max_weight
            inner = secagg_workflow(cfg, max_weight, self.strategy.round_failed)
        return RoundWorkflow(
            inner,
            self.strategy,
            timeout_s=cfg.secagg.timeout_s,
            deadline_s=cfg.training.round_deadline_s,
            before_round=reconciler.reconcile,
            on_training_request=self._expect_spend,
        )

    def finish(self) -> None:
        """Write the run's artefacts: final adapter, ledger, privacy report, export."""
        from fedlora.adapter import save_adapter, set_adapter_arrays
        from fedlora.reporting.artefacts import write_artefacts
        from privacy import build_report
        from privacy.report import RunInfo

        cfg = self.cfg
        bundle = runtime.model_bundle(cfg)
        set_adapter_arrays(bundle.model, self.strategy.global_arrays)
        save_adapter(
            bundle.model,
            self.run_dir / "adapter",
            metadata={"rounds": cfg.training.rounds, "seed": cfg.seed},
        )
        self.budget.save(self.run_dir / "privacy" / "ledger.json")
        budgets = {d: self.budget.budget(d) for d in self.budget.devices()}
        if cfg.privacy.enabled:
            report = build_report(
                self.budget.ledger,
                budgets,
                cfg.privacy.delta,
                accountant=cfg.privacy.accountant,
                noise="calibrated" if cfg.privacy.noise_multiplier is None else "fixed",
                fleet_size=len(budgets),
                run=RunInfo(
                    status="complete",
                    rounds_planned=cfg.training.rounds,
                    rounds_completed=cfg.training.rounds,
                    secagg=cfg.secagg.enabled,
                ),
            )
            # report.json, report.html (self-contained, with plots) and the PNG plots
            write_artefacts(report, self.run_dir / "privacy")
        if cfg.export.enabled:
            from fedlora.export import export_run

            ids, mask = runtime.encoded(cfg, "server-eval", runtime.fleet(cfg).server_eval)
            self.export_manifest = export_run(
                runtime.resolve_model_path(cfg),
                self.run_dir / "adapter",
                self.run_dir / "export",
                ids,
                mask,
                formats=export_formats(cfg),
            )


def _deployed_run(cfg: FedloraConfig, out: Path, context: Context, grid: Grid) -> None:
    """A run started by ``fedlora run`` (or ``flwr run``): config and run.json beside it.

    ``run.json`` goes "running" → "complete" or "failed" (with the error); a
    coordinator restarted after a crash marks runs it finds "running" as
    "interrupted".
    """
    import time

    from fedlora.simulate import RUN_FORMAT, versions, write_json

    if (out / "run.json").exists():
        raise ConfigError(f"run directory {out} already holds a run: pick another run name")
    write_json(out / "config.json", {**cfg.to_dict(), "versions": versions()})
    status: dict[str, Any] = {
        "format": RUN_FORMAT,
        "status": "running",
        "started": time.time(),
        "flower_run_id": context.run_id,
    }
    write_json(out / "run.json", status)
    try:
        coordinator = Coordinator(cfg, out)
        coordinator.run(grid, context)
    except BaseException as exc:
        status.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        write_json(out / "run.json", status)
        raise
    rows = coordinator.strategy.rows
    status.update(
        status="complete",
        finished=time.time(),
        summary={
            "rounds": cfg.training.rounds,
            "eval_loss_round0": rows[0]["eval_loss"] if rows else None,
            "eval_loss_final": rows[-1]["eval_loss"] if rows else None,
            "max_epsilon": coordinator.budget.worst_epsilon(),
        },
    )
    write_json(out / "run.json", status)


#: Set by ``fedlora coordinator`` for the SuperLink it starts: where runs land.
RUNS_DIR_ENV = "FEDLORA_RUNS_DIR"


def resolve_run_dir(context: Context) -> Path:
    """The run's directory: ``run-dir`` from the run config, under the coordinator's runs/.

    Under ``fedlora coordinator`` a relative ``run-dir`` is a name inside
    ``DIR/runs`` (and may not climb out of it); under ``flwr run .`` it is
    relative to the working directory.
    """
    import os

    name = str(context.run_config.get("run-dir", "") or "")
    root = os.environ.get(RUNS_DIR_ENV)
    if root:
        base = Path(root).resolve()
        target = (base / (name or f"run-{context.run_id}")).resolve()
        if base not in target.parents:
            raise ConfigError(f"run-dir {name!r} must be a name inside {base}")
        return target
    return Path(name or "runs/flwr")


def make_server_app(
    cfg: FedloraConfig | None = None,
    run_dir: Path | None = None,
    observer: RoundObserver | None = None,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    """The ServerApp; with ``cfg`` None it reads config and run dir from the run config.

    ``result`` (if given) receives the Coordinator, so the caller can read the
    final adapter, metrics and ledger after the run.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedlora.watchdog import watch_supervisor

        watch_supervisor()  # under `fedlora coordinator`: end with it, even on SIGKILL
        resolved = cfg if cfg is not None else config_from_run_config(dict(context.run_config))
        out = run_dir if run_dir is not None else resolve_run_dir(context)
        out.mkdir(parents=True, exist_ok=True)
        if cfg is None:
            _deployed_run(resolved, out, context, grid)
            return
        expected = len(runtime.fleet(resolved).devices)
        coordinator = Coordinator(resolved, out, observer, expected_devices=expected)
        if result is not None:
            result["coordinator"] = coordinator
        coordinator.run(grid, context)

    return app


app = make_server_app()
