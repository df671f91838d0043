"""Privacy events: one frozen, typed record per round and privacy unit of a device.

Modelled on ``dp_accounting.dp_event``: an event says *what* privacy-relevant
computation happened (which mechanism, with which parameters, on which device,
in which round); accountants turn a sequence of events into an epsilon. Two
kinds, one per unit of privacy:

* :class:`DPSGDEvent` (unit ``"record"``): the DP-SGD steps a device took on its
  own records in a round;
* :class:`DDGEvent` (unit ``"device"``): the distributed discrete Gaussian noise
  a device added to its whole update in a round, protected by secure aggregation.

:func:`event_from_dict` reads either back, dispatching on ``mechanism``. Events
are validated when built and when read back from JSON, so a ledger that was
edited by hand or written by a buggy tool is refused instead of being silently re-accounted.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from fedlora.errors import PrivacyError

POISSON_SUBSAMPLED_GAUSSIAN = "poisson_subsampled_gaussian"
"""DP-SGD with Poisson sampling (rate ``q``) and Gaussian noise ``σ·C``: what Opacus runs."""

DISTRIBUTED_DISCRETE_GAUSSIAN = "distributed_discrete_gaussian"
"""Each of n devices adds discrete Gaussian noise N_Z(0, σ²) to its integer update; only
the sum is seen (Kairouz, Liu & Steinke, ICML 2021)."""

RECORD_MECHANISMS: tuple[str, ...] = (POISSON_SUBSAMPLED_GAUSSIAN,)
"""Mechanisms of record-level events (:class:`DPSGDEvent`)."""

DEVICE_MECHANISMS: tuple[str, ...] = (DISTRIBUTED_DISCRETE_GAUSSIAN,)
"""Mechanisms of device-level events (:class:`DDGEvent`)."""

MECHANISMS: tuple[str, ...] = RECORD_MECHANISMS + DEVICE_MECHANISMS
"""Every mechanism an event may name; accountants may support a subset."""

RECORD = "record"
"""Unit of privacy of a :class:`DPSGDEvent`: one training record of a device."""

DEVICE = "device"
"""Unit of privacy of a :class:`DDGEvent`: a device's whole update."""

UNITS: tuple[str, ...] = (RECORD, DEVICE)

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


def poisson_sample_rate(batch_size: int, num_records: int) -> float:
    """DP-SGD's Poisson sampling rate q = B / N for an expected batch of ``batch_size``
    from ``num_records``, capped at 1 (what a device trains with and records)."""
    return min(1.0, batch_size / max(1, num_records))


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
        if self.mechanism not in RECORD_MECHANISMS:
            raise PrivacyError(
                f"DPSGDEvent.mechanism {self.mechanism!r} is unknown; "
                f"known: {', '.join(RECORD_MECHANISMS)}"
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

    @property
    def unit(self) -> str:
        """``"record"``: DP-SGD protects each training record of the device."""
        return RECORD

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (``run`` only when known, so old ledgers still verify)."""
        return _to_dict(self, _FIELDS)

    @classmethod
    def from_dict(cls, d: object) -> DPSGDEvent:
        """Read an event back; unknown, missing or mistyped fields are refused."""
        return cls(**_checked_fields(d, _FIELDS))


_DDG_FIELDS: tuple[str, ...] = (
    "device",
    "round",
    "noise_stddev",
    "survivors",
    "l2_sensitivity",
    "dimension",
    "delta",
    "mechanism",
    "run",
)


@dataclass(frozen=True)
class DDGEvent:
    """One round in which a device's whole update was in a securely aggregated sum.

    The device clipped its update to L2 norm ``l2_sensitivity`` (Δ2), scaled,
    rotated and rounded it to a ``dimension``-long integer vector, and added
    discrete Gaussian noise N_Z(0, ``noise_stddev``²) to it. ``noise_stddev`` and
    ``l2_sensitivity`` are in integer units (after the scaling). ``survivors`` is the
    number of devices (this one included) whose noise is in the sum the coordinator
    unmasked: the noise that protects this device is theirs together.
    """

    device: str
    round: int
    noise_stddev: float
    survivors: int
    l2_sensitivity: float
    dimension: int
    delta: float
    mechanism: str = DISTRIBUTED_DISCRETE_GAUSSIAN
    run: str = ""
    """The federated run the round belongs to; "" if unknown."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise PrivacyError(f"DDGEvent.device must be a non-empty string, got {self.device!r}")
        if not _is_int(self.round) or self.round < 0:
            raise PrivacyError(f"DDGEvent.round must be an int >= 0, got {self.round!r}")
        for name in ("noise_stddev", "l2_sensitivity"):
            value = getattr(self, name)
            if not _is_float(value) or not math.isfinite(value) or value <= 0:
                raise PrivacyError(f"DDGEvent.{name} must be a finite float > 0, got {value!r}")
        for name in ("survivors", "dimension"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PrivacyError(f"DDGEvent.{name} must be an int >= 1, got {value!r}")
        if not _is_float(self.delta) or not 0.0 < self.delta < 1.0:
            raise PrivacyError(f"DDGEvent.delta must be a float in (0, 1), got {self.delta!r}")
        if not isinstance(self.run, str):
            raise PrivacyError(f"DDGEvent.run must be a string, got {self.run!r}")
        if self.mechanism not in DEVICE_MECHANISMS:
            raise PrivacyError(
                f"DDGEvent.mechanism {self.mechanism!r} is unknown; "
                f"known: {', '.join(DEVICE_MECHANISMS)}"
            )
        for name, cast in (
            ("round", int),
            ("noise_stddev", float),
            ("survivors", int),
            ("l2_sensitivity", float),
            ("dimension", int),
            ("delta", float),
        ):
            object.__setattr__(self, name, cast(getattr(self, name)))

    @property
    def unit(self) -> str:
        """``"device"``: the whole update of the device is protected."""
        return DEVICE

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (``run`` only when known)."""
        return _to_dict(self, _DDG_FIELDS)

    @classmethod
    def from_dict(cls, d: object) -> DDGEvent:
        """Read an event back; unknown, missing or mistyped fields are refused."""
        return cls(**_checked_fields(d, _DDG_FIELDS))


PrivacyEvent = DPSGDEvent | DDGEvent
"""Any event a ledger records."""


def event_from_dict(d: object) -> PrivacyEvent:
    """Read back an event of either kind, by its ``mechanism``; a bad event is refused.

    A dict naming no known device-level mechanism is read as a :class:`DPSGDEvent`,
    which refuses it with the usual message if it is not one.
    """
    if isinstance(d, dict) and d.get("mechanism") in DEVICE_MECHANISMS:
        return DDGEvent.from_dict(d)
    return DPSGDEvent.from_dict(d)


def _to_dict(event: PrivacyEvent, fields: tuple[str, ...]) -> dict[str, Any]:
    return {
        name: getattr(event, name)
        for name in fields
        if not (name in _OPTIONAL and getattr(event, name) == "")
    }


def _checked_fields(d: object, fields: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise PrivacyError(f"a privacy event must be a JSON object, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in fields)
    if unknown:
        raise PrivacyError(f"privacy event has unknown field(s): {', '.join(unknown)}")
    missing = [k for k in fields if k not in d and k not in _OPTIONAL]
    if missing:
        raise PrivacyError(f"privacy event is missing field(s): {', '.join(missing)}")
    return d
