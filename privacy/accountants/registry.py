"""Accountants by name, and ε of a list of events in one call."""

from __future__ import annotations

from collections.abc import Iterable

from fedlora.errors import ConfigError
from fedlora.privacy.accountants.base import Accountant
from fedlora.privacy.accountants.prv import PRVAccountant
from fedlora.privacy.accountants.rdp import RDPAccountant
from fedlora.privacy.events import DPSGDEvent

_REGISTRY: dict[str, type[Accountant]] = {
    PRVAccountant.name: PRVAccountant,
    RDPAccountant.name: RDPAccountant,
}

ACCOUNTANTS: tuple[str, ...] = tuple(sorted(_REGISTRY))
"""Valid accountant names; ``"prv"`` is the default everywhere."""

DEFAULT_ACCOUNTANT = PRVAccountant.name


def get_accountant(name: str) -> Accountant:
    """A fresh accountant of the given kind; an unknown name is a :class:`ConfigError`."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(
            f"unknown privacy accountant {name!r}; valid accountants: {', '.join(ACCOUNTANTS)}"
        )
    return cls()


def epsilon_for(
    events: Iterable[DPSGDEvent], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """ε at ``delta`` (an upper bound) of composing ``events``; 0.0 for none."""
    acc = get_accountant(accountant)
    acc.compose_many(events)
    return acc.get_epsilon(delta)
