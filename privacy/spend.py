"""A device's report of its privacy spend, sent outside the masked update.

A device's DP-SGD event normally reaches the coordinator in the plaintext metrics of
its training reply. When that reply never arrives (the device dropped out after it
trained, its reply came after the round's deadline, or the SecAgg+ round failed
before the coordinator read any reply), the coordinator asks the device directly: a
properties request whose config carries :data:`QUERY_KEY`, answered with
:data:`EVENTS_KEY`, the device's events of the current run as JSON. The events are
what the device's own ledger holds (σ, q, steps, δ per round), which its training
replies disclose anyway; the update itself is never in this message.

The encoding and decoding live together here, used by the device
(:meth:`fedlora.client.device_client.DeviceClient.get_properties`) and by the coordinator
(:mod:`fedlora.server.reconcile`). This module imports no torch and no Flower.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal, overload

from fedlora.errors import PrivacyError, UpdateError
from fedlora.privacy.events import (
    RECORD,
    UNITS,
    DDGEvent,
    DPSGDEvent,
    PrivacyEvent,
    event_from_dict,
)

#: Properties-request config key: "report your privacy events of this run".
QUERY_KEY = "fedlora-ledger"
#: Properties-request config key: "report your events of *these* runs" (comma-separated
#: Flower run ids; a resumed run asks for the spend of the runs it continues).
RUNS_KEY = "fedlora-ledger-runs"
#: Properties-reply key: the events, a JSON list of :meth:`DPSGDEvent.to_dict` objects.
EVENTS_KEY = "ledger_events"
#: Longest reply the coordinator reads (characters); an event is about 200.
MAX_CHARS = 1_000_000


def encode_events(events: Sequence[PrivacyEvent]) -> str:
    """``events`` as the JSON text a device sends under :data:`EVENTS_KEY`."""
    return json.dumps([e.to_dict() for e in events], sort_keys=True, allow_nan=False)


@overload
def decode_events(text: object, who: str, *, max_events: int) -> list[DPSGDEvent]: ...
@overload
def decode_events(
    text: object, who: str, *, max_events: int, unit: Literal["record"]
) -> list[DPSGDEvent]: ...
@overload
def decode_events(
    text: object, who: str, *, max_events: int, unit: Literal["device"]
) -> list[DDGEvent]: ...
@overload
def decode_events(
    text: object, who: str, *, max_events: int, unit: str | None
) -> list[PrivacyEvent]: ...
def decode_events(
    text: object, who: str, *, max_events: int, unit: str | None = RECORD
) -> Sequence[PrivacyEvent]:  # a list; Sequence so that each overload's list fits
    """The ``unit`` events in a device's reply, or :class:`UpdateError` saying what is wrong.

    Anything from the network is refused unless it is a JSON list of well-formed
    events of either kind (every field typed and in range, as
    :func:`~fedlora.privacy.events.event_from_dict` checks) with at most
    ``max_events`` of ``unit``. Events of the other unit are read and checked, then
    left out: ``unit`` defaults to record-level, what DP-SGD reconciliation records
    (None: both). Whether the coordinator may *record* an event is decided by the
    caller, which knows the device, the run and the rounds.
    """
    if unit is not None and unit not in UNITS:
        raise PrivacyError(f"unit must be one of {', '.join(UNITS)} or None, got {unit!r}")
    if not isinstance(text, str):
        raise UpdateError(f"{who} sent no ledger report ({EVENTS_KEY!r} is not a string)")
    if len(text) > MAX_CHARS:
        raise UpdateError(f"{who} sent a ledger report of {len(text)} characters")
    try:
        items = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise UpdateError(f"{who} sent a ledger report that is not JSON") from None
    if not isinstance(items, list):
        raise UpdateError(f"{who} sent a ledger report that is not a list of events")
    if len(items) > max_events * len(UNITS):
        raise UpdateError(f"{who} reports {len(items)} events; at most {max_events} fit this run")
    try:
        events = [event_from_dict(item) for item in items]
    except (PrivacyError, TypeError) as exc:
        raise UpdateError(f"{who} sent a malformed ledger event: {exc}") from None
    wanted = [e for e in events if unit is None or e.unit == unit]
    if len(wanted) > max_events:
        raise UpdateError(f"{who} reports {len(wanted)} events; at most {max_events} fit this run")
    return wanted
