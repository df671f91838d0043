"""Privacy accountants: one per file behind
:class:`~fedlora.privacy.accountants.base.Accountant`."""

from fedlora.privacy.accountants.base import Accountant, check_delta
from fedlora.privacy.accountants.prv import PRVAccountant
from fedlora.privacy.accountants.rdp import RDPAccountant
from fedlora.privacy.accountants.registry import (
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
