"""A device's own privacy ledger, kept in the node's state across rounds.

The device is the party whose privacy is at stake, so it keeps its own record
of every DP-SGD step it took and never trusts the coordinator's count. In
simulation the ledger lives in Flower's per-node state (``Context.state``),
which persists across rounds; a deployed device (``fedlora device``) also
mirrors it to a file on local disk. It is never reset.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedlora.privacy import PrivacyLedger

STATE_KEY = "fedlora.device"


def load_device_ledger(context: Context, path: Path | None = None) -> PrivacyLedger:
    """The device's ledger: from disk when it has a file, else from the node state."""
    if path is not None and path.exists():
        return PrivacyLedger.load(path)
    record = context.state.config_records.get(STATE_KEY)
    if record is None or "ledger" not in record:
        return PrivacyLedger()
    return PrivacyLedger.from_dict(json.loads(str(record["ledger"])))


def save_device_ledger(context: Context, ledger: PrivacyLedger, path: Path | None = None) -> None:
    """Persist the ledger to the node state (and to ``path`` atomically, when given)."""
    context.state.config_records[STATE_KEY] = ConfigRecord(
        {"ledger": json.dumps(ledger.to_dict(), sort_keys=True)}
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger.save(path)
