"""``fedlora simulate``: a whole simulated fleet on this machine, start to finish.

Order of work, so that bad input costs nothing: resolve and validate the config,
read the data and the model (every user error surfaces here, before RUN_DIR
exists) → write ``config.json`` and ``run.json`` (status "running") → run
Flower's simulation engine with the coordinator (ServerApp) and the device
clients (ClientApp) → the coordinator writes the adapter, ledger, report and
export → ``run.json`` becomes "complete". A run that dies leaves ``run.json``
saying "failed" with the reason, never a directory that looks finished. An export
that fails after training leaves the run "complete" with ``export`` "failed" and the
reason, and :class:`ExportAfterTrainingError` (exit code 9) says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError, ExportError, FedloraError
from fedlora.runfiles import RUN_FORMAT, versions, write_json
from fedlora.runtime import WORKER_THREAD_VARS
from fedlora.simprefetch import Prefetch


class ExportAfterTrainingError(ExportError):
    """Training completed and its artefacts are written, but the export after it failed.

    ``run.json`` says ``complete`` and, under ``export``, ``failed`` with the reason; the
    CLI exits with its own code, so a script can tell "export again" (cheap) from "train
    again". ``summary`` is the completed run's summary.
    """

    exit_code = 9

    def __init__(self, run_dir: Path, error: str, summary: dict[str, Any]) -> None:
        super().__init__(
            f"training completed (adapter, ledger and privacy report are in {run_dir}; run.json "
            f"says complete), but the export failed: {error}; fix that and run "
            f"`fedlora export {run_dir}`"
        )
        self.summary = summary


#: What ``run.json`` says of a run whose devices' records were changed (``fedlora audit``).
AUDIT_RUN = "canaries inserted by fedlora audit (not resumable)"


def prepare(cfg: FedloraConfig) -> dict[str, Any]:
    """Load data and model once up front, so every user error is raised before a run starts."""
    from fedlora import runtime

    fleet = runtime.fleet(cfg)
    if len(fleet.devices) < cfg.fleet.devices_per_round:
        raise ConfigError(
            f"the data has {len(fleet.devices)} devices but fleet.devices_per_round is "
            f"{cfg.fleet.devices_per_round}: lower it or use more devices"
        )
    if cfg.export.enabled:
        from fedlora.export import available_formats
        from fedlora.server.app import export_formats

        unknown = sorted(set(export_formats(cfg)) - set(available_formats()))
        if unknown:
            known = ", ".join(available_formats())
            raise ConfigError(f"unknown export format {unknown[0]!r}: choose from {known}")
        if cfg.export.gates:
            from fedlora.export.pipeline import check_configured_gates

            check_configured_gates(cfg.export.gates)
        if any(name.startswith("gguf") for name in export_formats(cfg)):
            from fedlora.export.gguf import check_exportable

            # before training: an unsupported model is refused before it costs a run
            check_exportable(runtime.resolve_model_path(cfg))
    from fedlora.adapter import lora_targets

    bundle = runtime.model_bundle(cfg)
    if cfg.privacy.device_level:
        from fedlora.server.ddp import plan

        # before training: a modulus too small for the noise is refused in one line
        plan(cfg, int(sum(a.size for a in bundle.initial_arrays)))
    return {
        "devices": len(fleet.devices),
        "train_records": sum(len(d.train) for d in fleet.devices),
        "server_eval_records": len(fleet.server_eval),
        "model_path": str(runtime.resolve_model_path(cfg)),
        "adapter_tensors": len(bundle.names),
        "adapter_parameters": int(sum(a.size for a in bundle.initial_arrays)),
        # what lora.target_modules (null: the model family's default) resolved to
        "lora_target_modules": lora_targets(bundle.model),
        "data_description": fleet.description,
    }


def check_run_dir(run_dir: Path, force: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty: "
            "pick a new --out or pass --force to overwrite it"
        )


def simulate(
    cfg: FedloraConfig,
    run_dir: Path,
    *,
    force: bool = False,
    verbose: bool = False,
    show_progress: bool = True,
    data_hook: Any = None,
    client_mods: Sequence[Any] = (),
    prefetch: bool = True,
) -> dict[str, Any]:
    """Run the simulated fleet; returns the run summary (also written to ``run.json``).

    ``data_hook`` (:data:`fedlora.client.device_client.DataHook`) changes each simulated
    device's records: only ``fedlora audit`` passes one, to insert its canaries.
    ``client_mods``: more ClientApp mods, outermost (tests' faults; none in a normal run).
    ``prefetch``: calibrate the devices' σ ahead of their rounds at the lowest CPU
    priority (:mod:`fedlora.simprefetch`; calibrated DP only, never with ``data_hook``).
    Started first, so it uses the core the model's loading leaves idle.
    """
    if not verbose:
        quiet_libraries()
    check_run_dir(run_dir, force)
    ahead = Prefetch(cfg) if prefetch and data_hook is None else contextlib.nullcontext()
    with ahead:
        return _simulate(cfg, run_dir, force, verbose, show_progress, data_hook, client_mods)


def _simulate(
    cfg: FedloraConfig,
    run_dir: Path,
    force: bool,
    verbose: bool,
    show_progress: bool,
    data_hook: Any,
    client_mods: Sequence[Any],
) -> dict[str, Any]:
    import shutil

    info = prepare(cfg)

    if run_dir.exists() and force:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_json(
        run_dir / "config.json",
        {**cfg.to_dict(), "resolved": info, "versions": versions()},
    )
    status: dict[str, Any] = {
        "format": RUN_FORMAT,
        "status": "running",
        "started": time.time(),
        **_process_id(),
    }
    if data_hook is not None:
        status["audit"] = AUDIT_RUN
    return _run_and_record(
        cfg, run_dir, info, status, verbose, show_progress, None, data_hook, client_mods
    )


def resume_simulation(
    run_dir: Path, *, verbose: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Continue a simulation cut off by a crash (or a kill) after its last committed round.

    The run's own ``config.json`` is used; the run must not be complete, and one still
    marked "running" must have lost its process (same host, pid gone). The round the
    crash cut is trained again; what devices spent in it stays in their ledgers and is
    recovered into the coordinator's (:mod:`fedlora.server.resume`).
    """
    from fedlora.server.app import resumable_run

    if not verbose:
        quiet_libraries()
    try:
        status = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {}  # resumable_run says what is wrong
    if isinstance(status, dict) and status.get("status") == "running" and _alive(status):
        raise ConfigError(
            f"run {run_dir} is still running (pid {status.get('pid')}): stop it first, or "
            "wait for it to finish"
        )
    if isinstance(status, dict) and status.get("audit"):
        raise ConfigError(
            f"{run_dir} is a `fedlora audit` run: resuming it would train on without its "
            "canaries; run the audit again with --force"
        )
    cfg, state = resumable_run(run_dir, statuses=("interrupted", "failed", "running"))
    info = prepare(cfg)
    status.pop("error", None)
    status.update(status="running", **_process_id())
    status.setdefault("resumed", []).append({"at_round": state.next_round, "time": time.time()})
    return _run_and_record(cfg, run_dir, info, status, verbose, show_progress, state)


def _run_and_record(
    cfg: FedloraConfig,
    run_dir: Path,
    info: dict[str, Any],
    status: dict[str, Any],
    verbose: bool,
    show_progress: bool,
    resume: Any,
    data_hook: Any = None,
    client_mods: Sequence[Any] = (),
) -> dict[str, Any]:
    write_json(run_dir / "run.json", status)
    t0 = time.perf_counter()
    try:
        rows, coordinator = _run_engine(
            cfg, run_dir, info, verbose, show_progress, resume, data_hook, client_mods
        )
    except BaseException as exc:  # record the failure, then let the CLI report it
        status.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_json(run_dir / "run.json", status)
        raise
    status["flower_run_id"] = coordinator.strategy.run_id
    if resume is not None:
        status["resumed"][-1].update(
            flower_run_id=coordinator.strategy.run_id, recovered=coordinator.recovery
        )
    summary = _summary(cfg, run_dir, rows, coordinator, time.perf_counter() - t0)
    export = getattr(coordinator, "export_status", None)
    if export is not None:
        status["export"] = export
    status.update(status="complete", finished=time.time(), summary=summary)
    write_json(run_dir / "run.json", status)
    if export is not None and export.get("status") == "failed":
        raise ExportAfterTrainingError(run_dir, str(export.get("error")), summary)
    return summary


def _process_id() -> dict[str, Any]:
    """Which process runs the simulation: ``--resume`` refuses a run that is alive."""
    return {"pid": os.getpid(), "host": platform.node()}


def _alive(status: dict[str, Any]) -> bool:
    from fedlora.watchdog import alive

    pid = status.get("pid")
    if status.get("host") != platform.node() or not isinstance(pid, int):
        return False
    return alive(pid)


def quiet_libraries() -> None:
    """Keep the terminal to fedlora's own display: library chatter goes, errors stay.

    Flower's deprecation notice for ``run_simulation``, Ray's accelerator tip and
    transformers' weight-loading bars say nothing actionable to a fedlora user;
    ``--verbose`` brings them back.
    """
    import warnings

    from flwr.supercore.logger import update_console_handler  # importing sets its level
    from transformers.utils import logging as hf_logging

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.ERROR)
    flwr_logger.propagate = False  # opacus calls logging.basicConfig: no second copy via root
    update_console_handler(level=logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


PRELOAD_HOOK = "fedlora.client.preload.start"
"""Ray's ``worker_process_setup_hook`` for the simulation's workers."""

RUNTIME_ENV_HOOK = "fedlora.simulate.with_preload"
"""Ray's ``RAY_RUNTIME_ENV_HOOK`` while a simulation starts Ray (:func:`worker_environment`)."""


def with_preload(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Add :data:`PRELOAD_HOOK` to the runtime environment Flower starts Ray with.

    Each worker then imports torch, transformers, peft and Opacus as it starts, while
    the coordinator builds its own model (:mod:`fedlora.client.preload`). Flower passes
    ``runtime_env`` to ``ray.init`` itself (its ``PYTHONPATH``), so an ``init_args``
    entry would collide with it; Ray's own hook for editing that environment does not.
    """
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", PRELOAD_HOOK)
    return env


def ray_backend_config(verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend: one simulated device per CPU at a time.

    On this machine Ray starts with the cores there are. With ``RAY_ADDRESS`` set (Ray's
    own variable, e.g. ``auto`` on a node of a cluster started with ``ray start``) the
    simulation joins that cluster instead and uses every CPU it has; Ray refuses CPU
    counts for a cluster it did not start, so none are passed then.
    """
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "DEBUG" if verbose else "ERROR",
        "log_to_driver": verbose,
    }
    if not os.environ.get("RAY_ADDRESS"):
        init_args.update(num_cpus=os.cpu_count() or 1, num_gpus=0)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """Start Ray's workers with one thread per library and the device runtime preloaded.

    A worker is one slot of one core (``client_resources``: 1 CPU) and trains with one
    torch thread. numpy's OpenBLAS sizes its own pool from ``OMP_NUM_THREADS`` or
    ``OPENBLAS_NUM_THREADS``; with 2 set (as the benches set for their own work), the
    dot products of a device's noise calibration woke a second BLAS thread that spins
    between calls: the calibration's CPU time doubled (0.13 → 0.26 s,
    ``bench/calibration.py``) and came out of the other worker's training (rounds 21 %
    slower at the default fleet). Ray's raylet, started in this process, passes the
    environment to the workers it spawns; this process's own pools are sized before the
    change and keep their size, and the variables are put back after the run.

    ``RAY_RUNTIME_ENV_HOOK`` names :func:`with_preload` for the run, unless the user
    set a hook of their own (theirs is kept; the workers then import as they go).
    """
    import torch

    torch.get_num_threads()  # the coordinator's pool is sized now, from the user's setting
    keys = (*WORKER_THREAD_VARS, "RAY_RUNTIME_ENV_HOOK")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(WORKER_THREAD_VARS, "1"))
    os.environ.setdefault("RAY_RUNTIME_ENV_HOOK", RUNTIME_ENV_HOOK)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_engine(
    cfg: FedloraConfig,
    run_dir: Path,
    info: dict[str, Any],
    verbose: bool,
    show_progress: bool,
    resume: Any = None,
    data_hook: Any = None,
    client_mods: Sequence[Any] = (),
) -> tuple[list[dict[str, Any]], Any]:
    from flwr.simulation import run_simulation

    from fedlora import simdispatch
    from fedlora.client.app import make_client_app
    from fedlora.client.simulated import simulated_fleet_mod
    from fedlora.progress import RunProgress
    from fedlora.server.app import make_server_app

    result: dict[str, Any] = {}
    with RunProgress(cfg, info, enabled=show_progress) as progress:
        server_app = make_server_app(
            cfg, run_dir, observer=progress.on_round, result=result, resume=resume
        )
        # Simulation only: profiles' dropouts and speeds (no-op without fleet.profiles).
        outer = [*client_mods, *([simulated_fleet_mod(cfg)] if cfg.fleet.profiles else [])]
        client_app = make_client_app(
            cfg, device_root=run_dir / "devices", outer_mods=outer, data_hook=data_hook, warm=True
        )
        simdispatch.install()  # one scan of the message store per poll, not one per node
        with worker_environment():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=info["devices"],
                backend_config=ray_backend_config(verbose),
                verbose_logging=verbose,
            )
    coordinator = result.get("coordinator")
    rows = coordinator.strategy.rows if coordinator is not None else []
    if (
        coordinator is None
        or len(rows) < cfg.training.rounds + 1
        or not (run_dir / "adapter" / "adapter_model.safetensors").exists()
    ):
        raise FedloraError(
            f"the simulation stopped before finishing ({max(len(rows) - 1, 0)} of "
            f"{cfg.training.rounds} rounds): rerun with --verbose to see Flower's log"
        )
    return rows, coordinator


def _summary(
    cfg: FedloraConfig, run_dir: Path, rows: list[dict[str, Any]], coordinator: Any, wall: float
) -> dict[str, Any]:
    first, last = rows[0], rows[-1]
    summary: dict[str, Any] = {
        "rounds": cfg.training.rounds,
        "eval_loss_round0": first["eval_loss"],
        "eval_loss_final": last["eval_loss"],
        "secagg": cfg.secagg.enabled,
        "dp": cfg.privacy.record_level,
        "wall_s": round(wall, 2),
        "artefacts": {
            "adapter": str(run_dir / "adapter"),
            "metrics": str(run_dir / "metrics.jsonl"),
            "ledger": str(run_dir / "privacy" / "ledger.json"),
        },
    }
    if cfg.privacy.enabled:
        report = json.loads((run_dir / "privacy" / "report.json").read_text())
        summary["privacy"] = {"unit": cfg.privacy.unit}
        if cfg.privacy.record_level:
            summary["privacy"].update(
                accountant=report["accountant"],
                delta=report["delta"],
                max_epsilon=report["fleet"]["max_epsilon"],
                budget_epsilon=cfg.privacy.epsilon,
            )
        if cfg.privacy.device_level:
            section = report["device_level"]
            summary["privacy"]["device_level"] = {
                "accountant": "ddg-rdp",
                "delta": section["delta"],
                "max_epsilon": section["max_epsilon"],
                "budget_epsilon": section["budget_epsilon"],
            }
        summary["privacy"]["reproducible_noise"] = cfg.privacy.reproducible_noise
        summary["artefacts"]["privacy_report"] = str(run_dir / "privacy" / "report.json")
    manifest = getattr(coordinator, "export_manifest", None)
    if cfg.export.enabled and manifest:
        summary["artefacts"]["export"] = str(run_dir / "export")
        summary["export"] = {
            a["name"]: {"bytes": a["total_bytes"], **a.get("quality", {})}
            for a in manifest["artefacts"]
        }
    return summary
