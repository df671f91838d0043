"""The coordinator: a Flower ServerApp running SecAgg+ over the LoRA strategy.

SecAgg+ in Flower 1.39 runs only through the legacy workflow, so ``main``
wraps the strategy in a ``LegacyContext`` and runs ``DefaultWorkflow`` with
fedlora's SecAgg+ (:class:`fedlora.server.secagg.FedloraSecAggPlus`) as its fit
workflow (``--no-secagg`` uses Flower's default fit workflow with the same strategy,
for comparison).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fedlora import runtime
from fedlora.config import FedloraConfig, config_from_run_config
from fedlora.errors import ConfigError
from fedlora.evaluation import mean_token_loss
from fedlora.privacy.device_report import PLAN_FILE
from fedlora.runfiles import write_json_atomic
from fedlora.secagg.version import check_fleet
from fedlora.server.budget import FleetBudget
from fedlora.server.checkpoint import load_checkpoint, save_checkpoint
from fedlora.server.ddp import DeviceLevelDP
from fedlora.server.discovery import discover_devices
from fedlora.server.exchange import PromptGrid
from fedlora.server.reconcile import LedgerReconciler
from fedlora.server.resume import (
    ResumableWorkflow,
    RunState,
    config_digest,
    file_digest,
    load_ledger_prefix,
)
from fedlora.server.rounds import HaltHandler, RoundWorkflow
from fedlora.server.secagg import FedloraSecAggPlus, Screen
from fedlora.server.strategy import LoraFedAvg, RoundObserver

log = logging.getLogger("server")


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
    cfg: FedloraConfig,
    max_weight: float,
    on_halt: HaltHandler | None = None,
    screen: Screen | None = None,
    device_level: DeviceLevelDP | None = None,
) -> SecAggPlusWorkflow:
    """SecAgg+ with ``max_weight`` = the largest record count a device reported.

    SecAgg+ scales each update by num_examples / max_weight before quantizing, so the
    tightest bound is the most precise (and a larger weight would overflow the sum).
    ``on_halt`` hears why a round stopped (:class:`fedlora.server.rounds.ReportingSecAggPlus`);
    ``screen`` checks the devices' claims before unmasking and names the liars to leave
    out of the sum (:class:`fedlora.server.secagg.FedloraSecAggPlus`).
    ``timeout`` bounds each of the four stages; the coordinator's :class:`RoundGrid`
    applies the same bound (and the round deadline) whatever the workflow asks.
    """
    s = cfg.secagg
    return FedloraSecAggPlus(
        num_shares=s.num_shares,
        reconstruction_threshold=s.reconstruction_threshold,
        dropout_rate=s.dropout_rate,
        max_weight=max_weight,
        clipping_range=s.clipping_range,
        quantization_range=s.quantization_range,
        timeout=s.timeout_s,
        on_halt=on_halt or (lambda *_: None),
        screen=screen,
        device_level=device_level,
    )


def export_formats(cfg: FedloraConfig) -> tuple[str, ...]:
    """The configured formats plus the configured device profile's, without repeats."""
    from fedlora.export.profiles import profile_formats

    extra = profile_formats(cfg.export.profile) if cfg.export.profile else ()
    return tuple(dict.fromkeys((*cfg.export.formats, *extra)))


class Coordinator:
    """Everything one run of the ServerApp owns: strategy, budgets, run directory.

    With ``resume`` (a verified :class:`fedlora.server.resume.RunState`) it continues that run
    after its last committed round instead of starting one: ledger, global adapter,
    sampler, metrics and declines as they were.
    """

    def __init__(
        self,
        cfg: FedloraConfig,
        run_dir: Path,
        observer: RoundObserver | None = None,
        expected_devices: int | None = None,
        resume: RunState | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        # How many devices to wait for before round 1: a simulation knows its fleet;
        # a deployed coordinator waits for fleet.num_devices (settling for min_devices).
        self.expected_devices = expected_devices or cfg.fleet.num_devices
        bundle = runtime.model_bundle(cfg)
        self.ledger_path = run_dir / "privacy" / "ledger.json"
        self.budget = FleetBudget(
            cfg.privacy,
            load_ledger_prefix(self.ledger_path, resume) if resume else None,
            steps_per_round=cfg.training.local_steps,
            batch_size=cfg.training.batch_size,
        )
        self.metrics_path = run_dir / "metrics.jsonl"
        rows = _keep_metrics(self.metrics_path, resume.round) if resume else []
        # The digest of the config as the run's config.json holds it (written at its start).
        self._config_sha256 = resume.config_sha256 if resume else config_digest(cfg.to_dict())
        #: Flower run ids that worked on this run before this one (oldest first).
        self.segments: list[str] = list(resume.segments) if resume else []
        #: What the earlier segments' spend recovery found (resumed runs only).
        self.recovery: dict[str, int] = {}
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
        if self.strategy.device_level is not None:
            # The run's resolved device-level plan (grid, σ, survivors), for the report and
            # for whoever reproduces the run.
            (run_dir / "privacy").mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.strategy.device_level.plan.to_dict(), run_dir / "privacy" / PLAN_FILE
            )
        if resume is not None:
            ckpt = run_dir / resume.checkpoint
            self.strategy.restore(
                load_checkpoint(ckpt, bundle.names),
                checkpoint=ckpt,
                sampler_state=resume.rng,
                rows=rows,
                wall_s=resume.wall_s,
            )
            self.budget.declined |= set(resume.declined)
        else:
            # Round 0's adapter is a checkpoint too: a run cut in round 1 resumes from it.
            self.strategy.checkpoint = save_checkpoint(
                run_dir / "checkpoints", 0, bundle.names, bundle.initial_arrays
            )

    def _on_round(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        # The ledger is saved every round, so `fedlora report` works on a run in progress.
        self.budget.save(self.ledger_path)
        self._commit(int(row["round"]), float(row["wall_s"]))
        if self._observer is not None:
            self._observer(row)

    def _resumed_at(self) -> list[int]:
        try:
            status = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8"))
            return [int(r["at_round"]) for r in status.get("resumed", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [self.resume.next_round] if self.resume else []

    def _commit(self, server_round: int, wall_s: float) -> None:
        """Write ``state.json`` for a finished round (after its row and its ledger)."""
        ckpt = self.strategy.checkpoint
        if ckpt is None:  # pragma: no cover - round 0 writes one
            raise RuntimeError("no global adapter checkpoint to commit")
        ledger = self.budget.ledger.to_dict()
        segments = [*self.segments, *([self.strategy.run_id] if self.strategy.run_id else [])]
        RunState(
            round=server_round,
            rounds=self.cfg.training.rounds,
            checkpoint=ckpt.relative_to(self.run_dir).as_posix(),
            checkpoint_sha256=file_digest(ckpt),
            ledger_events=len(ledger["events"]),
            ledger_sha256=ledger["sha256"],
            rng=self.strategy.sampler_state,
            config_sha256=self._config_sha256,
            segments=list(dict.fromkeys(segments)),
            declined=sorted(self.budget.declined),
            wall_s=wall_s,
        ).save(self.run_dir)

    def run(self, grid: Grid, context: Context) -> None:
        grid = PromptGrid(grid)  # replies read as they arrive, not every 0.1 s / 3 s
        devices = discover_devices(
            grid,
            expected=self.expected_devices,
            min_nodes=self.cfg.fleet.min_devices,
            timeout_s=self.cfg.secagg.timeout_s,
        )
        if self.cfg.secagg.enabled:
            check_fleet(devices)  # every device speaks this coordinator's SecAgg+, or no run
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
        first_round = 1
        if self.resume is not None:
            first_round = self.resume.next_round
            earlier = [s for s in self.segments if s != self.strategy.run_id]
            # What devices spent under the earlier run ids and this ledger lacks (the
            # round the crash cut, replies that never came) enters it before round one.
            self.recovery = reconciler.recover(
                grid, sorted(devices), earlier, up_to_round=first_round
            )
            self.budget.save(self.ledger_path)
            log.info(
                "resuming at round %d of %d (%d event(s) recovered from devices' ledgers)",
                first_round,
                self.cfg.training.rounds,
                self.recovery.get("recorded", 0),
            )
        ResumableWorkflow(self.fit_workflow(reconciler), first_round)(grid, legacy)
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
            inner = secagg_workflow(
                cfg,
                max_weight,
                self.strategy.round_failed,
                self.strategy.screen_secagg,
                device_level=self.strategy.device_level,
            )
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
        from fedlora.privacy import build_report
        from fedlora.privacy.device_report import attach_device_level
        from fedlora.privacy.report import RunInfo
        from fedlora.reporting.artefacts import write_artefacts

        cfg = self.cfg
        bundle = runtime.model_bundle(cfg)
        set_adapter_arrays(bundle.model, self.strategy.global_arrays)
        save_adapter(
            bundle.model,
            self.run_dir / "adapter",
            metadata={"rounds": cfg.training.rounds, "seed": cfg.seed},
        )
        self.budget.save(self.ledger_path)
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
                    unreconciled=self.budget.num_owed(),
                    resumed_at=tuple(self._resumed_at()),
                    reproducible_noise=cfg.privacy.reproducible_noise,
                ),
            )
            if self.strategy.device_level is not None:
                attach_device_level(
                    report,
                    self.budget.ledger,
                    budget_epsilon=cfg.privacy.device.epsilon,
                    delta=cfg.privacy.device.delta,
                    mechanism=self.strategy.device_level.plan.to_dict(),
                    record_level=cfg.privacy.record_level,
                )
            # report.json, report.html (self-contained, with plots) and the PNG plots
            write_artefacts(report, self.run_dir / "privacy")
        self.export_manifest, self.export_status = export_after_training(cfg, self.run_dir)


def export_after_training(
    cfg: FedloraConfig, run_dir: Path
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The run's export, once its adapter, ledger and report are written: ``(manifest,
    status)``, where ``status`` is what ``run.json`` records under ``export``.

    A failed export does not fail the run: training is complete and the adapter and
    ledger are good, so the error is returned (``{"status": "failed", "error": ...}``)
    for ``run.json``, and ``fedlora export RUN_DIR`` retries it. The configured formats
    replace their own earlier artefacts (a resumed run exports again); others are kept.
    """
    if not cfg.export.enabled:
        return None, {"status": "disabled"}
    from fedlora.errors import FedloraError
    from fedlora.export import export_run
    from fedlora.export.pipeline import gates_for

    try:
        ids, mask = runtime.encoded(cfg, "server-eval", runtime.fleet(cfg).server_eval)
        formats = export_formats(cfg)
        manifest = export_run(
            runtime.resolve_model_path(cfg),
            run_dir / "adapter",
            run_dir / "export",
            ids,
            mask,
            formats=formats,
            gate=gates_for(formats, cfg.export.gates),
            replace=True,
        )
    except Exception as exc:  # recorded in run.json; training stays complete
        log.error(
            "training completed, but the export failed: %s",
            exc,
            exc_info=not isinstance(exc, FedloraError),
        )
        return None, {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "retry": f"fedlora export {run_dir}",
        }
    return manifest, {
        "status": "complete",
        "artefacts": [a["name"] for a in manifest["artefacts"]],
    }


def _deployed_run(
    cfg: FedloraConfig, out: Path, context: Context, grid: Grid, resume: RunState | None = None
) -> None:
    """A run started by ``fedlora run`` (or ``flwr run``): config and run.json beside it.

    ``run.json`` goes "running" → "complete" or "failed" (with the error), and says under
    ``export`` whether the export after training completed or failed (and why); a
    coordinator restarted after a crash marks runs it finds "running" as
    "interrupted", and ``fedlora run --resume NAME`` continues one (``resume``).
    """
    import time

    from fedlora.runfiles import RUN_FORMAT, versions, write_json

    if resume is None:
        if (out / "run.json").exists():
            raise ConfigError(f"run directory {out} already holds a run: pick another run name")
        write_json(out / "config.json", {**cfg.to_dict(), "versions": versions()})
        status: dict[str, Any] = {
            "format": RUN_FORMAT,
            "status": "running",
            "started": time.time(),
            "flower_run_id": context.run_id,
        }
    else:
        status = json.loads((out / "run.json").read_text(encoding="utf-8"))
        status.pop("error", None)
        status.update(status="running", flower_run_id=context.run_id)
        status.setdefault("resumed", []).append(
            {"at_round": resume.next_round, "flower_run_id": context.run_id, "time": time.time()}
        )
    write_json(out / "run.json", status)
    try:
        coordinator = Coordinator(cfg, out, resume=resume)
        coordinator.run(grid, context)
    except BaseException as exc:
        status.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        write_json(out / "run.json", status)
        raise
    if resume is not None:
        status["resumed"][-1]["recovered"] = coordinator.recovery
    rows = coordinator.strategy.rows
    status["export"] = coordinator.export_status  # a failed export leaves training complete
    status.update(
        status="complete",
        finished=time.time(),
        summary={
            "rounds": cfg.training.rounds,
            "eval_loss_round0": rows[0]["eval_loss"] if rows else None,
            "eval_loss_final": rows[-1]["eval_loss"] if rows else None,
            "max_epsilon": coordinator.budget.worst_epsilon(),
            "unreconciled": coordinator.budget.num_owed(),
        },
    )
    write_json(out / "run.json", status)


def resumable_run(out: Path, *, statuses: tuple[str, ...]) -> tuple[FedloraConfig, RunState]:
    """The saved config and committed state of the run in ``out``, if it may be resumed.

    ``statuses``: the ``run.json`` statuses the caller accepts (a deployed run still
    "running" may be alive; a simulation checks its process itself). ConfigError
    otherwise, saying why.
    """
    from fedlora.server.resume import load_state

    try:
        status = json.loads((out / "run.json").read_text(encoding="utf-8"))
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{out} holds no run to resume (no run.json or config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the run in {out}: {exc}") from None
    state = status.get("status") if isinstance(status, dict) else None
    if state == "complete":
        raise ConfigError(f"run {out.name} is already complete: nothing to resume")
    if state not in statuses:
        raise ConfigError(
            f"run {out.name} is {state!r}, not one of {', '.join(statuses)}: only a run cut "
            "off by a crash or a failure can be resumed (a coordinator restarted after a "
            "crash marks its runs 'interrupted')"
        )
    from fedlora.config import RUN_METADATA_KEYS

    if not isinstance(saved, dict):
        raise ConfigError(f"{out}/config.json is not a fedlora config")
    cfg = FedloraConfig.from_dict(saved)
    settings = {k: v for k, v in saved.items() if k not in RUN_METADATA_KEYS}
    return cfg, load_state(out, settings)


#: Run config key set by ``fedlora run --resume``: continue the run in ``run-dir``.
RESUME_KEY = "resume"
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
    resume: RunState | None = None,
) -> ServerApp:
    """The ServerApp; with ``cfg`` None it reads config and run dir from the run config.

    ``result`` (if given) receives the Coordinator, so the caller can read the
    final adapter, metrics and ledger after the run; ``resume`` continues the run in
    ``run_dir`` after its last committed round (``fedlora simulate --resume``).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedlora.watchdog import watch_supervisor

        watch_supervisor()  # under `fedlora coordinator`: end with it, even on SIGKILL
        out = run_dir if run_dir is not None else resolve_run_dir(context)
        if cfg is None:
            if str(context.run_config.get(RESUME_KEY, "")).lower() in ("1", "true", "yes"):
                saved, state = resumable_run(out, statuses=("interrupted", "failed"))
                # The devices train with the run config's copy: it must be the run's own.
                sent = config_from_run_config(dict(context.run_config))
                if sent.to_dict() != saved.to_dict():
                    raise ConfigError(
                        f"the config sent to resume run {out.name} is not the one it started "
                        "with: resume it with `fedlora run --resume NAME`"
                    )
                _deployed_run(saved, out, context, grid, resume=state)
                return
            resolved = config_from_run_config(dict(context.run_config))
            out.mkdir(parents=True, exist_ok=True)
            _deployed_run(resolved, out, context, grid)
            return
        out.mkdir(parents=True, exist_ok=True)
        expected = len(runtime.fleet(cfg).devices)
        coordinator = Coordinator(cfg, out, observer, expected_devices=expected, resume=resume)
        if result is not None:
            result["coordinator"] = coordinator
        coordinator.run(grid, context)

    return app


app = make_server_app()


def _keep_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """The metrics rows of rounds ≤ ``last_round``, rewritten atomically as the file.

    Rows of a later round (the one cut by the crash, written before its commit) are
    moved to ``metrics-superseded.jsonl``: that round is trained again.
    """
    from fedlora.runfiles import write_text_atomic

    kept: list[dict[str, Any]] = []
    superseded: list[str] = []
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row cut mid-write by the crash
            superseded.append(line)
            continue
        rnd = row.get("round") if isinstance(row, dict) else None
        if isinstance(rnd, int) and rnd <= last_round:
            kept.append(row)
        else:
            superseded.append(line)
    rounds = [r["round"] for r in kept]
    if rounds != list(range(last_round + 1)):
        raise ConfigError(
            f"{path} holds rounds {rounds}, not 0..{last_round} as committed: restore it "
            "from backup to resume"
        )
    if superseded:
        with path.with_name("metrics-superseded.jsonl").open("a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in superseded))
    write_text_atomic("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), path)
    return kept
