"""PrivacyService: what the coordinator's ledgers say each device has spent of its budget.

Sources, all under ``DIR/runs/<run>/``: ``privacy/ledger.json`` (checksummed; an
edited ledger is refused, never under-counted) and ``config.json``, read with
:func:`fedlora.reporting.rundir.load_run` exactly as ``fedlora report`` does.

Both units are answered: the record-level ε of the device's DP-SGD rounds, and (when the
device was ever in a device-level sum, or the policy in force protects devices) the
device-level ε of the rounds its whole update was in a distributed-discrete-Gaussian
sum, each with its own budget, δ and accountant. A device-level run's devices would
otherwise read "nothing spent" from a ledger that holds their rounds.

A device's spent ε composes its events from *every* run's ledger: a device that
trained in two runs on the same records has spent both. The budget, δ and
accountant are those of the most recent run the device trained in (by ledger
modification time; the latest run with a ledger if it trained in none): runs are
configured by the operator, and the latest configuration is the policy in force.
Devices keep their own ledgers and refuse to train past their budget whatever
this service says; it answers "how much is left" for them and for the operator.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedlora.errors import FedloraError, PrivacyError
from fedlora.privacy import epsilon_for
from fedlora.privacy.accountants.ddg import epsilon_for_device
from fedlora.reporting.rundir import LEDGER, RunDir, load_run, report_for
from fedlora.server.service.auth import Caller
from fedlora.server.service.status import abort, abort_on
from fedlora.v1 import privacy_service_pb2 as pb

_RUN_NAME = re.compile(r"[^/\\]+")


DEVICE_LEVEL_ACCOUNTANT = "ddg-rdp"


@dataclass(frozen=True)
class DeviceLevelSpend:
    """Device-level ε of one device (the unit: its whole data), over every run."""

    epsilon_spent: float
    epsilon_budget: float
    delta: float
    rounds: int
    runs: tuple[str, ...]
    accountant: str = DEVICE_LEVEL_ACCOUNTANT

    @property
    def epsilon_remaining(self) -> float:
        return self.epsilon_budget - self.epsilon_spent

    def to_proto(self) -> pb.DeviceLevelBudget:
        return pb.DeviceLevelBudget(
            epsilon_spent=self.epsilon_spent,
            epsilon_remaining=self.epsilon_remaining,
            epsilon_budget=self.epsilon_budget,
            delta=self.delta,
            accountant=self.accountant,
            rounds=self.rounds,
            runs=list(self.runs),
        )


@dataclass(frozen=True)
class DeviceBudget:
    device_id: str
    epsilon_spent: float
    epsilon_budget: float
    delta: float
    accountant: str
    rounds_trained: int
    runs: tuple[str, ...]
    budget_run: str
    policy_unit: str = "record"
    device_level: DeviceLevelSpend | None = None

    @property
    def epsilon_remaining(self) -> float:
        return self.epsilon_budget - self.epsilon_spent

    def to_proto(self) -> pb.GetBudgetResponse:
        return pb.GetBudgetResponse(
            policy_unit=self.policy_unit,
            device_level=self.device_level.to_proto() if self.device_level else None,
            device_id=self.device_id,
            epsilon_spent=self.epsilon_spent,
            epsilon_remaining=self.epsilon_remaining,
            epsilon_budget=self.epsilon_budget,
            delta=self.delta,
            accountant=self.accountant,
            rounds_trained=self.rounds_trained,
            runs=list(self.runs),
            budget_run=self.budget_run,
        )


class FleetLedgers:
    """Every run with a privacy ledger, reloaded when a ledger or config changes on disk."""

    def __init__(self, data_dir: str | Path) -> None:
        self.runs_dir = Path(data_dir) / "runs"
        self._lock = threading.Lock()
        self._stamp: tuple[Any, ...] | None = None
        self._runs: list[RunDir] = []
        # Keyed by the stamp too, so a result computed from runs that changed meanwhile
        # is never served for the new ones.
        self._budgets: dict[tuple[Any, str], DeviceBudget] = {}
        self._reports: dict[tuple[Any, str], dict[str, Any]] = {}

    def _current_stamp(self) -> tuple[Any, ...]:
        stamp = []
        for ledger in sorted(self.runs_dir.glob(f"*/{LEDGER.as_posix()}")):
            run_dir = ledger.parent.parent
            try:
                files = (ledger.stat(), (run_dir / "config.json").stat())
            except FileNotFoundError:
                continue  # a run without its config is refused by load_run below anyway
            stamp.append((run_dir.name, *((s.st_mtime_ns, s.st_size, s.st_ino) for s in files)))
        return tuple(stamp)

    def _snapshot(self) -> tuple[Any, list[RunDir]]:
        stamp = self._current_stamp()
        with self._lock:
            if stamp != self._stamp:
                runs = [load_run(self.runs_dir / entry[0]) for entry in stamp]
                mtime = {entry[0]: entry[1][0] for entry in stamp}
                self._runs = sorted(runs, key=lambda r: (mtime[r.path.name], r.path.name))
                self._budgets, self._reports = {}, {}
                self._stamp = stamp
            return stamp, list(self._runs)

    def runs(self) -> list[RunDir]:
        """Runs with a ledger, oldest ledger first, as they are on disk now."""
        return self._snapshot()[1]

    def budget(self, device_id: str) -> DeviceBudget:
        stamp, runs = self._snapshot()
        with self._lock:
            cached = self._budgets.get((stamp, device_id))
        if cached is not None:
            return cached
        if not runs:
            # A fresh coordinator: nothing is spent; the budget shown is the default a run
            # gets unless its config says otherwise (budget_run "" says no run set it).
            from fedlora.config import PrivacySection

            default = PrivacySection()
            return DeviceBudget(
                device_id=device_id,
                epsilon_spent=0.0,
                epsilon_budget=default.epsilon,
                delta=default.delta,
                accountant=default.accountant,
                rounds_trained=0,
                runs=(),
                budget_run="",
                policy_unit=default.unit,
            )
        trained = [r for r in runs if r.ledger.events_for(device_id, unit=None)]
        source = (trained or runs)[-1]
        privacy = source.config.privacy
        events = [e for r in trained for e in r.ledger.events_for(device_id)]
        budget = DeviceBudget(
            device_id=device_id,
            epsilon_spent=epsilon_for(events, privacy.delta, privacy.accountant),
            epsilon_budget=privacy.epsilon,
            delta=privacy.delta,
            accountant=privacy.accountant,
            rounds_trained=len(events),
            runs=tuple(r.path.name for r in trained if r.ledger.events_for(device_id)),
            budget_run=source.path.name,
            policy_unit=privacy.unit,
            device_level=_device_level(trained, device_id, privacy),
        )
        with self._lock:
            self._budgets[(stamp, device_id)] = budget
        return budget

    def report(self, run: str = "") -> tuple[str, dict[str, Any]]:
        """``(run name, report)`` of ``run``, or of the run whose ledger changed last."""
        stamp, runs = self._snapshot()
        if not runs:
            raise PrivacyError("no run on this coordinator has a privacy ledger yet")
        chosen = runs[-1] if not run else next((r for r in runs if r.path.name == run), None)
        if chosen is None:
            raise KeyError(run)
        name = chosen.path.name
        with self._lock:
            cached = self._reports.get((stamp, name))
        if cached is None:
            cached = report_for(chosen)
            with self._lock:
                self._reports[(stamp, name)] = cached
        return name, cached


def _device_level(runs: list[RunDir], device_id: str, privacy: Any) -> DeviceLevelSpend | None:
    """The device's device-level spend over ``runs`` against ``privacy``'s device budget;
    None if it never was in a device-level sum and the policy does not protect devices."""
    per_run = [(r.path.name, r.ledger.events_for(device_id, unit="device")) for r in runs]
    events = [e for _, run_events in per_run for e in run_events]
    if not events and privacy.unit == "record":
        return None
    delta = privacy.device.delta
    return DeviceLevelSpend(
        epsilon_spent=epsilon_for_device(events, delta) if events else 0.0,
        epsilon_budget=privacy.device.epsilon,
        delta=delta,
        rounds=len(events),
        runs=tuple(name for name, run_events in per_run if run_events),
    )


class PrivacyServicer:
    """GetBudget (a device about itself; the operator about anyone) and GetFleetReport
    (operator only)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.ledgers = FleetLedgers(data_dir)

    def GetBudget(
        self, request: pb.GetBudgetRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.GetBudgetResponse:
        device = request.device_id or caller.id
        if caller.operator and not request.device_id:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the operator must name a device_id")
        if device != caller.id and not caller.operator:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"device {caller.id} may only ask for its own budget, not {device}'s",
            )
        try:
            return self.ledgers.budget(device).to_proto()
        except FedloraError as err:
            abort_on(context, err)

    def GetFleetReport(
        self, request: pb.GetFleetReportRequest, context: grpc.ServicerContext, caller: Caller
    ) -> pb.GetFleetReportResponse:
        if not caller.operator:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the fleet report is for the operator only (signed with DIR/tls/operator.key), "
                f"not device {caller.id}",
            )
        if request.run and (not _RUN_NAME.fullmatch(request.run) or request.run in (".", "..")):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{request.run!r} is not a run name")
        try:
            name, report = self.ledgers.report(request.run)
        except KeyError:
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"run {request.run!r} has no privacy ledger on this coordinator",
            )
        except FedloraError as err:
            abort_on(context, err)
        text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False)
        return pb.GetFleetReportResponse(run=name, report_json=text)
