"""The privacy report: every device's ε against its budget, round by round, and fleet totals.

Everything is recomputed from the ledger's events with the named accountant,
never read from a summary, so a report on a run in progress is as exact as one
on a finished run. For each device the report gives its ε after each of its
rounds (the ledger prefix up to that round) and the ε one more round like its
last one (same σ, q and steps) would take it to. The schema (version
:data:`REPORT_VERSION`) is documented field by field in ``privacy/REPORT_SCHEMA.md``.

The report states its privacy unit and assumptions in plain words so a reader
does not have to guess what "ε = 3" protects. Text renderings are in
:mod:`fedlora.privacy.render`; plots and HTML live outside ``privacy/`` (``fedlora.reporting``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from fedlora.errors import ConfigError, PrivacyError
from fedlora.privacy.accountants.base import History, check_delta
from fedlora.privacy.accountants.registry import DEFAULT_ACCOUNTANT, epsilon_for, get_accountant
from fedlora.privacy.events import RECORD, DPSGDEvent
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.noise import SECURE_SOURCE, SEEDED_SOURCE
from fedlora.runfiles import write_json_atomic

REPORT_FORMAT = "fedlora.privacy.report"
REPORT_VERSION = 2
"""2: per-round ε, next-round ε, noise mode, run section and notes (1 had totals only)."""

PRIVACY_UNIT = "one training sequence (record) of one device"

NOISE_MODES: tuple[str, ...] = ("fixed", "calibrated")
"""``fixed``: one configured σ; ``calibrated``: each device picks σ per round to fit its budget."""

EXHAUSTION_RULES: dict[str | None, str] = {
    "fixed": (
        "a device is exhausted when its epsilon has reached its budget or one more round "
        "like its last one (same noise multiplier, sample rate and steps) would exceed it"
    ),
    "calibrated": (
        "a device is exhausted when its epsilon has reached its budget; it recalibrates "
        "its noise multiplier before every round, so the cost of one more round like its "
        "last one is shown for information only"
    ),
    None: (
        "a device is exhausted when its epsilon has reached its budget; the noise mode is "
        "not stated, so the cost of one more round like its last one is shown for "
        "information only"
    ),
}
"""What ``exhausted`` means for each ``noise`` mode (None: not stated, as in version 1)."""

SPENT_RTOL = 1e-9
"""A device whose ε is within this relative distance of its budget has spent it (as the
coordinator decides)."""

ASSUMPTIONS: tuple[str, ...] = (
    "Record-level differential privacy per device: epsilon bounds what one device's "
    "model updates reveal about any single training sequence of that device, not about "
    "the device's data as a whole.",
    "Each device trains with DP-SGD: per-example gradients clipped to a fixed norm, "
    "Gaussian noise of noise_multiplier times that norm, and Poisson sampling of every "
    "sequence with probability sample_rate at every step; epsilon is only valid if the "
    "data loader really samples this way.",
    "Epsilon is an upper bound computed from the privacy ledger by the named accountant "
    "for the stated delta, composed over every round the device trained.",
    "SecAgg+ hides individual adapter updates from the coordinator, but the privacy "
    "guarantee does not rely on it: each update is already DP on its own.",
    "Training metrics and example counts travel to the coordinator in plaintext and are "
    "not covered by the DP guarantee.",
    "The noise and the Poisson sampling are secret: epsilon holds only against those who "
    "cannot regenerate the randomness a device drew them from (by default a CSPRNG seeded "
    "by the device's operating system, whose key never leaves the device).",
)

REPRODUCIBLE_NOISE_WARNING = (
    "This run's DP noise was reproducible (privacy.reproducible_noise, a research option): "
    "every device drew its noise and its Poisson batches from a source seeded by the run's "
    "seed, the device and the round. Anyone who has the run's seed (config.json), the "
    "coordinator included, can regenerate that noise and subtract it from the updates: the "
    "epsilon stated here does not hold against them, only against those who never see "
    "the seed."
)
"""The note a report carries when ``noise_source.reproducible`` is true."""

_NO_SECAGG = (
    "This run aggregated without SecAgg+: the coordinator saw every device's update. The "
    "DP guarantee above still holds for each update, since it does not rely on SecAgg+."
)

_RUN_STATUSES = ("running", "complete", "failed", "interrupted")

PARALLEL_MIN_HISTORIES = 200
"""Below this many distinct histories, starting worker processes costs more than it saves."""


@dataclass(frozen=True)
class RunInfo:
    """What the report says about the run besides the ledger; every field may be unknown.

    ``status`` is ``run.json``'s (running, complete, failed, interrupted);
    ``rounds_completed`` is the last round the run's metrics show; ``secagg`` whether
    SecAgg+ was on; ``unreconciled`` how many training requests the coordinator sent
    whose spend its ledger never learned (the device did not answer; its own ledger is
    the authority); ``resumed_at`` the rounds at which the run was resumed after a crash;
    ``reproducible_noise`` the config's ``privacy.reproducible_noise`` (whether devices
    drew their DP noise from a seeded source instead of the OS CSPRNG; it is reported as
    the top-level ``noise_source``).
    """

    status: str | None = None
    rounds_planned: int | None = None
    rounds_completed: int | None = None
    secagg: bool | None = None
    unreconciled: int | None = None
    resumed_at: tuple[int, ...] = ()
    reproducible_noise: bool | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in _RUN_STATUSES:
            raise ConfigError(
                f"run status must be one of {', '.join(_RUN_STATUSES)}, got {self.status!r}"
            )
        for name in ("rounds_planned", "rounds_completed", "unreconciled"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"RunInfo.{name} must be an int or None, got {value!r}")
            if value is not None and value < 0:
                raise ConfigError(f"RunInfo.{name} must be >= 0, got {value!r}")
        for name in ("secagg", "reproducible_noise"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"RunInfo.{name} must be a bool or None, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "in_progress": self.status == "running",
            "rounds_planned": self.rounds_planned,
            "rounds_completed": self.rounds_completed,
            "secagg": self.secagg,
            "unreconciled": self.unreconciled,
            "resumed_at": list(self.resumed_at),
        }


def noise_source(reproducible: bool | None) -> dict[str, Any] | None:
    """The report's ``noise_source``: where devices drew DP noise and batches; None: not stated."""
    if reproducible is None:
        return None
    source = SEEDED_SOURCE if reproducible else SECURE_SOURCE
    return {"source": source, "reproducible": reproducible}


def _check_budgets(budgets: object) -> dict[str, float]:
    if not isinstance(budgets, dict):
        raise ConfigError(
            f"budgets must be a dict of device -> epsilon, got {type(budgets).__name__}"
        )
    checked: dict[str, float] = {}
    for device, budget in budgets.items():
        if not isinstance(device, str) or not device:
            raise ConfigError(f"budget device ids must be non-empty strings, got {device!r}")
        if (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not math.isfinite(budget)
            or budget <= 0
        ):
            raise ConfigError(
                f"budget of device {device!r} must be a finite epsilon > 0, got {budget!r}"
            )
        checked[device] = float(budget)
    return checked


def _prefix_histories(events: tuple[DPSGDEvent, ...], accountant: str) -> list[History]:
    """The composed history after each event, then with one more round like the last."""
    if not events:
        return []
    acc = get_accountant(accountant)
    out = []
    for e in events:
        acc.compose(e)
        out.append(acc.history)
    acc.compose(events[-1])  # the next round, like the last one (rounds do not matter)
    out.append(acc.history)
    return out


def _epsilon_of(history: History, delta: float, accountant: str) -> float:
    """ε at ``delta`` of a composed history (module level so worker processes can run it).

    Accountants depend only on the composed (σ, q, steps) groups, so one event per
    group gives exactly ``epsilon_for`` of the device's own events.
    """
    return epsilon_for(
        (
            DPSGDEvent(
                device="report", round=0, noise_multiplier=s, sample_rate=q, steps=n, delta=delta
            )
            for s, q, n in history
        ),
        delta,
        accountant,
    )


def epsilons_of(
    histories: Iterable[History],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[History, float]:
    """ε at ``delta`` of every distinct history, each computed once.

    With ``workers > 1`` and at least :data:`PARALLEL_MIN_HISTORIES` distinct
    histories, they are spread over that many (spawned) processes; the result
    is the same, since each ε is a deterministic function of its history.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    unique = list(dict.fromkeys(histories))
    out: dict[History, float] = {}
    if workers > 1 and len(unique) >= PARALLEL_MIN_HISTORIES:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded BLAS
        with ProcessPoolExecutor(max_workers=min(workers, len(unique)), mp_context=context) as pool:
            futures = {pool.submit(_epsilon_of, h, delta, accountant): h for h in unique}
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                if progress is not None:
                    progress(len(out), len(unique))
        return out
    for history in unique:
        out[history] = _epsilon_of(history, delta, accountant)
        if progress is not None:
            progress(len(out), len(unique))
    return out


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _device_entry(
    device: str,
    events: tuple[DPSGDEvent, ...],
    epsilons: list[float],
    budget: float,
    noise: str | None,
    accountant: str,
    delta: float,
) -> dict[str, Any]:
    epsilon = epsilons[-2] if events else 0.0
    epsilon_next = epsilons[-1] if events else None
    rounds = []
    previous = 0.0
    for e, eps in zip(events, epsilons[:-1], strict=True):
        rounds.append(
            {
                "round": e.round,
                "noise_multiplier": e.noise_multiplier,
                "sample_rate": e.sample_rate,
                "steps": e.steps,
                "epsilon": eps,
                "epsilon_increase": eps - previous,
            }
        )
        previous = eps
    spent = epsilon >= budget * (1.0 - SPENT_RTOL)
    next_ok = None if epsilon_next is None else epsilon_next <= budget
    exhausted = spent or (noise == "fixed" and next_ok is False)
    return {
        "device": device,
        "epsilon": epsilon,
        "budget_epsilon": budget,
        "remaining_epsilon": budget - epsilon,
        "rounds_trained": len(events),
        "steps": sum(e.steps for e in events),
        "exhausted": exhausted,
        "accountant": accountant,
        "delta": delta,
        "ledger_delta": events[0].delta if events else None,
        "epsilon_next_round": epsilon_next,
        "next_round_within_budget": next_ok,
        "rounds": rounds,
    }


def _fleet(devices: list[dict[str, Any]], unnamed_idle: int) -> dict[str, Any]:
    epsilons = [d["epsilon"] for d in devices] + [0.0] * unnamed_idle
    by_round: dict[int, list[tuple[str, float]]] = {}
    for d in devices:
        for r in d["rounds"]:
            by_round.setdefault(r["round"], []).append((d["device"], r["epsilon"]))
    current: dict[str, float] = {}  # each device's ε after the rounds seen so far
    rounds = []
    for rnd in sorted(by_round):
        current.update(by_round[rnd])
        fleet_eps = list(current.values()) + [0.0] * (len(epsilons) - len(current))
        rounds.append(
            {
                "round": rnd,
                "devices_trained": len(by_round[rnd]),
                "max_epsilon": max(fleet_eps),
                "median_epsilon": _median(fleet_eps),
            }
        )
    trained = [d for d in devices if d["rounds_trained"]]
    increases = [d["epsilon_next_round"] - d["epsilon"] for d in trained]
    return {
        "max_epsilon": max(epsilons, default=0.0),
        "median_epsilon": _median(epsilons),
        "num_devices": len(epsilons),
        "num_trained": len(trained),
        "num_exhausted": sum(1 for d in devices if d["exhausted"]),
        "rounds": rounds,
        "next_round": {
            "max_epsilon": max((d["epsilon_next_round"] for d in trained), default=None),
            "max_epsilon_increase": max(increases, default=None),
            "median_epsilon_increase": _median(increases) if increases else None,
            "num_within_budget": sum(1 for d in trained if d["next_round_within_budget"]),
        },
    }


def _notes(
    run: RunInfo | None, delta: float, ledger_deltas: list[float], unnamed_idle: int
) -> list[str]:
    notes = []
    if run is not None and run.reproducible_noise:
        notes.append(REPRODUCIBLE_NOISE_WARNING)
    if run is not None and run.status == "running":
        done = "" if run.rounds_completed is None else f" after round {run.rounds_completed}"
        planned = "" if run.rounds_planned is None else f" of {run.rounds_planned}"
        notes.append(
            f"The run is in progress{done}{planned}: this report is computed from the "
            "ledger as it stands and will grow as devices train."
        )
    elif run is not None and run.status == "failed":
        notes.append("The run failed: this report covers the rounds its ledger recorded.")
    elif run is not None and run.status == "interrupted":
        notes.append(
            "The run was cut off by a coordinator crash: this report covers the rounds its "
            "ledger recorded; `fedlora run --resume` (or `fedlora simulate --resume`) "
            "continues it."
        )
    if run is not None and run.resumed_at:
        at = ", ".join(str(r) for r in run.resumed_at)
        notes.append(
            f"The run was resumed after a crash at round(s) {at}: each cut round was trained "
            "again, and what devices spent in the cut attempt is in the ledger too."
        )
    if run is not None and run.unreconciled:
        notes.append(
            f"{run.unreconciled} training request(s) never reported their spend to the "
            "coordinator (the device did not answer): those devices' own ledgers may hold "
            "more than this report shows."
        )
    other = [d for d in ledger_deltas if d != delta]
    if other:
        shown = ", ".join(f"{d:g}" for d in other)
        notes.append(
            f"Epsilon is reported at delta={delta:g}, but devices trained (and checked their "
            f"budgets) at delta={shown}; budgets were set for the devices' delta."
        )
    if unnamed_idle:
        notes.append(
            f"{unnamed_idle} device(s) of the fleet never trained and are not in the ledger; "
            "they count as epsilon = 0 in the fleet figures."
        )
    return notes


def build_report(
    ledger: PrivacyLedger,
    budgets: dict[str, float],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    *,
    noise: str | None = None,
    fleet_size: int | None = None,
    run: RunInfo | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Per-device ε (upper bound at ``delta``) round by round against ``budgets``; fleet figures.

    Every device in ``budgets`` is reported (ε = 0 if it never trained); a device
    with events but no budget is refused, since its ε would have nothing to be
    checked against. ``noise`` is the run's σ mode, ``"fixed"`` or
    ``"calibrated"``; it decides what "exhausted" means (see
    :data:`EXHAUSTION_RULES`); None (not stated) means spent, as in version 1.
    ``fleet_size`` counts devices whose ids are unknown but that never trained
    (fleet figures count them at ε = 0). Devices with the same schedule share
    one ε computation; with ``workers > 1`` a large fleet's distinct histories
    are computed in that many spawned processes (so a script calling this needs
    the ``if __name__ == "__main__":`` guard). ``progress(done, total)`` is
    called as distinct histories are computed.
    """
    if not isinstance(ledger, PrivacyLedger):
        raise PrivacyError(f"build_report needs a PrivacyLedger, got {type(ledger).__name__}")
    checked_budgets = _check_budgets(budgets)
    delta = check_delta(delta)
    get_accountant(accountant)  # unknown name → ConfigError before any work
    if noise is not None and noise not in NOISE_MODES:
        raise ConfigError(f"noise must be one of {', '.join(NOISE_MODES)} or None, got {noise!r}")
    if run is not None and not isinstance(run, RunInfo):
        raise ConfigError(f"run must be a RunInfo, got {type(run).__name__}")
    unbudgeted = [d for d in ledger.devices() if d not in checked_budgets]
    if unbudgeted:
        raise ConfigError(
            f"device(s) {', '.join(map(repr, unbudgeted))} trained but have no privacy budget; "
            "give every device a budget"
        )
    if fleet_size is not None and (
        not isinstance(fleet_size, int) or isinstance(fleet_size, bool) or fleet_size < 0
    ):
        raise ConfigError(f"fleet_size must be an int >= 0, got {fleet_size!r}")
    if fleet_size is not None and fleet_size < len(checked_budgets):
        raise ConfigError(
            f"the fleet has {fleet_size} device(s) but {len(checked_budgets)} have a budget"
        )
    unnamed_idle = 0 if fleet_size is None else fleet_size - len(checked_budgets)

    names = sorted(checked_budgets)
    per_device = {d: tuple(sorted(ledger.events_for(d), key=lambda e: e.round)) for d in names}
    histories = {d: _prefix_histories(per_device[d], accountant) for d in names}
    eps = epsilons_of(
        [h for hs in histories.values() for h in hs], delta, accountant, workers, progress
    )
    devices = [
        _device_entry(
            d,
            per_device[d],
            [eps[h] for h in histories[d]],
            checked_budgets[d],
            noise,
            accountant,
            delta,
        )
        for d in names
    ]
    ledger_deltas = sorted({e.delta for e in ledger.events_of(RECORD)})
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "accountant": accountant,
        "delta": delta,
        "ledger_deltas": ledger_deltas,
        "delta_matches_ledger": all(d == delta for d in ledger_deltas),
        "noise": noise,
        "exhaustion_rule": EXHAUSTION_RULES[noise],
        "run": None if run is None else run.to_dict(),
        "noise_source": noise_source(None if run is None else run.reproducible_noise),
        "devices": devices,
        "fleet": _fleet(devices, unnamed_idle),
        "privacy_unit": PRIVACY_UNIT,
        "assumptions": list(assumptions(None if run is None else run.secagg)),
        "notes": _notes(run, delta, ledger_deltas, unnamed_idle),
    }


def assumptions(secagg: bool | None = None) -> tuple[str, ...]:
    """The plain-words assumptions; ``secagg=False`` adds that this run aggregated without it."""
    return (*ASSUMPTIONS, _NO_SECAGG) if secagg is False else ASSUMPTIONS


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``report`` as JSON to ``path`` atomically."""
    try:
        write_json_atomic(report, path)
    except OSError as err:
        raise PrivacyError(f"cannot write privacy report {path}: {err.strerror or err}") from None
    except (TypeError, ValueError) as err:
        raise PrivacyError(f"privacy report is not plain JSON: {err}") from None
