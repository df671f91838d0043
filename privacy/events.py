"""Privacy events: one frozen, typed record per round a device trained with DP-SGD.

Modelled on ``dp_accounting.dp_event``: an event says *what* privacy-relevant
computation happened (which mechanism, with which noise multiplier, sample
rate and number of steps, on which device, in which round); accountants turn a
sequence of events into an epsilon. Events are validated when built and when
read back from JSON, so a ledger that was edited by hand or written by a buggy
tool is refused instead of being silently re-accounted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from fedlora.errors import PrivacyError

POISSON_SUBSAMPLED_GAUSSIAN = "poisson_subsampled_gaussian"
"""DP-SGD with Poisson sampling (rate ``q``) and Gaussian noise ``σ·C``: what Opacus runs."""

MECHANISMS: tuple[str, ...] = (POISSON_SUBSAMPLED_GAUSSIAN,)
"""Every mechanism an event may name; accountants may support a subset."""

_FIELDS: tuple[str, ...] = (
    "device",
    "round",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "mechanism",
    "run",
)
#: Fields a stored event may omit (older ledgers): their defaults apply.
_OPTIONAL: tuple[str, ...] = ("run",)


def _is_int(value: object) -> bool:
    # Any integer type (numpy's too), but not bool: True is not a round number.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    # A real number that is not an integer type (float, numpy floats). An int is
    # refused so that a ledger with "noise_multiplier": 1 is not the same ledger
    # as one with 1.0 — JSON keeps the difference, so must we.
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)


@dataclass(frozen=True)
class DPSGDEvent:
    """``steps`` DP-SGD steps one device took in one round.

    Each step samples every record independently with probability
    ``sample_rate`` and adds Gaussian noise of standard deviation
    ``noise_multiplier`` times the clipping norm. ``delta`` is the δ the device
    was configured with when it trained; the accountant reports ε for whatever δ
    it is asked for.
    """

    device: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    mechanism: str = POISSON_SUBSAMPLED_GAUSSIAN
    run: str = ""
    """The federated run the round belongs to (a device's ledger spans runs); "" if unknown."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise PrivacyError(f"DPSGDEvent.device must be a non-empty string, got {self.device!r}")
        if not _is_int(self.round) or self.round < 0:
            raise PrivacyError(f"DPSGDEvent.round must be an int >= 0, got {self.round!r}")
        if (
            not _is_float(self.noise_multiplier)
            or not math.isfinite(self.noise_multiplier)
            or self.noise_multiplier <= 0
        ):
            raise PrivacyError(
                "DPSGDEvent.noise_multiplier must be a finite float > 0, "
                f"got {self.noise_multiplier!r}"
            )
        if not _is_float(self.sample_rate) or not 0.0 < self.sample_rate <= 1.0:
            raise PrivacyError(
                f"DPSGDEvent.sample_rate must be a float in (0, 1], got {self.sample_rate!r}"
            )
        if not _is_int(self.steps) or self.steps < 0:
            raise PrivacyError(f"DPSGDEvent.steps must be an int >= 0, got {self.steps!r}")
        if not _is_float(self.delta) or not 0.0 < self.delta < 1.0:
            raise PrivacyError(f"DPSGDEvent.delta must be a float in (0, 1), got {self.delta!r}")
        if not isinstance(self.run, str):
            raise PrivacyError(f"DPSGDEvent.run must be a string, got {self.run!r}")
        if self.mechanism not in MECHANISMS:
            raise PrivacyError(
                f"DPSGDEvent.mechanism {self.mechanism!r} is unknown; "
                f"known: {', '.join(MECHANISMS)}"
            )
        # numpy scalars pass the checks above; store plain Python numbers so that
        # equality, hashing and JSON do not depend on where a value came from.
        for name, cast in (
            ("round", int),
            ("noise_multiplier", float),
            ("sample_rate", float),
            ("steps", int),
            ("delta", float),
        ):
            object.__setattr__(self, name, cast(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (``run`` only when known, so old ledgers still verify)."""
        return {
            name: getattr(self, name)
            for name in _FIELDS
            if not (name in _OPTIONAL and getattr(self, name) == "")
        }

    @classmethod
    def from_dict(cls, d: object) -> DPSGDEvent:
        """Read an event back; unknown, missing or mistyped fields are refused."""
        if not isinstance(d, dict):
            raise PrivacyError(f"a privacy event must be a JSON object, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _FIELDS)
        if unknown:
            raise PrivacyError(f"privacy event has unknown field(s): {', '.join(unknown)}")
        missing = [k for k in _FIELDS if k not in d and k not in _OPTIONAL]
        if missing:
            raise PrivacyError(f"privacy event is missing field(s): {', '.join(missing)}")
        return cls(**d)
