"""Which SecAgg+ a device speaks, and the coordinator's refusal of a fleet that disagrees.

A device reports :data:`fedlora.secagg.PROTOCOL_KEY` in its discovery properties; a
device without it runs Flower's own ``secaggplus_mod`` (fedlora before v1), whose masks
and int64 payloads fedlora's workflow cannot unmask. Rather than let such a round fail
at its third stage (or hang on a device that cannot answer), the coordinator refuses
the run before round 1, naming every node that speaks something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.errors import FedloraError
from fedlora.secagg import PROTOCOL_KEY, PROTOCOL_VERSION


def protocol_of(props: Mapping[str, Any]) -> str:
    """A device's SecAgg+ as words: ``fedlora-v1``, or ``flower`` when it reports none."""
    version = props.get(PROTOCOL_KEY)
    return "flower" if version is None else f"fedlora-v{version}"


def check_fleet(devices: Mapping[int, Mapping[str, Any]]) -> None:
    """Refuse (one line) unless every discovered device speaks :data:`PROTOCOL_VERSION`."""
    ours = f"fedlora-v{PROTOCOL_VERSION}"
    others = {
        nid: protocol_of(props)
        for nid, props in sorted(devices.items())
        if props.get(PROTOCOL_KEY) != PROTOCOL_VERSION
    }
    if not others:
        return
    named = ", ".join(
        f"node {nid} (device {devices[nid].get('device', '?')}): {proto}"
        for nid, proto in others.items()
    )
    mixed = "a mixed fleet" if len(others) < len(devices) else "a fleet"
    raise FedloraError(
        f"SecAgg+ refuses {mixed}: the coordinator speaks {ours} and {len(others)} of "
        f"{len(devices)} device(s) do not ({named}); update those devices or run with "
        "secagg.enabled=false"
    )
