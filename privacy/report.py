"""The privacy report: every device's ε against its budget, and fleet totals, as JSON.

Minimal for now; it states its privacy unit and assumptions in plain words so a
reader does not have to guess what "ε = 3" protects.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from fedlora.errors import ConfigError, PrivacyError
from privacy._atomic import write_json_atomic
from privacy.accountants.base import History, check_delta
from privacy.accountants.registry import DEFAULT_ACCOUNTANT, get_accountant
from privacy.ledger import PrivacyLedger

REPORT_FORMAT = "fedlora.privacy.report"
REPORT_VERSION = 1

PRIVACY_UNIT = "one training sequence (record) of one device"

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
)


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


def build_report(
    ledger: PrivacyLedger,
    budgets: dict[str, float],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> dict[str, Any]:
    """Per-device ε (upper bound at ``delta``) against ``budgets``, plus fleet totals.

    Every device in ``budgets`` is reported (ε = 0 if it never trained); a device
    with events but no budget is refused, since its ε would have nothing to be
    checked against. ``remaining_epsilon`` is ``budget - ε`` and is negative if a
    device overspent; ``exhausted`` means no budget is left.
    """
    if not isinstance(ledger, PrivacyLedger):
        raise PrivacyError(f"build_report needs a PrivacyLedger, got {type(ledger).__name__}")
    checked_budgets = _check_budgets(budgets)
    delta = check_delta(delta)
    get_accountant(accountant)  # unknown name → ConfigError before any work

    unbudgeted = [d for d in ledger.devices() if d not in checked_budgets]
    if unbudgeted:
        raise ConfigError(
            f"device(s) {', '.join(map(repr, unbudgeted))} trained but have no privacy budget; "
            "give every device a budget"
        )

    by_history: dict[History, float] = {}  # devices with the same schedule share one ε
    devices: list[dict[str, Any]] = []
    for device in sorted(checked_budgets):
        events = ledger.events_for(device)
        acc = get_accountant(accountant)
        acc.compose_many(events)
        if acc.history not in by_history:
            by_history[acc.history] = acc.get_epsilon(delta)
        epsilon = by_history[acc.history]
        budget = checked_budgets[device]
        devices.append(
            {
                "device": device,
                "epsilon": epsilon,
                "budget_epsilon": budget,
                "remaining_epsilon": budget - epsilon,
                "rounds_trained": len(ledger.rounds_for(device)),
                "steps": sum(e.steps for e in events),
                "exhausted": epsilon >= budget,
            }
        )

    epsilons = [d["epsilon"] for d in devices]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "accountant": accountant,
        "delta": delta,
        "devices": devices,
        "fleet": {
            "max_epsilon": max(epsilons, default=0.0),
            "median_epsilon": float(statistics.median(epsilons)) if epsilons else 0.0,
            "num_devices": len(devices),
            "num_exhausted": sum(1 for d in devices if d["exhausted"]),
        },
        "privacy_unit": PRIVACY_UNIT,
        "assumptions": list(ASSUMPTIONS),
    }


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``report`` as JSON to ``path`` atomically."""
    try:
        write_json_atomic(report, path)
    except OSError as err:
        raise PrivacyError(f"cannot write privacy report {path}: {err.strerror or err}") from None
    except (TypeError, ValueError) as err:
        raise PrivacyError(f"privacy report is not plain JSON: {err}") from None
