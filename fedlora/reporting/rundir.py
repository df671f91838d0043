"""Read what a privacy report needs from a run directory, finished or in progress.

The ledger (``privacy/ledger.json``) is the only source of ε; ``config.json``
gives every device's budget, δ, the accountant, the noise mode and whether the
noise was reproducible; ``run.json`` and ``metrics.jsonl`` only say how far the
run got and are read tolerantly (a run in progress may have a partial last metrics line). Every
problem a user can cause is one :class:`~fedlora.errors.FedloraError` line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import FedloraConfig
from fedlora.errors import ConfigError, PrivacyError
from fedlora.privacy import PrivacyLedger, build_report
from fedlora.privacy.report import RunInfo

LEDGER = Path("privacy") / "ledger.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory's privacy-relevant contents."""

    path: Path
    config: FedloraConfig
    ledger: PrivacyLedger
    run: RunInfo
    devices_configured: int | None

    @property
    def noise(self) -> str:
        return "calibrated" if self.config.privacy.noise_multiplier is None else "fixed"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load_config(run_dir: Path) -> tuple[FedloraConfig, int | None]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: {run_dir} is not a fedlora run directory "
            "(fedlora simulate writes config.json first)"
        )
    try:
        data = _read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a fedlora config (expected a JSON object)")
    data = dict(data)
    data.pop("versions", None)  # what produced the run, not config
    resolved = data.pop("resolved", None)  # what the run found (device count, ...)
    try:
        config = FedloraConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    devices = resolved.get("devices") if isinstance(resolved, dict) else None
    if devices is not None and (
        not isinstance(devices, int) or isinstance(devices, bool) or devices < 0
    ):
        raise ConfigError(f"{path}: resolved.devices must be a device count, got {devices!r}")
    return config, devices


def _run_status(run_dir: Path) -> str | None:
    try:
        status = _read_json(run_dir / "run.json").get("status")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None  # informational only: the ledger decides ε
    return status if status in ("running", "complete", "failed", "interrupted") else None


def _progress(run_dir: Path) -> tuple[int | None, int | None]:
    """The last round in ``metrics.jsonl`` and its ``unreconciled`` count; unreadable
    lines (a partial last one) are skipped."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, None
    last: tuple[int | None, int | None] = (None, None)
    for line in lines:
        try:
            row = json.loads(line)
            rnd = row.get("round")
        except (ValueError, AttributeError):
            continue
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            continue
        if last[0] is None or rnd >= last[0]:
            owed = row.get("unreconciled")
            last = (rnd, owed if isinstance(owed, int) and not isinstance(owed, bool) else None)
    return last


def _resumed_at(run_dir: Path) -> tuple[int, ...]:
    try:
        resumed = _read_json(run_dir / "run.json").get("resumed") or []
        return tuple(int(r["at_round"]) for r in resumed)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return ()


def load_run(path: str | Path) -> RunDir:
    """Read a run directory; a missing directory, config or ledger, or a tampered ledger, is
    refused with one line."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    config, devices = _load_config(run_dir)
    if not config.privacy.enabled:
        raise PrivacyError(
            f"{run_dir} trained without DP (privacy.enabled is false): it has no privacy report"
        )
    status = _run_status(run_dir)
    ledger_path = run_dir / LEDGER
    if status == "running" and not ledger_path.exists():
        raise PrivacyError(
            f"{ledger_path} does not exist yet: the run is in progress and has not saved its "
            "ledger; try again after its next save"
        )
    ledger = PrivacyLedger.load(ledger_path)  # refuses a missing, edited or mistyped ledger
    trained = len(ledger.devices(unit=None))
    if devices is not None and devices < trained:
        raise PrivacyError(
            f"{ledger_path} has events of {trained} devices but {run_dir / 'config.json'} "
            f"says the fleet has {devices}: the ledger is not this run's"
        )
    rounds_completed, unreconciled = _progress(run_dir)
    run = RunInfo(
        status=status,
        rounds_planned=config.training.rounds,
        rounds_completed=rounds_completed,
        secagg=config.secagg.enabled,
        unreconciled=unreconciled,
        resumed_at=_resumed_at(run_dir),
        reproducible_noise=config.privacy.reproducible_noise,
    )
    return RunDir(run_dir, config, ledger, run, devices)


def report_for(
    run: RunDir,
    delta: float | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The privacy report of a run at ``delta`` (default: the run's δ); with the run's
    ``audit.json`` (``fedlora audit``), its lower bound beside the claim (``report["audit"]``,
    at the run's δ)."""
    from fedlora.privacy.device_report import PLAN_FILE, attach_device_level
    from fedlora.reporting.audit import audit_summary, read_audit

    privacy = run.config.privacy
    report = build_report(
        run.ledger,
        {device: privacy.epsilon for device in run.ledger.devices()},
        privacy.delta if delta is None else delta,
        privacy.accountant,
        noise=run.noise,
        fleet_size=run.devices_configured,
        run=run.run,
        workers=workers,
        progress=progress,
    )
    if privacy.device_level:
        plan_path = run.path / "privacy" / PLAN_FILE
        plan = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else None
        attach_device_level(
            report,
            run.ledger,
            budget_epsilon=privacy.device.epsilon,
            delta=privacy.device.delta,
            mechanism=plan,
            record_level=privacy.record_level,
        )
    audit = read_audit(run.path)
    if audit is not None:
        report["audit"] = audit_summary(audit)
    return report
