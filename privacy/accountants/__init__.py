"""Privacy accountants: one per file behind
:class:`~fedlora.privacy.accountants.base.Accountant`."""

from fedlora.privacy.accountants.base import Accountant, check_delta
from fedlora.privacy.accountants.ddg import DDGAccountant, ddg_tau, epsilon_for_device, rdp_ddg
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
    "DDGAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "check_delta",
    "ddg_tau",
    "epsilon_for",
    "epsilon_for_device",
    "get_accountant",
    "rdp_ddg",
]
