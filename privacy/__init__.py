"""fedlora.privacy: events, ledger, accountants, noise calibration, the randomness DP-SGD
draws from (:mod:`fedlora.privacy.noise`) and the privacy report.

Imports no torch and no Flower, so the coordinator, the report tooling and the
tests can use it alone. Typical use on a device, before each round::

    from fedlora.privacy import DPSGDEvent, PrivacyLedger, epsilon_after

    event = DPSGDEvent(device="d1", round=r, noise_multiplier=sigma,
                       sample_rate=q, steps=steps, delta=1e-5)
    if epsilon_after(ledger.events, event, delta=1e-5) > budget:
        raise BudgetExhaustedError(...)
    ...train...
    ledger.append(event)
    ledger.save(path)
"""

from fedlora.privacy.accountants import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    Accountant,
    PRVAccountant,
    RDPAccountant,
    epsilon_for,
    get_accountant,
)
from fedlora.privacy.calibrate import calibrate_noise_multiplier, epsilon_after
from fedlora.privacy.events import MECHANISMS, POISSON_SUBSAMPLED_GAUSSIAN, DPSGDEvent
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
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "MECHANISMS",
    "POISSON_SUBSAMPLED_GAUSSIAN",
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "SECURE_SOURCE",
    "SEEDED_SOURCE",
    "Accountant",
    "DPSGDEvent",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "RandomSource",
    "SecureRandom",
    "SeededRandom",
    "build_report",
    "calibrate_noise_multiplier",
    "epsilon_after",
    "epsilon_for",
    "get_accountant",
    "write_report",
]
