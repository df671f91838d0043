"""The privacy report's device-level section: what each device's whole contribution cost.

Under ``privacy.unit`` "device" or "both" the coordinator's ledger holds one
:class:`fedlora.privacy.events.DDGEvent` per device per round whose masked sum it
unmasked: the per-device noise σ, the number of devices whose noise the sum held, the
sensitivity and dimension of the integer vectors. This section recomputes every device's
ε from those events with the device-level accountant (:mod:`fedlora.privacy.accountants.ddg`)
and states, in words, what the number protects and what it assumes: the trust is no
longer in each device's own noise alone but in the survivors' together.

It sits beside the record-level sections (``report["device_level"]``), which it does not
change; the schema is in ``privacy/REPORT_SCHEMA.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from fedlora.errors import PrivacyError
from fedlora.privacy.accountants.base import check_delta
from fedlora.privacy.accountants.ddg import epsilon_for_device
from fedlora.privacy.ledger import PrivacyLedger

DEVICE_UNIT = "everything one device contributed to the run (all of its records together)"

ACCOUNTANT = (
    "ddg-rdp: Rényi DP of a sum of discrete Gaussians (Kairouz, Liu & Steinke 2021, "
    "Proposition 14, with its τ slack for summing discrete Gaussians included), composed "
    "over every round the device's update was in an unmasked sum; no amplification by "
    "sampling is claimed; converted to (ε, δ) as the RDP accountant does"
)

ASSUMPTIONS: tuple[str, ...] = (
    "Device-level differential privacy: epsilon bounds what the coordinator (or anyone who "
    "sees the aggregates) learns about everything one device contributed, not only about "
    "one of its records.",
    "The coordinator never sees a device's update: each device clips its whole update, "
    "rotates it, rounds it onto an integer grid and adds its own share of discrete "
    "Gaussian noise drawn from its OS CSPRNG before SecAgg+ masks it; only the sum of the "
    "surviving devices' noisy vectors is ever unmasked.",
    "Trust: the guarantee holds if the devices in each sum added their noise honestly and "
    "at most SecAgg+'s tolerated number of them collude with the coordinator. Each device's "
    "share is sized so that min_survivors devices' noise meets the budget, and the "
    "coordinator never unmasks a sum of fewer; a device's own ledger counts only those "
    "min_survivors, so its epsilon holds even if the rest of a sum added nothing.",
    "Dropouts reduce the noise actually added: each round's events record the number of "
    "devices whose noise the unmasked sum held (survivors), and epsilon is computed with "
    "that number.",
    "Device sampling is not counted as amplification: every round a device took part in "
    "composes in full, because a device cannot check the coordinator's draw.",
    "Plaintext beside the masked sum carries no data-dependent value: under unit 'device' a "
    "device reports no loss, update norm or record count. Under 'both', the record-level "
    "DP-SGD event (noise multiplier, sample rate, steps) travels in plaintext, and its "
    "sample rate reveals the device's record count.",
)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def build_device_section(
    ledger: PrivacyLedger,
    budget_epsilon: float,
    delta: float,
    mechanism: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every device's device-level ε (at ``delta``) round by round, and fleet figures.

    ``mechanism``: the run's plan, as :meth:`fedlora.server.ddp.DevicePlan.to_dict` writes
    it (bits, clip norm, grid, σ, min survivors...), shown as it is.
    """
    if not isinstance(ledger, PrivacyLedger):
        raise PrivacyError(f"needs a PrivacyLedger, got {type(ledger).__name__}")
    delta = check_delta(delta)
    devices: list[dict[str, Any]] = []
    by_round: dict[int, dict[str, Any]] = {}
    for device in ledger.devices(unit="device"):
        events = sorted(ledger.events_for(device, unit="device"), key=lambda e: e.round)
        if not events:
            continue
        rounds = []
        for i, e in enumerate(events):
            eps = epsilon_for_device(events[: i + 1], delta)
            rounds.append({"round": e.round, "survivors": e.survivors, "epsilon": eps})
            slot = by_round.setdefault(e.round, {"round": e.round, "devices": 0, "survivors": []})
            slot["devices"] += 1
            slot["survivors"].append(e.survivors)
        epsilon = rounds[-1]["epsilon"]
        devices.append(
            {
                "device": device,
                "epsilon": epsilon,
                "budget_epsilon": budget_epsilon,
                "remaining_epsilon": budget_epsilon - epsilon,
                "rounds_in_sums": len(events),
                "rounds": rounds,
            }
        )
    epsilons = [float(d["epsilon"]) for d in devices]
    per_round = [
        {"round": r["round"], "devices": r["devices"], "survivors": min(r["survivors"])}
        for _, r in sorted(by_round.items())
    ]
    return {
        "unit": DEVICE_UNIT,
        "accountant": ACCOUNTANT,
        "delta": delta,
        "budget_epsilon": budget_epsilon,
        "mechanism": dict(mechanism) if mechanism is not None else None,
        "max_epsilon": max(epsilons, default=0.0),
        "median_epsilon": _median(epsilons),
        "num_devices": len(devices),
        "rounds": per_round,
        "devices": devices,
        "assumptions": list(ASSUMPTIONS),
    }


PLAN_FILE = "device_plan.json"
"""Where a run writes its device-level plan, beside its ledger (``RUN_DIR/privacy/``)."""


def attach_device_level(
    report: dict[str, Any],
    ledger: PrivacyLedger,
    *,
    budget_epsilon: float,
    delta: float,
    mechanism: Mapping[str, Any] | None,
    record_level: bool,
) -> dict[str, Any]:
    """Add the device-level section to a record-level ``report`` (in place, returned):
    ``report["units"]`` names what the run protected, ``report["device_level"]`` holds
    :func:`build_device_section`. Without record-level DP-SGD (``privacy.unit``
    "device") the record-level sections stay in the report, empty, and say so."""
    report["units"] = ["record", "device"] if record_level else ["device"]
    report["device_level"] = build_device_section(ledger, budget_epsilon, delta, mechanism)
    if not record_level:
        report["privacy_unit"] = "none at record level: this run trained without DP-SGD"
        report["assumptions"] = list(report["device_level"]["assumptions"])
    return report
