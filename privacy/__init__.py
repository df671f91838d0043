"""fedlora.privacy: events, ledger, accountants, noise calibration, the randomness DP-SGD
draws from (:mod:`fedlora.privacy.noise`) and the privacy report.

Imports no torch and no Flower, so the coordinator, the report tooling and the
tests can use it alone. Typical use on a device, before each round::

    from fedlora.privacy import DPSGDEvent, PrivacyLedger, epsilon_after

    event = DPSGDEvent(device="d1", round=r, noise_multiplier=sigma,
                       sample_rate=q, steps=steps, delta=1e-5)
    if epsilon_after(ledger.events_for("d1"), event, delta=1e-5) > budget:
        raise BudgetExhaustedError(...)
    ...train...
    ledger.append(event)
    ledger.save(path)

Device-level DP (the distributed discrete Gaussian under secure aggregation) records
:class:`DDGEvent` in the same ledger and is accounted by :func:`epsilon_for_device`
(:mod:`fedlora.privacy.accountants.ddg`); :func:`calibrate_ddg_noise` picks its σ.
"""

from fedlora.privacy.accountants import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    Accountant,
    DDGAccountant,
    PRVAccountant,
    RDPAccountant,
    epsilon_for,
    epsilon_for_device,
    get_accountant,
)
from fedlora.privacy.calibrate import calibrate_noise_multiplier, device_budget, epsilon_after
from fedlora.privacy.calibrate_ddg import calibrate_ddg_noise, ddg_noise_multiplier
from fedlora.privacy.events import (
    DISTRIBUTED_DISCRETE_GAUSSIAN,
    MECHANISMS,
    POISSON_SUBSAMPLED_GAUSSIAN,
    DDGEvent,
    DPSGDEvent,
    PrivacyEvent,
    event_from_dict,
)
from fedlora.privacy.ledger import LEDGER_FORMAT, LEDGER_VERSION, PrivacyLedger
from fedlora.privacy.noise import (
    SECURE_SOURCE,
    SEEDED_SOURCE,
    RandomSource,
    SecureRandom,
    SeededRandom,
)
from fedlora.privacy.report import REPORT_FORMAT, REPORT_VERSION, build_report, write_report

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "DISTRIBUTED_DISCRETE_GAUSSIAN",
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "MECHANISMS",
    "POISSON_SUBSAMPLED_GAUSSIAN",
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "SECURE_SOURCE",
    "SEEDED_SOURCE",
    "Accountant",
    "DDGAccountant",
    "DDGEvent",
    "DPSGDEvent",
    "PRVAccountant",
    "PrivacyEvent",
    "PrivacyLedger",
    "RDPAccountant",
    "RandomSource",
    "SecureRandom",
    "SeededRandom",
    "build_report",
    "calibrate_ddg_noise",
    "calibrate_noise_multiplier",
    "ddg_noise_multiplier",
    "device_budget",
    "epsilon_after",
    "epsilon_for",
    "epsilon_for_device",
    "event_from_dict",
    "get_accountant",
    "write_report",
]
