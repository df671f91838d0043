"""The privacy ledger: an append-only list of :class:`DPSGDEvent`, saved as checksummed JSON.

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
from typing import Any

from fedlora.errors import PrivacyError
from fedlora.privacy.events import DPSGDEvent
from fedlora.runfiles import write_json_atomic

LEDGER_FORMAT = "fedlora.privacy.ledger"
LEDGER_VERSION = 1
_KEYS = frozenset({"format", "version", "events", "sha256"})


def events_digest(event_dicts: list[Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a list of event dicts."""
    canonical = json.dumps(event_dicts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class PrivacyLedger:
    """Append-only record of the DP-SGD rounds of one device or of a fleet.

    A (device, run, round) triple may appear once, and one device's events must all
    carry the same δ (a device's target δ is fixed for a run).
    """

    def __init__(self, events: Iterable[DPSGDEvent] = ()) -> None:
        self._events: list[DPSGDEvent] = []
        self._keys: set[tuple[str, str, int]] = set()
        self._delta: dict[str, float] = {}
        for event in events:
            self.append(event)

    def append(self, event: DPSGDEvent) -> None:
        """Record ``event``; a duplicate (device, run, round) or a changed δ is refused."""
        if not isinstance(event, DPSGDEvent):
            raise PrivacyError(f"a ledger only records DPSGDEvent, got {type(event).__name__}")
        key = (event.device, event.run, event.round)
        if key in self._keys:
            where = f" of run {event.run}" if event.run else ""
            raise PrivacyError(
                f"ledger already has an event for device {event.device!r} in round "
                f"{event.round}{where}; a round is accounted once"
            )
        known_delta = self._delta.get(event.device)
        if known_delta is not None and known_delta != event.delta:
            raise PrivacyError(
                f"device {event.device!r} trained with delta={known_delta!r} before and now "
                f"with delta={event.delta!r}; a device's delta is fixed for a run"
            )
        self._events.append(event)
        self._keys.add(key)
        self._delta[event.device] = event.delta

    @property
    def events(self) -> tuple[DPSGDEvent, ...]:
        """Every event, in the order appended."""
        return tuple(self._events)

    def events_for(self, device: str) -> tuple[DPSGDEvent, ...]:
        """The events of one device, in the order appended (empty if it never trained)."""
        return tuple(e for e in self._events if e.device == device)

    def devices(self) -> tuple[str, ...]:
        """Every device with at least one event, sorted."""
        return tuple(sorted(self._delta))

    def rounds_for(self, device: str, run: str | None = None) -> tuple[int, ...]:
        """The rounds a device has events for (in ``run``, when given), sorted."""
        return tuple(
            sorted(r for d, u, r in self._keys if d == device and (run is None or u == run))
        )

    def __len__(self) -> int:
        return len(self._events)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._events == other._events

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PrivacyLedger({len(self._events)} events, {len(self._delta)} devices)"

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
                ledger.append(DPSGDEvent.from_dict(event_dict))
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
