"""The accountant interface: compose DP-SGD events, then ask for ε at a δ.

Modelled on ``opacus.accountants.IAccountant`` and
``dp_accounting.PrivacyAccountant``. Both accountants here depend only on the
multiset of (noise multiplier, sample rate, steps), so the base class keeps that
history and each subclass only turns it into an ε.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from fedlora.errors import PrivacyError
from fedlora.privacy.events import POISSON_SUBSAMPLED_GAUSSIAN, DPSGDEvent

STATE_VERSION = 1

History = tuple[tuple[float, float, int], ...]
"""Composed events grouped by (noise multiplier, sample rate): ``((σ, q, steps), ...)``, sorted."""


def check_delta(delta: object) -> float:
    """Return ``delta`` as a float if it is a probability in (0, 1), else refuse."""
    if (
        isinstance(delta, bool)
        or not isinstance(delta, int | float)
        or not math.isfinite(delta)
        or not 0.0 < delta < 1.0
    ):
        raise PrivacyError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def state_history(state: object, name: str, mechanisms: frozenset[str]) -> tuple[str, list[Any]]:
    """``(mechanism, history)`` of an accountant's ``state_dict``, once its envelope is checked:
    exactly the four keys, this accountant's ``name``, one of its ``mechanisms``, this
    :data:`STATE_VERSION`; anything else is refused with a :class:`PrivacyError`."""
    if not isinstance(state, dict) or set(state) != {
        "accountant",
        "mechanism",
        "version",
        "history",
    }:
        raise PrivacyError(f"not a {name} accountant state: malformed")
    if state["accountant"] != name:
        raise PrivacyError(
            f"accountant state is from the {state['accountant']!r} accountant, "
            f"this is the {name!r} accountant"
        )
    if state["mechanism"] not in mechanisms:
        raise PrivacyError(
            f"accountant state is for mechanism {state['mechanism']!r}; the {name} "
            f"accountant supports {', '.join(sorted(mechanisms))}"
        )
    if state["version"] != STATE_VERSION or isinstance(state["version"], bool):
        raise PrivacyError(f"accountant state version {state['version']!r} is not supported")
    if not isinstance(state["history"], list):
        raise PrivacyError("accountant state: 'history' must be a list")
    return state["mechanism"], state["history"]


class Accountant(ABC):
    """Tracks the privacy loss of a sequence of DP-SGD events.

    Subclasses set :attr:`name` and implement :meth:`_epsilon`. An event whose
    mechanism is not in :attr:`mechanisms` is refused, never approximated.
    """

    name: ClassVar[str]
    mechanisms: ClassVar[frozenset[str]] = frozenset({POISSON_SUBSAMPLED_GAUSSIAN})

    def __init__(self) -> None:
        self._steps: dict[tuple[float, float], int] = {}

    # ------------------------------------------------------------ composing
    def _check(self, event: object) -> DPSGDEvent:
        if not isinstance(event, DPSGDEvent):
            raise PrivacyError(
                f"the {self.name} accountant does not understand {type(event).__name__}; "
                "it composes DPSGDEvent only"
            )
        if event.mechanism not in self.mechanisms:
            raise PrivacyError(
                f"the {self.name} accountant does not support mechanism {event.mechanism!r} "
                f"(supported: {', '.join(sorted(self.mechanisms))})"
            )
        return event

    def compose(self, event: DPSGDEvent) -> None:
        """Add one event's steps to the history."""
        self.compose_many((event,))

    def compose_many(self, events: Iterable[DPSGDEvent]) -> None:
        """Add several events; if any is refused, none is composed."""
        checked = [self._check(e) for e in events]
        for e in checked:
            if e.steps:
                key = (e.noise_multiplier, e.sample_rate)
                self._steps[key] = self._steps.get(key, 0) + e.steps

    @property
    def history(self) -> History:
        """What has been composed: ``((σ, q, steps), ...)`` sorted by (σ, q)."""
        return tuple((s, q, n) for (s, q), n in sorted(self._steps.items()))

    # ------------------------------------------------------------ epsilon
    def get_epsilon(self, delta: float) -> float:
        """The ε (an upper bound) of everything composed so far, at ``delta``; 0.0 if nothing."""
        delta = check_delta(delta)
        history = self.history
        if not history:
            return 0.0
        return self._epsilon(history, delta)

    @abstractmethod
    def _epsilon(self, history: History, delta: float) -> float:
        """ε at ``delta`` of a non-empty history."""

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The composed history, tagged with accountant name, mechanism and version."""
        return {
            "accountant": self.name,
            "mechanism": POISSON_SUBSAMPLED_GAUSSIAN,
            "version": STATE_VERSION,
            "history": [
                {"noise_multiplier": s, "sample_rate": q, "steps": n} for s, q, n in self.history
            ],
        }

    def load_state_dict(self, state: object) -> None:
        """Replace the history with ``state``; refuse another accountant's or mechanism's state."""
        mechanism, history = state_history(state, self.name, self.mechanisms)
        steps: dict[tuple[float, float], int] = {}
        for entry in history:
            if not isinstance(entry, dict) or set(entry) != {
                "noise_multiplier",
                "sample_rate",
                "steps",
            }:
                raise PrivacyError(f"accountant state: malformed history entry {entry!r}")
            # Reuse the event's validation of σ, q and steps.
            event = DPSGDEvent(
                device="state",
                round=0,
                noise_multiplier=entry["noise_multiplier"],
                sample_rate=entry["sample_rate"],
                steps=entry["steps"],
                delta=0.5,
                mechanism=mechanism,
            )
            key = (event.noise_multiplier, event.sample_rate)
            if key in steps:
                raise PrivacyError(f"accountant state: duplicate history entry for {key}")
            if event.steps:
                steps[key] = event.steps
        self._steps = steps

    def __repr__(self) -> str:
        total = sum(self._steps.values())
        return f"{type(self).__name__}({total} steps in {len(self._steps)} groups)"
