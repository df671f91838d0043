"""Privacy accountants: one per file behind :class:`~privacy.accountants.base.Accountant`."""

from privacy.accountants.base import Accountant, check_delta
from privacy.accountants.prv import PRVAccountant
from privacy.accountants.rdp import RDPAccountant
from privacy.accountants.registry import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    epsilon_for,
    get_accountant,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "Accountant",
    "PRVAccountant",
    "RDPAccountant",
    "check_delta",
    "epsilon_for",
    "get_accountant",
]
