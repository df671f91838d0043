"""The privacy ledger: an append-only list of privacy events, saved as checksummed JSON.

It records both kinds of event: record-level :class:`DPSGDEvent` and device-level
:class:`DDGEvent`. The file format is unchanged by the second kind (a list of event
dicts, each naming its mechanism), so old ledgers read as before. The accessors a
record-level accountant is fed from (:meth:`PrivacyLedger.events_for`,
:meth:`PrivacyLedger.rounds_for`) default to record-level events, so a ledger of a
run that also accounts device-level DP hands DP-SGD code only DP-SGD events.

Each device keeps a ledger of its own rounds and the coordinator keeps one for
the whole fleet; there is no merge — ε is always recomputed from events, never
carried in a model checkpoint. The file records a SHA-256 of its events so an
edited or truncated ledger is refused rather than quietly under-counting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

from fedlora.errors import PrivacyError
from fedlora.privacy.events import (
    RECORD,
    UNITS,
    DDGEvent,
    DPSGDEvent,
    PrivacyEvent,
    event_from_dict,
)
from fedlora.runfiles import write_json_atomic

LEDGER_FORMAT = "fedlora.privacy.ledger"
LEDGER_VERSION = 1
_KEYS = frozenset({"format", "version", "events", "sha256"})


def events_digest(event_dicts: list[Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a list of event dicts."""
    canonical = json.dumps(event_dicts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_unit(unit: object) -> None:
    if unit is not None and unit not in UNITS:
        raise PrivacyError(f"unit must be one of {', '.join(UNITS)} or None, got {unit!r}")


class PrivacyLedger:
    """Append-only record of the privacy events of one device or of a fleet.

    A (device, run, round, unit) key may appear once: a device may have a
    record-level and a device-level event for the same round (a run that accounts
    both), never two of the same unit. One device's events of one unit must all
    carry the same δ (a device's target δ is fixed for a run).
    """

    def __init__(self, events: Iterable[PrivacyEvent] = ()) -> None:
        self._events: list[PrivacyEvent] = []
        self._keys: set[tuple[str, str, int, str]] = set()
        self._delta: dict[tuple[str, str], float] = {}
        for event in events:
            self.append(event)

    def append(self, event: PrivacyEvent) -> None:
        """Record ``event``; a duplicate (device, run, round, unit) or a changed δ is refused."""
        if not isinstance(event, DPSGDEvent | DDGEvent):
            raise PrivacyError(
                f"a ledger only records DPSGDEvent or DDGEvent, got {type(event).__name__}"
            )
        key = (event.device, event.run, event.round, event.unit)
        if key in self._keys:
            where = f" of run {event.run}" if event.run else ""
            raise PrivacyError(
                f"ledger already has an event for device {event.device!r} in round "
                f"{event.round}{where} ({event.unit}-level); a round is accounted once per unit"
            )
        known_delta = self._delta.get((event.device, event.unit))
        if known_delta is not None and known_delta != event.delta:
            raise PrivacyError(
                f"device {event.device!r} had {event.unit}-level delta={known_delta!r} before "
                f"and now delta={event.delta!r}; a device's delta is fixed for a run"
            )
        self._events.append(event)
        self._keys.add(key)
        self._delta[(event.device, event.unit)] = event.delta

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """Every event of either unit, in the order appended (what the file holds).

        Feed :meth:`events_for` or :meth:`events_of` to an accountant instead: those
        select one unit.
        """
        return tuple(self._events)

    @overload
    def events_of(self, unit: Literal["record"]) -> tuple[DPSGDEvent, ...]: ...
    @overload
    def events_of(self, unit: Literal["device"]) -> tuple[DDGEvent, ...]: ...
    @overload
    def events_of(self, unit: str | None) -> tuple[PrivacyEvent, ...]: ...
    def events_of(self, unit: str | None) -> tuple[PrivacyEvent, ...]:
        """Every event of ``unit`` (``"record"`` or ``"device"``; None: both), in order."""
        _check_unit(unit)
        return tuple(e for e in self._events if unit is None or e.unit == unit)

    @overload
    def events_for(self, device: str) -> tuple[DPSGDEvent, ...]: ...
    @overload
    def events_for(self, device: str, unit: Literal["record"]) -> tuple[DPSGDEvent, ...]: ...
    @overload
    def events_for(self, device: str, unit: Literal["device"]) -> tuple[DDGEvent, ...]: ...
    @overload
    def events_for(self, device: str, unit: str | None) -> tuple[PrivacyEvent, ...]: ...
    def events_for(self, device: str, unit: str | None = RECORD) -> tuple[PrivacyEvent, ...]:
        """The events of one device of ``unit`` (None: both), in the order appended.

        The default is record-level (DP-SGD) events, what every caller fed a record-level
        accountant before device-level events existed; empty if the device never trained.
        """
        _check_unit(unit)
        return tuple(
            e for e in self._events if e.device == device and (unit is None or e.unit == unit)
        )

    def devices(self, unit: str | None = RECORD) -> tuple[str, ...]:
        """Every device with at least one ``unit`` event (None: of either unit), sorted.

        Record-level by default, as :meth:`events_for`: the coordinator's budgets and the
        record-level report list the devices that trained with DP-SGD.
        """
        _check_unit(unit)
        return tuple(sorted({d for d, u in self._delta if unit is None or u == unit}))

    def rounds_for(
        self, device: str, run: str | None = None, unit: str | None = RECORD
    ) -> tuple[int, ...]:
        """The rounds a device has ``unit`` events for (in ``run``, when given), sorted.

        ``unit`` defaults to record-level, as :meth:`events_for`; None: either unit.
        """
        _check_unit(unit)
        return tuple(
            sorted(
                {
                    r
                    for d, u, r, k in self._keys
                    if d == device and (run is None or u == run) and (unit is None or k == unit)
                }
            )
        )

    def __len__(self) -> int:
        return len(self._events)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._events == other._events

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PrivacyLedger({len(self._events)} events, {len(self.devices(None))} devices)"

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """``{"format", "version", "events", "sha256"}``, ready for JSON."""
        event_dicts = [e.to_dict() for e in self._events]
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "events": event_dicts,
            "sha256": events_digest(event_dicts),
        }

    @classmethod
    def from_dict(cls, d: object, *, source: str = "<dict>") -> PrivacyLedger:
        """Rebuild a ledger, refusing a wrong format or version, a bad checksum or a bad event.

        ``source`` names the ledger (usually its path) in error messages.
        """
        where = f"ledger {source}"
        if not isinstance(d, dict):
            raise PrivacyError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if set(d) != _KEYS:
            extra = sorted(str(k) for k in set(d) - _KEYS)
            missing = sorted(_KEYS - set(d))
            raise PrivacyError(
                f"{where}: malformed (unknown keys: {extra or 'none'}, missing keys: "
                f"{missing or 'none'})"
            )
        if d["format"] != LEDGER_FORMAT:
            raise PrivacyError(
                f"{where}: format is {d['format']!r}, expected {LEDGER_FORMAT!r}; not a ledger"
            )
        version = d["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version != LEDGER_VERSION:
            raise PrivacyError(
                f"{where}: version {version!r} is not supported (this fedlora reads version "
                f"{LEDGER_VERSION}); upgrade fedlora"
            )
        event_dicts = d["events"]
        if not isinstance(event_dicts, list):
            raise PrivacyError(f"{where}: 'events' must be a list")
        try:
            digest = events_digest(event_dicts)
        except (TypeError, ValueError) as err:  # not JSON-serialisable, NaN, ...
            raise PrivacyError(f"{where}: events are not plain JSON ({err})") from None
        if not isinstance(d["sha256"], str) or d["sha256"] != digest:
            raise PrivacyError(
                f"{where}: sha256 checksum mismatch: it was edited or corrupted; "
                "restore it from backup"
            )
        ledger = cls()
        for i, event_dict in enumerate(event_dicts):
            try:
                ledger.append(event_from_dict(event_dict))
            except PrivacyError as err:
                raise PrivacyError(f"{where}: event {i}: {err}") from None
        return ledger

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger to ``path`` atomically (the old file survives a crash mid-write)."""
        try:
            write_json_atomic(self.to_dict(), path)
        except OSError as err:
            raise PrivacyError(f"cannot write ledger {path}: {err.strerror or err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger saved by :meth:`save`; a missing, unreadable or invalid file is refused."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PrivacyError(
                f"ledger {p} does not exist; a device's spent budget is unknown without it"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise PrivacyError(f"cannot read ledger {p}: {err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PrivacyError(
                f"ledger {p} is not valid JSON ({err.msg} at line {err.lineno}); "
                "restore it from backup"
            ) from None
        return cls.from_dict(data, source=str(p))
